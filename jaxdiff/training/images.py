"""Images out: float samples to uint8 (:func:`jaxdiff.data.to_uint8`), sample grids (labels, layout) and PNG files."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from jaxdiff.data import to_uint8  # the inverse of jaxdiff.data.from_uint8, beside it

__all__ = ["grid_labels", "to_uint8", "make_grid", "grid_image", "save_grid"]


def grid_labels(num_samples: int, num_classes: int | None) -> np.ndarray:
    """Labels ``[N]`` int32 for a sample grid: sample ``i`` has class ``(i // num_classes) % num_classes``.

    Each class ``num_classes`` times in turn (10 classes, 20 samples: ten 0s, then ten 1s), so in
    a grid of ``num_classes`` columns row ``r`` holds class ``r mod num_classes``. All zeros for
    ``num_classes=None`` (an unconditional model: only the number of labels counts).
    """
    if num_classes is None:
        return np.zeros((num_samples,), np.int32)
    return ((np.arange(num_samples) // num_classes) % num_classes).astype(np.int32)


def make_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> one uint8 ``[rows*(H+pad)+pad, cols*(W+pad)+pad, C]`` image."""
    n, h, w, c = images.shape
    ncols = ncols or int(math.ceil(math.sqrt(n)))
    nrows = int(math.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return grid


def grid_image(images: np.ndarray, ncols: int | None = None, min_size: int = 512) -> Image.Image:
    """uint8 ``[N, H, W, C]`` images (``C`` = 1 or 3) as one PIL image, upscaled (nearest) to at least ``min_size`` px.

    Greyscale grids are mode ``"L"`` (PIL has no ``(H, W, 1)`` images); notebooks display the
    result inline.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 1 or 3] (see to_uint8), got {images.dtype} {images.shape}")
    grid = make_grid(images, ncols)
    scale = max(1, min_size // max(grid.shape[:2]))
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    return img


def save_grid(images: np.ndarray, path: str, ncols: int | None = None, min_size: int = 512) -> None:
    """Saves uint8 ``[N, H, W, C]`` images as a PNG grid (:func:`grid_image`)."""
    grid_image(images, ncols, min_size).save(path)

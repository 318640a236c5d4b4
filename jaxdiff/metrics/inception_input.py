"""pytorch-fid's input pipeline for the FID Inception network, in JAX.

uint8 ``/ 255`` to [0, 1], bilinear resize to 299x299 with torch's
``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing, also when
downscaling), then ``2 x - 1``. Used by :mod:`jaxdiff.metrics.inception`, which re-exports it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks

__all__ = ["INPUT_SIZE", "check_images", "preprocess", "resize_bilinear"]

INPUT_SIZE = 299


def _linear_taps(in_size: int, out_size: int):
    """torch's CPU ``upsample_bilinear2d`` (align_corners=False) taps along one axis, computed in
    float32 as torch does: ``src = max(scale (i + 1/2) - 1/2, 0)``, ``scale = in / out``,
    ``i0 = min(floor(src), in - 1)``, ``i1 = min(i0 + 1, in - 1)``, ``w1 = src - i0``.
    Returns ``(i0, i1, w0, w1)``, each ``[out_size]``."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0.0), np.float32(1.0))
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` in NHWC, without antialiasing
    (``jax.image.resize`` antialiases when downscaling; torch does not).

    ``x: [N, H, W, C]`` float -> ``[N, size[0], size[1], C]`` (same dtype). Shapes are static:
    the gather indices and weights are constants of the trace.
    """
    if x.ndim != 4:
        raise ValueError(f"resize_bilinear: x must be [N, H, W, C], got shape {x.shape}")
    out_h, out_w = size
    h0, h1, hw0, hw1 = _linear_taps(x.shape[1], out_h)
    w0, w1, ww0, ww1 = _linear_taps(x.shape[2], out_w)
    rows = jnp.take(x, h0, axis=1) * hw0[None, :, None, None] + jnp.take(x, h1, axis=1) * hw1[None, :, None, None]
    return jnp.take(rows, w0, axis=2) * ww0[None, None, :, None] + jnp.take(rows, w1, axis=2) * ww1[None, None, :, None]


def preprocess(images: jax.Array) -> jax.Array:
    """pytorch-fid's input pipeline: ``images: [N, H, W, C]`` uint8, ``C`` in {1, 3} ->
    ``[N, 299, 299, 3]`` float32 in [-1, 1] (``/ 255``, bilinear resize, ``2 x - 1``; one channel
    is repeated to three, as PIL's ``convert("RGB")`` does)."""
    x = images.astype(jnp.float32) / jnp.float32(255.0)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


def check_images(images, name: str = "images") -> np.ndarray:
    """``images`` as a host array after checking it is uint8 ``[N, H, W, C]`` with ``C`` in {1, 3}."""
    arr = np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"{name} must be uint8 [N, H, W, C], got rank {arr.ndim} (shape {arr.shape})")
    if arr.dtype != np.uint8:
        hint = (" (float images in [-1, 1], the samplers' output: convert with "
                "jaxdiff.training.images.to_uint8)") if np.issubdtype(arr.dtype, np.floating) else ""
        raise ValueError(f"{name} must be uint8 in [0, 255] (as pytorch-fid reads image files), got dtype "
                         f"{arr.dtype}{hint}")
    if arr.shape[-1] not in (1, 3):
        raise ValueError(f"{name} must have 1 or 3 channels (NHWC), got shape {arr.shape}"
                         f"{checks.layout_hint(arr.shape)}")
    if arr.shape[1] < 1 or arr.shape[2] < 1:
        raise ValueError(f"{name} must have a non-empty image size, got shape {arr.shape}")
    return arr

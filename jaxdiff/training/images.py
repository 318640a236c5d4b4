"""Generating images from a trained UNet, and saving them (uint8 arrays and PNG grids)."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxdiff import flow, samplers
from jaxdiff.schedules import Schedule

__all__ = ["guided_model_fn", "generate", "to_uint8", "make_grid", "save_grid"]


def guided_model_fn(apply_fn: Callable, params, labels, *, num_classes: int | None, guidance,
                    channels: int) -> Callable:
    """``model_fn(x_t, t)`` for the samplers from a Flax ``apply_fn``.

    For a class-conditional model, classifier-free guidance (Ho & Salimans 2022) with the
    convention ``out = out_null + w (out_cond - out_null)``: ``w = 1`` is the conditional model
    exactly, ``w = 0`` the unconditional one; ``w`` may be traced. Only the first ``channels``
    output channels are guided (learned-variance channels come from the conditional pass).
    """
    def model_fn(x, t):
        if num_classes is None:
            return apply_fn({"params": params}, x, t, None, train=False)
        null = jnp.full_like(labels, num_classes)
        both = apply_fn({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([labels, null]), train=False)
        cond, uncond = jnp.split(both, 2)
        guided = uncond[..., :channels] + guidance * (cond[..., :channels] - uncond[..., :channels])
        return jnp.concatenate([guided, cond[..., channels:]], axis=-1)

    return model_fn


def generate(apply_fn: Callable, params, schedule: Schedule, key, labels, image_shape, *, sampler: str = "ddim",
             num_steps=50, eta=0.0, guidance=1.0, num_classes: int | None = None, prediction: str = "epsilon",
             learned_variance: bool = False, clip_x0: bool = True, objective: str = "diffusion") -> jax.Array:
    """Samples ``[N, H, W, C]`` float images in about ``[-1, 1]``; ``labels`` ``[N]`` int (ignored if unconditional).

    Pure and jittable: wrap it in ``jax.jit`` with ``static_argnames`` for the strings and
    shapes; ``num_steps``, ``eta`` and ``guidance`` may stay traced.
    """
    c = image_shape[-1]
    guided = guided_model_fn(apply_fn, params, labels, num_classes=num_classes, guidance=guidance, channels=c)
    if objective == "flow_matching":  # sampler is "euler" or "heun" on the velocity field
        return flow.sample(flow.with_time_scale(guided), key, (labels.shape[0], *image_shape), method=sampler,
                           num_steps=num_steps)
    use_learned = learned_variance and sampler == "ddpm"
    model_fn = guided if use_learned or not learned_variance else (lambda x, t: guided(x, t)[..., :c])
    extra = {"variance": "learned_range"} if use_learned else {}
    if sampler != "ode":  # the adaptive ODE solver chooses its own steps
        extra["num_steps"] = num_steps
    if sampler in ("ddim", "euler_ancestral"):
        extra["eta"] = eta
    return samplers.sample(schedule, model_fn, key, (labels.shape[0], *image_shape), sampler=sampler,
                           prediction=prediction, clip_x0=clip_x0, **extra)


def to_uint8(images) -> np.ndarray:
    """``[-1, 1]`` floats -> uint8 ``[0, 255]`` (rounded, clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


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


def save_grid(images: np.ndarray, path: str, ncols: int | None = None, min_size: int = 512) -> None:
    """Saves uint8 ``[N, H, W, C]`` images as a PNG grid, upscaled (nearest) to at least ``min_size`` px."""
    grid = make_grid(images, ncols)
    scale = max(1, min_size // max(grid.shape[:2]))
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    if scale > 1:
        img = img.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    img.save(path)

"""Sampling from a trained workdir: restore the EMA parameters and run a compiled sampler."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from jaxdiff import data
from jaxdiff.samplers import SAMPLERS
from jaxdiff.training import checkpoint, sampling
from jaxdiff.training.loop import grid_labels
from jaxdiff.training.setup import make_model, make_schedule
from jaxdiff.training.state import create_train_state, make_optimizer

__all__ = ["load_workdir", "sample_workdir"]


def load_workdir(workdir: str):
    """Restores ``(config, model, schedule, ema_params, num_classes, image_shape)`` from the latest checkpoint."""
    config = ml_collections.ConfigDict(checkpoint.read_config(workdir))
    info = data.make_source(config.data.name, config.data.split, config.data.data_dir or None).info
    size = config.data.image_size or None
    image_shape = (size, size, info.image_shape[2]) if size else tuple(info.image_shape)
    num_classes = info.num_classes if config.model.class_conditional else None
    model = make_model(config.model, num_classes=num_classes, learned_variance=config.diffusion.learned_variance)
    tx = make_optimizer(config.train.learning_rate, warmup_steps=config.train.warmup_steps,
                        grad_clip=config.train.grad_clip)
    target = jax.device_get(create_train_state(jax.random.key(0), model, tx, image_shape, num_classes=num_classes))
    manager = checkpoint.open_manager(workdir, async_save=False)
    state, _ = checkpoint.restore(manager, target)
    manager.close()
    return config, model, make_schedule(config.diffusion), state.ema_params, num_classes, image_shape


def sample_workdir(workdir: str, output: str, *, num_samples: int, seed: int = 0, sampler: str | None = None,
                   num_steps: int | None = None, eta: float | None = None, guidance: float | None = None,
                   batch_size: int = 256) -> str:
    """Writes ``output`` (.npz with uint8 ``images`` [N, H, W, C] and ``labels``) and a PNG grid beside it.

    Deterministic in ``seed``: batch ``i`` uses ``fold_in(key(seed), i)``.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    config, model, schedule, params, num_classes, image_shape = load_workdir(workdir)
    sm = config.sample
    sampler = sampler or sm.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r} is unknown; choose one of {tuple(SAMPLERS)}")
    num_steps = sm.num_steps if num_steps is None else num_steps
    if not 1 <= num_steps <= schedule.num_timesteps:
        raise ValueError(f"--steps must be in [1, {schedule.num_timesteps}], got {num_steps}")
    fn = jax.jit(functools.partial(
        sampling.generate, model.apply, schedule=schedule, image_shape=image_shape, sampler=sampler,
        num_classes=num_classes, prediction=config.diffusion.prediction,
        learned_variance=config.diffusion.learned_variance, clip_x0=sm.clip_x0,
        objective=config.diffusion.get("objective", "diffusion")))
    labels = grid_labels(num_samples, num_classes)
    key = jax.random.key(seed)
    chunks = []
    for i, start in enumerate(tqdm(range(0, num_samples, batch_size), desc="sample", unit="batch")):
        y = labels[start:start + batch_size]
        imgs = fn(params, key=jax.random.fold_in(key, i), labels=jnp.asarray(y), num_steps=num_steps,
                  eta=sm.eta if eta is None else eta, guidance=sm.guidance if guidance is None else guidance)
        chunks.append(sampling.to_uint8(imgs))
    images = np.concatenate(chunks)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    arrays = {"images": images}
    if num_classes is not None:
        arrays["labels"] = labels
    np.savez(output, **arrays)
    sampling.save_grid(images, os.path.splitext(output)[0] + ".png", ncols=num_classes or None)
    return output

"""Generating images with a trained UNet: the pure ``generate`` and ``sample_workdir`` for a workdir.

What each sampler accepts comes from :mod:`jaxdiff.samplers.registry` and the guidance formula
from :func:`jaxdiff.guidance.classifier_free_guidance`; this module only wires a Flax
``apply_fn`` to them.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import edm, flow, guidance, samplers
from jaxdiff.samplers import registry
from jaxdiff.schedules import Schedule
from jaxdiff.training import images as imgs
from jaxdiff.training.workdir import load_workdir

__all__ = ["generate", "sample_workdir"]


def generate(apply_fn: Callable, params, schedule: Schedule, key, labels, image_shape, *, sampler: str = "ddim",
             num_steps=50, eta=0.0, guidance_scale=1.0, num_classes: int | None = None, prediction: str = "epsilon",
             learned_variance: bool = False, clip_x0: bool = True, objective: str = "diffusion",
             sigma_data: float = 0.5, options: Mapping | None = None) -> jax.Array:
    """Samples ``[N, H, W, C]`` float images in about ``[-1, 1]``.

    Args:
      apply_fn: a Flax ``apply`` of a :class:`jaxdiff.models.UNet` (``(variables, x, t, y, train=)``).
      labels: ``[N]`` int labels; ignored by an unconditional model (``num_classes=None``).
      image_shape: static ``(H, W, C)``.
      sampler: a name in :data:`jaxdiff.samplers.SAMPLERS` that serves ``objective``.
      eta: forwarded only to samplers that take it (``ddim``, ``euler_ancestral``).
      guidance_scale: classifier-free guidance scale ``w`` of a class-conditional model
        (1 = the conditional model).
      learned_variance: the network outputs ``2C`` channels; samplers that use learned
        variances (``ddpm``) get them, the others the first ``C``.
      objective: the model's training objective. For ``"edm"`` the UNet is the raw network ``F``
        of the denoiser ``D = edm.precondition(F)`` (``sigma_data``, time input
        :func:`jaxdiff.edm.unet_time`); guidance combines ``F``'s outputs, which is the same
        affine combination of ``D``'s. ``schedule``, ``prediction`` and ``clip_x0`` are unused.
      options: the sampler's own options (:mod:`jaxdiff.samplers.registry`), e.g. ``{"s_churn": 40.0}``
        for ``edm``; ``eta`` fills in ``"eta"`` when the sampler takes it and ``options`` lacks it.

    Pure and jittable: wrap it in ``jax.jit`` with the strings and shapes bound (e.g. by
    ``functools.partial``); ``num_steps``, ``eta`` and ``guidance_scale`` may stay traced.
    """
    spec = registry.check(sampler, objective=objective, options=options)
    c = image_shape[-1]
    shape = (labels.shape[0], *image_shape)

    def net(x, t, y):
        return apply_fn({"params": params}, x, t, y, train=False)

    if num_classes is None:
        model_fn = functools.partial(net, y=None)
    else:
        model_fn = guidance.classifier_free_guidance(net, labels, num_classes, guidance_scale, guided_channels=c)
    if objective == "flow_matching":
        return flow.sample(flow.with_time_scale(model_fn), key, shape, method=sampler, num_steps=num_steps)
    options = dict(options or {})
    if "eta" in spec.options:
        options.setdefault("eta", eta)
    if objective == "edm":
        denoiser = edm.precondition(lambda x, c: model_fn(x, edm.unet_time(c)), sigma_data=sigma_data)
        k_init, k_steps = jax.random.split(key)
        x_T = jax.random.normal(k_init, shape, jnp.float32)
        return spec.run(None, denoiser, x_T, k_steps, num_steps=num_steps, **options)[0]
    if learned_variance and spec.learned_variance:
        options["variance"] = "learned_range"
    elif learned_variance:
        model_fn = (lambda fn: lambda x, t: fn(x, t)[..., :c])(model_fn)
    return samplers.sample(schedule, model_fn, key, shape, sampler=sampler,
                           num_steps=None if spec.adaptive else num_steps, prediction=prediction,
                           clip_x0=clip_x0, **options)


def sample_workdir(workdir: str, output: str, *, num_samples: int, seed: int = 0, sampler: str | None = None,
                   num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                   batch_size: int = 256, options: Mapping | None = None, ema: float | None = None) -> str:
    """Writes ``output`` (.npz with uint8 ``images`` [N, H, W, C] and ``labels``) and a PNG grid beside it.

    ``sampler``, ``num_steps``, ``eta`` and ``guidance_scale`` override the run's ``config.sample``;
    ``options`` are the sampler's own (``scripts/sample.py --option name=value``); ``ema``: a
    ``sigma_rel`` whose post-hoc EMA reconstruction replaces the run's EMA (``load_workdir``);
    an override the run's model or sampler cannot use (``eta`` for a sampler without it,
    guidance for an unconditional model) is an error, raised before any work. Deterministic in
    ``seed``: batch ``i`` uses ``fold_in(key(seed), i)``.
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not output.endswith(".npz"):
        raise ValueError(f"output must be a .npz path, got {output!r}")
    wd = load_workdir(workdir, ema=ema)
    run, sm = wd.run, wd.config.sample
    sampler = sampler or sm.sampler
    registry.check(sampler, objective=run.objective, num_steps=num_steps, num_timesteps=run.schedule.num_timesteps,
                   options={**(options or {}), **({} if eta is None else {"eta": eta})}, prefix="--")
    num_steps = sm.num_steps if num_steps is None else num_steps
    if guidance_scale is not None and run.num_classes is None:
        raise ValueError("--guidance: the model of this workdir is unconditional (no classifier-free guidance)")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fn = jax.jit(functools.partial(
        generate, run.model.apply, schedule=run.schedule, image_shape=run.image_shape, sampler=sampler,
        num_classes=run.num_classes, prediction=wd.config.diffusion.prediction,
        learned_variance=wd.config.diffusion.learned_variance, clip_x0=sm.clip_x0, objective=run.objective,
        sigma_data=wd.config.diffusion.get("sigma_data", 0.5), options=options))
    labels = imgs.grid_labels(num_samples, run.num_classes)
    key = jax.random.key(seed)
    chunks = []
    for i, start in enumerate(tqdm(range(0, num_samples, batch_size), desc="sample", unit="batch")):
        y = labels[start:start + batch_size]
        out = fn(wd.ema_params, key=jax.random.fold_in(key, i), labels=jnp.asarray(y), num_steps=num_steps,
                 eta=sm.eta if eta is None else eta,
                 guidance_scale=sm.guidance if guidance_scale is None else guidance_scale)
        chunks.append(imgs.to_uint8(out))
    images = np.concatenate(chunks)
    arrays = {"images": images}
    if run.num_classes is not None:
        arrays["labels"] = labels
    np.savez(output, **arrays)
    imgs.save_grid(images, os.path.splitext(output)[0] + ".png", ncols=run.num_classes or None)
    return output

"""Generating images with a trained UNet: the pure ``generate`` and ``sample_workdir`` for a workdir.

What each sampler accepts comes from :mod:`jaxdiff.samplers.registry` and the guidance formula
from :func:`jaxdiff.guidance.classifier_free_guidance`; this module only wires a Flax
``apply_fn`` to them.

A model's conditionality is explicit: ``num_classes`` says whether the model is class-conditional,
and when ``apply_fn`` is a bound ``UNet.apply`` its ``num_classes`` must agree (``ValueError``
otherwise), so labels and guidance are never silently ignored. ``sample_workdir`` never loses
work: every check, the output files' included, is done before the first image is generated,
and an existing output is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import checks, edm, flow, guidance, samplers
from jaxdiff.samplers import registry
from jaxdiff.schedules import Schedule
from jaxdiff.training import images as imgs
from jaxdiff.training.workdir import load_workdir

__all__ = ["generate", "sample_images", "sample_workdir", "sample_pipeline"]


def generate(apply_fn: Callable, params, schedule: Schedule, key, labels, image_shape, *, sampler: str = "ddim",
             num_steps=50, eta=0.0, guidance_scale=1.0, num_classes: int | None = None, prediction: str = "epsilon",
             learned_variance: bool = False, clip_x0: bool = True, objective: str = "diffusion",
             sigma_data: float = 0.5, options: Mapping | None = None) -> jax.Array:
    """Samples ``[N, H, W, C]`` float images in about ``[-1, 1]``.

    Args:
      apply_fn: a Flax ``apply`` of a :class:`jaxdiff.models.UNet` (``(variables, x, t, y, train=)``).
      labels: ``[N]`` int labels in ``[0, num_classes)`` (checked when concrete); only their
        number is used by an unconditional model (``num_classes=None``).
      image_shape: static ``(H, W, C)``.
      sampler: a name in :data:`jaxdiff.samplers.SAMPLERS` that serves ``objective``.
      eta: forwarded only to samplers that take it (``ddim``, ``euler_ancestral``).
      guidance_scale: classifier-free guidance scale ``w`` of a class-conditional model
        (1 = the conditional model); a concrete value other than 1 on an unconditional model raises.
      num_classes: the model's number of classes (``None``: unconditional). When ``apply_fn`` is a
        bound method of a module with a ``num_classes`` field (``UNet.apply``) the two must agree.
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
    _check_conditioning(apply_fn, labels, num_classes, guidance_scale)
    checks.check_nonnegative(eta, "eta")
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


def _check_conditioning(apply_fn: Callable, labels, num_classes: int | None, guidance_scale) -> None:
    """Labels and guidance must mean something to the model (module docstring)."""
    model = getattr(apply_fn, "__self__", None)
    model_classes = getattr(model, "num_classes", num_classes)
    if model_classes != num_classes:
        raise ValueError(f"num_classes={num_classes} but the model of apply_fn has num_classes={model_classes}: "
                         f"pass the model's num_classes (None for an unconditional model)")
    if jnp.ndim(labels) != 1:
        raise ValueError(f"labels must be [N] ints, got shape {jnp.shape(labels)}")
    if num_classes is None:
        w = checks.concrete_value(guidance_scale)
        if w is not None and np.any(w != 1.0):
            raise ValueError(f"guidance_scale={w.item() if w.size == 1 else w}: the model is unconditional "
                             f"(num_classes=None), so there is no classifier-free guidance; use 1")
    else:
        checks.check_int_range(labels, "labels", 0, num_classes - 1, f" (num_classes={num_classes})")


def _check_output(output: str, overwrite: bool) -> list[str]:
    """Checks that ``output`` and the PNG beside it can be written, before any work; returns both paths."""
    if not output.endswith(".npz"):
        raise ValueError(f"output must be a .npz path, got {output!r}")
    paths = [output, os.path.splitext(output)[0] + ".png"]
    for path in paths:
        if os.path.isdir(path):
            raise IsADirectoryError(f"output {path} is a directory; give a file path")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"output {path} exists; pass overwrite (--overwrite) to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"output {output}: cannot write in {folder} ({error.strerror or error})") from None
    return paths


def _check_counts(num_samples: int, batch_size: int) -> None:
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")


def sample_images(workdir, num_samples: int, *, seed: int = 0, sampler: str | None = None,
                  num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                  labels=None, batch_size: int = 256, options: Mapping | None = None, ema: float | None = None,
                  prefix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Samples a workdir's EMA model: ``(images uint8 [N, H, W, C], labels int32 [N])``, ready to display.

    Args:
      workdir: a path, or a :class:`~jaxdiff.training.workdir.Workdir` already loaded by
        :func:`~jaxdiff.training.workdir.load_workdir` (no second restore).
      sampler, num_steps, eta, guidance_scale: override the run's ``config.sample``; one the
        run cannot use (``eta`` for a sampler without it, guidance for an unconditional model)
        raises before any work.
      labels: ``[N]`` class labels of a class-conditional model (default: the grid order
        ``0, 1, ..., 9, 0, ...`` of :func:`~jaxdiff.training.images.grid_labels`).
      options: the sampler's own options (``scripts/sample.py --option name=value``).
      ema: a ``sigma_rel`` whose post-hoc EMA reconstruction replaces the run's EMA (only when
        ``workdir`` is a path; see :func:`~jaxdiff.training.workdir.load_workdir`).
    Deterministic in ``seed``: batch ``i`` uses ``fold_in(key(seed), i)``.
    """
    _check_counts(num_samples, batch_size)
    wd = load_workdir(workdir, ema=ema) if isinstance(workdir, str) else workdir
    run, sm = wd.run, wd.config.sample
    sampler = sampler or sm.sampler
    registry.check(sampler, objective=run.objective, num_steps=num_steps, num_timesteps=run.schedule.num_timesteps,
                   options={**(options or {}), **({} if eta is None else {"eta": eta})}, prefix=prefix)
    num_steps = sm.num_steps if num_steps is None else num_steps
    if guidance_scale is not None and run.num_classes is None:
        raise ValueError(f"{prefix}guidance: the model of this workdir is unconditional (no classifier-free guidance)")
    if labels is None:
        labels = imgs.grid_labels(num_samples, run.num_classes)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape [num_samples]=({num_samples},), got {labels.shape}")
    fn = jax.jit(functools.partial(
        generate, run.model.apply, schedule=run.schedule, image_shape=run.image_shape, sampler=sampler,
        num_classes=run.num_classes, prediction=wd.config.diffusion.prediction,
        learned_variance=wd.config.diffusion.learned_variance, clip_x0=sm.clip_x0, objective=run.objective,
        sigma_data=wd.config.diffusion.get("sigma_data", 0.5), options=options))
    key = jax.random.key(seed)
    chunks = []
    for i, start in enumerate(tqdm(range(0, num_samples, batch_size), desc="sample", unit="batch")):
        y = labels[start:start + batch_size]
        out = fn(wd.ema_params, key=jax.random.fold_in(key, i), labels=jnp.asarray(y), num_steps=num_steps,
                 eta=sm.eta if eta is None else eta,
                 guidance_scale=sm.guidance if guidance_scale is None else guidance_scale)
        chunks.append(imgs.to_uint8(out))
    return np.concatenate(chunks), labels


def sample_workdir(workdir: str, output: str, *, num_samples: int, seed: int = 0, sampler: str | None = None,
                   num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                   batch_size: int = 256, overwrite: bool = False, options: Mapping | None = None,
                   ema: float | None = None) -> str:
    """Writes ``output`` (.npz with uint8 ``images`` [N, H, W, C] and ``labels``) and a PNG grid beside it.

    ``sampler``, ``num_steps``, ``eta`` and ``guidance_scale`` override the run's ``config.sample``;
    ``options`` are the sampler's own (``scripts/sample.py --option name=value``); ``ema``: a
    ``sigma_rel`` whose post-hoc EMA reconstruction replaces the run's EMA (``load_workdir``);
    an override the run's model or sampler cannot use (``eta`` for a sampler without it or below 0,
    guidance for an unconditional model) is an error, raised before any work. So is an output
    that cannot be written (a directory, a folder without write permission) and, unless
    ``overwrite``, an output ``.npz`` or ``.png`` that already exists. Deterministic in ``seed``:
    batch ``i`` uses ``fold_in(key(seed), i)``.
    """
    if eta is not None and eta < 0:
        raise ValueError(f"--eta must be >= 0, got {eta}")
    _check_counts(num_samples, batch_size)
    npz_path, png_path = _check_output(output, overwrite)
    wd = load_workdir(workdir, ema=ema)
    images, labels = sample_images(wd, num_samples, seed=seed, sampler=sampler, num_steps=num_steps, eta=eta,
                                   guidance_scale=guidance_scale, batch_size=batch_size, options=options,
                                   prefix="--")
    run = wd.run
    arrays = {"images": images}
    if run.num_classes is not None:
        arrays["labels"] = labels
    np.savez(npz_path, **arrays)
    imgs.save_grid(images, png_path, ncols=run.num_classes or None)
    return output


def sample_pipeline(path: str, output: str, *, num_samples: int, seed: int = 0, sampler: str | None = None,
                    num_steps: int | None = None, eta: float | None = None, batch_size: int = 256,
                    overwrite: bool = False, options: Mapping | None = None) -> str:
    """Samples a diffusers ``DDPMPipeline`` / ``DDIMPipeline`` folder with any jaxdiff sampler.

    Writes ``output`` (.npz with uint8 ``images``) and a PNG grid beside it, like
    :func:`sample_workdir`. The pipeline's scheduler gives the schedule, the prediction type and
    ``clip_sample``; its own sampler (``ddpm`` / ``ddim``) and variance are the defaults. Every
    argument and the output are checked before any work.
    """
    import json

    from jaxdiff.models import from_diffusers_pipeline

    _check_counts(num_samples, batch_size)
    npz_path, png_path = _check_output(output, overwrite)
    pipe = from_diffusers_pipeline(path)
    defaults = pipe.sampling
    sampler = sampler or defaults.sampler
    opts = dict(options or {})
    if eta is not None:
        opts["eta"] = eta
    spec = registry.check(sampler, num_steps=num_steps, num_timesteps=pipe.schedule.num_timesteps, options=opts,
                          prefix="--")
    learned = bool(pipe.model.learn_sigma)
    if "variance" in spec.options and "variance" not in opts and sampler == defaults.sampler and defaults.variance:
        opts["variance"] = defaults.variance
    with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
        unet_config = json.load(f)
    size, channels = unet_config.get("sample_size"), unet_config.get("in_channels", 3)
    if not isinstance(size, int):
        raise ValueError(f"{path}/unet/config.json: sample_size={size!r}; sampling needs one square image size")

    def model_fn(x, t):
        out = pipe.model.apply({"params": pipe.params}, x, t)
        return out if opts.get("variance") == "learned_range" or not learned else out[..., :channels]

    @jax.jit
    def draw(key, n):
        return samplers.sample(pipe.schedule, model_fn, key, (batch_size, size, size, channels), sampler=sampler,
                               num_steps=None if spec.adaptive else n, prediction=defaults.prediction,
                               clip_x0=defaults.clip_x0, **opts)

    n = num_steps if num_steps is not None else registry.default_num_steps(sampler, pipe.schedule.num_timesteps)
    key = jax.random.key(seed)
    chunks = [imgs.to_uint8(draw(jax.random.fold_in(key, i), n))
              for i in tqdm(range(-(-num_samples // batch_size)), desc="sample", unit="batch")]
    images = np.concatenate(chunks)[:num_samples]
    np.savez(npz_path, images=images)
    imgs.save_grid(images, png_path)
    return output

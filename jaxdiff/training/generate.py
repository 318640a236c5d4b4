"""Images from a trained workdir (``sample_images``, ``sample_workdir``) or a diffusers pipeline folder.

A workdir is sampled through its run's sampling function (``Run.sampling``,
:mod:`jaxdiff.training.sampling`, which also holds the pure :func:`generate`), the same one the
training job's grids and the FID evaluation use. ``sample_workdir`` never loses work: every
check, the output files' included, is done before the first image is generated, and an
existing output is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import samplers
from jaxdiff.samplers import registry
from jaxdiff.training import images as imgs
from jaxdiff.training.sampling import check_options, generate
from jaxdiff.training.workdir import load_workdir

__all__ = ["generate", "sample_images", "sample_workdir", "sample_pipeline", "expand_labels"]


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
      labels: ``[N]`` class labels of a class-conditional model (default: the grid order of
        :func:`~jaxdiff.training.images.grid_labels`, ``num_classes`` of each class in turn:
        sample ``i`` has label ``(i // num_classes) % num_classes``, so 20 samples of a 10-class
        model are ten 0s, then ten 1s, and row ``r`` of the 10-column PNG grid is class ``r``).
      options: the sampler's own options (``scripts/sample.py --option name=value``).
      ema: a ``sigma_rel`` whose post-hoc EMA reconstruction replaces the run's EMA (only when
        ``workdir`` is a path; see :func:`~jaxdiff.training.workdir.load_workdir`).
    Deterministic in ``seed``: batch ``i`` uses ``fold_in(key(seed), i)``. A latent run's samples are decoded
    by its autoencoder (``Run.to_images``).
    """
    _check_counts(num_samples, batch_size)
    wd = load_workdir(workdir, ema=ema) if isinstance(workdir, str) else workdir
    run = wd.run
    sampling = run.sampling(sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale,
                            options=options, prefix=prefix)
    if labels is None:
        labels = imgs.grid_labels(num_samples, run.num_classes)
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
        raise ValueError(f"labels must have shape [num_samples]=({num_samples},), got {labels.shape}")
    batches = sampling.batches(wd.ema_params, jax.random.key(seed), labels, batch_size)
    chunks = [imgs.to_uint8(run.to_images(out)) for out in tqdm(batches, desc="sample", unit="batch",
                                                                  total=-(-num_samples // batch_size))]
    return np.concatenate(chunks), labels


def expand_labels(labels, num_samples: int, num_classes: int | None, name: str = "--labels") -> np.ndarray:
    """int32 ``[num_samples]`` labels from ``labels``: ``"cycle"`` (``0, 1, ..., num_classes - 1, 0, ...``) or
    class ids ``[K]`` repeated over the samples (``[3]``: all threes; ``[0, 1]``: ``0, 1, 0, 1, ...``).

    ``ValueError`` naming ``name``: an unconditional model (``num_classes=None``), no ids, an id outside
    ``[0, num_classes)``.
    """
    if num_classes is None:
        raise ValueError(f"{name}: the model is unconditional (it takes no class labels)")
    if isinstance(labels, str):
        if labels != "cycle":
            raise ValueError(f"{name} must be 'cycle' or class ids, got {labels!r}")
        return (np.arange(num_samples) % num_classes).astype(np.int32)
    ids = np.asarray(labels)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be 'cycle' or a list of class ids, got {labels!r}")
    bad = ids[(ids < 0) | (ids >= num_classes)]
    if bad.size:
        raise ValueError(f"{name}: class {int(bad[0])} is out of range: the model has num_classes={num_classes} "
                         f"(ids 0..{num_classes - 1})")
    return np.resize(ids, num_samples).astype(np.int32)


def sample_workdir(workdir: str, output: str, *, num_samples: int, seed: int = 0, sampler: str | None = None,
                   num_steps: int | None = None, eta: float | None = None, guidance_scale: float | None = None,
                   batch_size: int = 256, overwrite: bool = False, options: Mapping | None = None,
                   ema: float | None = None, labels=None) -> str:
    """Writes ``output`` (.npz with uint8 ``images`` [N, H, W, C] and ``labels``) and a PNG grid beside it.

    ``labels`` (``--labels``) of a class-conditional model: ``None`` (the grid order of
    :func:`sample_images`: sample ``i`` has class ``(i // num_classes) % num_classes``, ten 0s, then
    ten 1s, ... for 10 classes, so that row ``r`` of the grid shows class ``r``), ``"cycle"`` or class
    ids repeated over the samples (:func:`~jaxdiff.training.generate.expand_labels`), checked against
    the model's ``num_classes`` before sampling.
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
    if labels is not None:
        labels = expand_labels(labels, num_samples, wd.run.num_classes)
    images, labels = sample_images(wd, num_samples, seed=seed, sampler=sampler, num_steps=num_steps, eta=eta,
                                   guidance_scale=guidance_scale, labels=labels, batch_size=batch_size,
                                   options=options, prefix="--")
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
    check_options(sampler, opts, eta=eta, prefix="--")
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

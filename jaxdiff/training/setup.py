"""From a config to the run's facts: validated once at start-up, then explicit values.

:func:`resolve` is the boundary where a ``ConfigDict`` becomes a :class:`Run` (the data source,
image shape, number of classes, schedule, model and optimizer); the loop, the workdir loader
and the evaluation all start from it, and nothing below it takes a config. Every bad setting
raises ``ValueError("config.SECTION.NAME=VALUE: why")`` before anything is compiled or saved.
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import optax

from jaxdiff import data, posthoc_ema, schedules
from jaxdiff.diffusion import PREDICTIONS
from jaxdiff.losses import WEIGHTINGS
from jaxdiff.metrics.stats import FEATURES
from jaxdiff.models import PRESETS, UNet, check_image_size, get_model
from jaxdiff.samplers import registry
from jaxdiff.training.parallel import MODES
from jaxdiff.training.state import make_optimizer

__all__ = ["Run", "resolve", "validate_config", "make_schedule", "make_model", "get_config", "SCHEDULES",
           "OBJECTIVES", "MODEL_OVERRIDES"]

SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = registry.OBJECTIVES
DTYPES = ("float32", "bfloat16", "float16")
# config.model fields that override the preset's UNet fields when set (None: the preset's value).
MODEL_OVERRIDES = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "scale_shift", "num_heads")


def _fail(setting: str, value, why: str):
    raise ValueError(f"config.{setting}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class Run:
    """The facts of a run, derived once from its config by :func:`resolve`."""

    config: object  # the ConfigDict it came from
    source: data.Source  # the training data
    image_shape: tuple[int, int, int]  # (H, W, C) of the images the model sees
    num_classes: int | None  # labels of a class-conditional model (None: unconditional)
    schedule: schedules.Schedule
    model: UNet
    tx: optax.GradientTransformation

    @property
    def objective(self) -> str:
        return self.config.diffusion.objective


def validate_config(config, *, num_devices: int | None = None) -> None:
    """Checks every setting that needs no data; raises ValueError naming the first bad one.

    ``num_devices``: check that the global batch divides over them (``None``: skip, e.g. when sampling).
    """
    tr, df, sm, md = config.train, config.diffusion, config.sample, config.model
    for name in ("num_steps", "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        if not isinstance(tr[name], int) or tr[name] <= 0:
            _fail(f"train.{name}", tr[name], "must be a positive integer")
    if tr.sample_every < 0:
        _fail("train.sample_every", tr.sample_every, "must be >= 0 (0: only at the end)")
    if tr.warmup_steps < 0:
        _fail("train.warmup_steps", tr.warmup_steps, "must be >= 0")
    if not tr.learning_rate > 0:
        _fail("train.learning_rate", tr.learning_rate, "must be positive")
    if not 0.0 <= tr.ema_decay < 1.0:
        _fail("train.ema_decay", tr.ema_decay, "must lie in [0, 1)")
    if not 0.0 <= tr.label_dropout < 1.0:
        _fail("train.label_dropout", tr.label_dropout, "must lie in [0, 1)")
    if num_devices is not None and tr.global_batch_size % num_devices:
        _fail("train.global_batch_size", tr.global_batch_size,
              f"must be divisible by the number of devices ({num_devices})")
    if config.parallel.mode not in MODES:
        _fail("parallel.mode", config.parallel.mode, f"must be one of {MODES}")
    if df.objective not in OBJECTIVES:
        _fail("diffusion.objective", df.objective, f"must be one of {OBJECTIVES}")
    if df.objective == "flow_matching" and df.learned_variance:
        _fail("diffusion.learned_variance", True, "flow matching has no variance to learn")
    if df.objective == "edm":
        if df.learned_variance:
            _fail("diffusion.learned_variance", True, "an EDM denoiser has no variance to learn")
        for name in ("sigma_data", "p_std"):
            if not df[name] > 0:
                _fail(f"diffusion.{name}", df[name], "must be positive")
    phema = tr.get("posthoc_ema")
    if phema is not None and len(phema.sigma_rels):
        try:
            posthoc_ema.sigma_rel_to_gamma(phema.sigma_rels)
        except ValueError as error:
            _fail("train.posthoc_ema.sigma_rels", phema.sigma_rels, str(error))
        if not isinstance(phema.snapshot_every, int) or phema.snapshot_every <= 0:
            _fail("train.posthoc_ema.snapshot_every", phema.snapshot_every, "must be a positive integer")
    if df.schedule not in SCHEDULES:
        _fail("diffusion.schedule", df.schedule, f"must be one of {SCHEDULES}")
    if df.num_timesteps <= 0:
        _fail("diffusion.num_timesteps", df.num_timesteps, "must be a positive integer")
    if df.prediction not in PREDICTIONS:
        _fail("diffusion.prediction", df.prediction, f"must be one of {PREDICTIONS}")
    if df.weighting not in WEIGHTINGS:
        _fail("diffusion.weighting", df.weighting, f"must be one of {WEIGHTINGS}")
    if not df.min_snr_gamma > 0:
        _fail("diffusion.min_snr_gamma", df.min_snr_gamma, "must be positive")
    adaptive = sm.sampler in registry.SAMPLERS and registry.SAMPLERS[sm.sampler].adaptive
    registry.check(sm.sampler, objective=df.objective, num_steps=None if adaptive else sm.num_steps,
                   num_timesteps=df.num_timesteps, prefix="config.sample.")
    if sm.eta < 0:
        _fail("sample.eta", sm.eta, "must be >= 0")
    if sm.guidance != 1.0 and not md.class_conditional:
        _fail("sample.guidance", sm.guidance, "must be 1 for an unconditional model (model.class_conditional=False)")
    if sm.num_samples <= 0:
        _fail("sample.num_samples", sm.num_samples, "must be positive")
    if md.get("preset") is not None and md.preset not in PRESETS:
        _fail("model.preset", md.preset, f"must be one of {tuple(PRESETS)}")
    if md.dtype not in DTYPES:
        _fail("model.dtype", md.dtype, f"must be one of {DTYPES}")
    if config.get("eval") is not None:
        _validate_eval(config.eval, sm.sampler, df.objective, df.num_timesteps, files=num_devices is not None)


def _validate_eval(ev, sampler: str, objective: str, num_timesteps: int, *, files: bool) -> None:
    """``config.eval`` (:mod:`jaxdiff.training.quality`) when an evaluation is on. ``files``: check that its
    files exist (for a training run; a restored workdir may be sampled where they are absent)."""
    for name in ("every", "final_samples"):
        if not isinstance(ev[name], int) or ev[name] < 0:
            _fail(f"eval.{name}", ev[name], "must be an integer >= 0 (0: off)")
    if not (ev.every or ev.final_samples):
        return
    for name in ("num_samples", "final_samples"):
        if ev[name] and ev[name] < 4:
            _fail(f"eval.{name}", ev[name], "must be >= 4 (statistics, KID and precision/recall need samples)")
    if ev.batch_size <= 0:
        _fail("eval.batch_size", ev.batch_size, "must be positive")
    if ev.features not in FEATURES:
        _fail("eval.features", ev.features, f"must be one of {FEATURES}")
    if ev.features == "inception" and not ev.inception:
        _fail("eval.inception", ev.inception, "eval.features='inception' needs the FID Inception weights file")
    for name in ("inception", "ref_stats"):
        if files and ev[name] and not os.path.isfile(ev[name]):
            _fail(f"eval.{name}", ev[name], "no such file")
    if ev.steps < 0:
        _fail("eval.steps", ev.steps, "must be >= 0 (0: config.sample.num_steps)")
    if ev.sampler or ev.steps:
        registry.check(ev.sampler or sampler, objective=objective, num_steps=ev.steps or None,
                       num_timesteps=num_timesteps, prefix="config.eval.")


def make_schedule(diffusion_config) -> schedules.Schedule:
    """The noise schedule named by ``config.diffusion``."""
    T = diffusion_config.num_timesteps
    if diffusion_config.schedule == "linear":
        return schedules.linear_schedule(T, diffusion_config.beta_start, diffusion_config.beta_end)
    if diffusion_config.schedule == "cosine":
        return schedules.cosine_schedule(T)
    if diffusion_config.schedule == "sigmoid":
        return schedules.sigmoid_schedule(T)
    _fail("diffusion.schedule", diffusion_config.schedule, f"must be one of {SCHEDULES}")


def make_model(model_config, *, num_classes: int | None, learned_variance: bool) -> UNet:
    """The UNet of ``config.model``: the preset ``model.preset`` with the fields that are set overriding it.

    ``num_classes`` is used only if ``model.class_conditional``.
    """
    overrides = {k: model_config.get(k) for k in MODEL_OVERRIDES if model_config.get(k) is not None}
    for k in ("ch_mult", "attn_resolutions"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    return get_model(
        model_config.get("preset") or "digits",
        **overrides,
        num_classes=num_classes if model_config.class_conditional else None,
        learn_sigma=learned_variance,
        dtype=jnp.dtype(model_config.dtype),
        remat=model_config.remat,
    )


def resolve(config, *, num_devices: int | None = None) -> Run:
    """Validates ``config`` and derives the run's facts (reads the dataset's metadata, builds nothing heavy)."""
    validate_config(config, num_devices=num_devices)
    try:
        source = data.make_source(config.data.name, config.data.split, config.data.data_dir or None)
    except ValueError as error:
        raise ValueError(f"config.data.name={config.data.name!r}: {error}") from None
    info = source.info
    size = config.data.image_size or None
    image_shape = (size, size, info.image_shape[2]) if size else tuple(info.image_shape)
    if None in image_shape:
        _fail("data.image_size", config.data.image_size, f"dataset {info.name!r} has images of varying size; set it")
    ev = config.get("eval")
    if ev is not None and (ev.every or ev.final_samples) and ev.features == "digits" and image_shape != (8, 8, 1):
        _fail("eval.features", "digits", f"the digits network takes 8x8x1 images; this run makes {image_shape}")
    if config.model.class_conditional and info.num_classes is None:
        _fail("model.class_conditional", True, f"dataset {info.name!r} has no labels")
    num_classes = info.num_classes if config.model.class_conditional else None
    model = make_model(config.model, num_classes=num_classes, learned_variance=config.diffusion.learned_variance)
    try:
        check_image_size(image_shape[0], model.ch_mult)
    except ValueError as error:
        _fail("data.image_size" if size else "model.ch_mult", size or model.ch_mult, str(error))
    tr = config.train
    tx = make_optimizer(tr.learning_rate, warmup_steps=tr.warmup_steps, grad_clip=tr.grad_clip)
    return Run(config=config, source=source, image_shape=image_shape, num_classes=num_classes,
               schedule=make_schedule(config.diffusion), model=model, tx=tx)


def get_config(name: str):
    """The config ``configs/NAME.py`` of the installed package (e.g. ``"digits"``), locked.

    Locked like ``--config`` on the command line: setting a field that does not exist
    (``config.train.num_step = 5``) raises instead of adding a new, silently unused field.
    """
    import importlib

    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as error:
        if error.name not in ("configs", f"configs.{name}"):
            raise
        import configs

        known = sorted(n[:-3] for n in os.listdir(os.path.dirname(configs.__file__))
                       if n.endswith(".py") and not n.startswith("_"))
        raise ValueError(f"config name {name!r} is unknown; known configs: {known}") from None
    config = module.get_config()
    config.lock()
    return config

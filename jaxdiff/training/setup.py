"""From a config to the run's facts: validated once at start-up, then explicit values.

:func:`resolve` is the boundary where a ``ConfigDict`` becomes a :class:`Run` (the data source,
image shape, number of classes, schedule, model and optimizer); the loop, the workdir loader
and the evaluation all start from it, and nothing below it takes a config. Every bad setting
raises ``ValueError("config.SECTION.NAME=VALUE: why")`` before anything is compiled or saved.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import optax

from jaxdiff import data, objectives, posthoc_ema, schedules
from jaxdiff.metrics.stats import FEATURES
from jaxdiff.models import PRESETS, DiT, UNet, check_model_image_size, get_model
from jaxdiff.models.dit import MLPS, NORMS
from jaxdiff.objectives.diffusion import SCHEDULES, schedule_from_config
from jaxdiff.samplers import registry
from jaxdiff.training.parallel import MODES
from jaxdiff.training.sampling import Sampling, check_overrides, network
from jaxdiff.training.state import make_optimizer

__all__ = ["Run", "resolve", "validate_config", "make_schedule", "make_model", "get_config", "SCHEDULES",
           "OBJECTIVES", "MODEL_OVERRIDES", "DIT_OVERRIDES"]

OBJECTIVES = objectives.names()
DTYPES = ("float32", "bfloat16", "float16")
# How the UNet's stride-1 convolutions are differentiated (jaxdiff.models.conv): "auto" picks the
# matmul weight gradient ("taps", faster on XLA:CPU, bench/conv_backward.py) on the CPU backend and
# XLA's own ("xla", the UNet's default) elsewhere. A platform choice, so the setup makes it, not the model.
CONV_BACKWARDS = ("auto", "xla", "taps")
# config.model fields that override the preset's UNet fields when set (None: the preset's value).
MODEL_OVERRIDES = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "scale_shift", "num_heads",
                   "norm_groups")
# config.model fields that set a DiT preset's block options (jaxdiff.models.dit; None: the preset's value).
DIT_OVERRIDES = ("norm", "qk_norm", "mlp", "rope")


def _fail(setting: str, value, why: str):
    raise ValueError(f"config.{setting}={value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class Run:
    """The facts of a run, derived once from its config by :func:`resolve`."""

    config: object  # the ConfigDict it came from
    source: data.Source  # the training data
    image_shape: tuple[int, int, int]  # (H, W, C) of the images the model sees
    num_classes: int | None  # labels of a class-conditional model (None: unconditional)
    objective: objectives.Objective  # what is trained (jaxdiff.objectives), built from config.diffusion
    model: UNet
    tx: optax.GradientTransformation

    @property
    def schedule(self) -> schedules.Schedule | None:
        """The objective's discrete schedule (``None`` for objectives without one)."""
        return getattr(self.objective, "schedule", None)

    def network(self, params, labels=None, guidance_scale=1.0):
        """``net(x [N, ...], time [N])`` of this run's model with ``params`` bound: ``labels`` ``[N]`` guided
        with ``guidance_scale`` (:func:`jaxdiff.training.sampling.network`), or, for ``labels=None``, the
        unconditional model (the null label of a class-conditional one)."""
        if labels is None and self.num_classes is not None:
            return lambda x, t: self.model.apply({"params": params}, x, t,
                                                 jnp.full((x.shape[0],), self.num_classes, jnp.int32), train=False)
        return network(self.model.apply, params, labels, num_classes=self.num_classes, guidance_scale=guidance_scale,
                       guided_channels=self.image_shape[-1])

    def sampling(self, *, sampler: str | None = None, num_steps: int | None = None, eta: float | None = None,
                 guidance_scale: float | None = None, options=None, prefix: str = "--") -> Sampling:
        """The run's sampling function: ``config.sample`` with the overrides that are not None.

        Checked now, before any work (``ValueError`` naming ``prefix + setting``): a sampler that does
        not serve the objective, an option it does not take, ``eta < 0``, guidance below 0 or on an
        unconditional model. Every caller that draws samples of a run uses it.
        """
        sm = self.config.sample
        sampler = sampler or sm.sampler
        opts = dict(options or {})
        check_overrides(self.objective, self.num_classes, sampler, num_steps=num_steps, eta=eta,
                        guidance_scale=guidance_scale, options=opts, prefix=prefix)
        return Sampling(objective=self.objective, apply_fn=self.model.apply, image_shape=tuple(self.image_shape),
                        num_classes=self.num_classes, sampler=sampler,
                        num_steps=sm.num_steps if num_steps is None else num_steps,
                        eta=sm.eta if eta is None else eta,
                        guidance_scale=sm.guidance if guidance_scale is None else guidance_scale,
                        clip_x0=sm.clip_x0, options=opts)


def validate_config(config, *, num_devices: int | None = None) -> objectives.Objective:
    """Checks every setting that needs no data; raises ValueError naming the first bad one.

    Returns the run's objective (:func:`jaxdiff.objectives.from_config`), built while checking.

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
    objective = objectives.from_config(df)  # checks the settings the objective uses
    phema = tr.get("posthoc_ema")
    if phema is not None and len(phema.sigma_rels):
        try:
            posthoc_ema.sigma_rel_to_gamma(phema.sigma_rels)
        except ValueError as error:
            _fail("train.posthoc_ema.sigma_rels", phema.sigma_rels, str(error))
        if not isinstance(phema.snapshot_every, int) or phema.snapshot_every <= 0:
            _fail("train.posthoc_ema.snapshot_every", phema.snapshot_every, "must be a positive integer")
    adaptive = sm.sampler in registry.SAMPLERS and registry.SAMPLERS[sm.sampler].adaptive
    objective.check_sampler(sm.sampler, num_steps=None if adaptive else sm.num_steps, prefix="config.sample.")
    if sm.eta < 0:
        _fail("sample.eta", sm.eta, "must be >= 0")
    if sm.guidance < 0:
        _fail("sample.guidance", sm.guidance, "must be >= 0")
    if sm.guidance != 1.0 and not md.class_conditional:
        _fail("sample.guidance", sm.guidance, "must be 1 for an unconditional model (model.class_conditional=False)")
    if sm.num_samples <= 0:
        _fail("sample.num_samples", sm.num_samples, "must be positive")
    if md.get("preset") is not None and md.preset not in PRESETS:
        _fail("model.preset", md.preset, f"must be one of {tuple(PRESETS)}")
    dit_set = [k for k in DIT_OVERRIDES if md.get(k) is not None]
    preset = md.get("preset") or "digits"
    if dit_set and PRESETS[preset].func is not DiT:
        _fail(f"model.{dit_set[0]}", md[dit_set[0]], f"is a DiT block option; model.preset={preset!r} is not a DiT")
    for name, allowed in (("norm", NORMS), ("mlp", MLPS)):  # qk_norm and rope: bool placeholders
        if md.get(name) is not None and md[name] not in allowed:
            _fail(f"model.{name}", md[name], f"must be one of {allowed}")
    if md.dtype not in DTYPES:
        _fail("model.dtype", md.dtype, f"must be one of {DTYPES}")
    if md.get("conv_backward", "auto") not in CONV_BACKWARDS:
        _fail("model.conv_backward", md.conv_backward, f"must be one of {CONV_BACKWARDS}")
    if config.get("eval") is not None:
        _validate_eval(config.eval, sm.sampler, objective, files=num_devices is not None)
    return objective


def _validate_eval(ev, sampler: str, objective: objectives.Objective, *, files: bool) -> None:
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
        objective.check_sampler(ev.sampler or sampler, num_steps=ev.steps or None, prefix="config.eval.")


def make_schedule(diffusion_config) -> schedules.Schedule:
    """The noise schedule named by ``config.diffusion`` (``ValueError`` naming the bad field)."""
    return schedule_from_config(diffusion_config)


def make_model(model_config, *, num_classes: int | None, learned_variance: bool, time_inputs: int = 1) -> UNet:
    """The UNet of ``config.model``: the preset ``model.preset`` with the fields that are set overriding it.

    ``num_classes`` is used only if ``model.class_conditional``; ``learned_variance`` and
    ``time_inputs`` are the objective's (:class:`jaxdiff.objectives.Objective`).
    """
    overrides = {k: model_config.get(k) for k in MODEL_OVERRIDES + DIT_OVERRIDES if model_config.get(k) is not None}
    for k in ("ch_mult", "attn_resolutions"):
        if k in overrides:
            overrides[k] = tuple(overrides[k])
    conv = model_config.get("conv_backward") or "auto"
    if conv == "auto":
        conv = "taps" if jax.default_backend() == "cpu" else "xla"
    return get_model(
        model_config.get("preset") or "digits",
        **overrides,
        conv_backward=conv,
        num_classes=num_classes if model_config.class_conditional else None,
        learn_sigma=learned_variance,
        dtype=jnp.dtype(model_config.dtype),
        remat=model_config.remat,
        time_inputs=time_inputs,
    )


def resolve(config, *, num_devices: int | None = None) -> Run:
    """Validates ``config`` and derives the run's facts (reads the dataset's metadata, builds nothing heavy)."""
    objective = validate_config(config, num_devices=num_devices)
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
    model = make_model(config.model, num_classes=num_classes, learned_variance=objective.learned_variance,
                       time_inputs=objective.time_inputs)
    try:
        check_model_image_size(model, image_shape[0])
    except ValueError as error:
        field = "patch_size" if hasattr(model, "patch_size") else "ch_mult"
        _fail("data.image_size" if size else f"model.{field}", size or getattr(model, field), str(error))
    tr = config.train
    tx = make_optimizer(tr.learning_rate, warmup_steps=tr.warmup_steps, grad_clip=tr.grad_clip)
    return Run(config=config, source=source, image_shape=image_shape, num_classes=num_classes, objective=objective,
               model=model, tx=tx)


def get_config(name: str):
    """The config ``jaxdiff/configs/NAME.py`` of the installed package (e.g. ``"digits"``), locked.

    Locked like ``--config`` on the command line: setting a field that does not exist
    (``config.train.num_step = 5``) raises instead of adding a new, silently unused field.
    """
    import importlib

    try:
        module = importlib.import_module(f"jaxdiff.configs.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"jaxdiff.configs.{name}":
            raise
        from jaxdiff import configs

        known = sorted(n[:-3] for n in os.listdir(os.path.dirname(configs.__file__))
                       if n.endswith(".py") and not n.startswith("_"))
        raise ValueError(f"config name {name!r} is unknown; known configs: {known}") from None
    config = module.get_config()
    config.lock()
    return config

"""From a config to the run's facts: validated once at start-up, then explicit values.

:func:`resolve` is the boundary where a ``ConfigDict`` becomes a :class:`Run` (the data source,
image shape, number of classes, schedule, model and optimizer); the loop, the workdir loader
and the evaluation all start from it, and nothing below it takes a config. Every bad setting
raises ``ValueError("config.SECTION.NAME=VALUE: why")`` before anything is compiled or saved.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import optax

from jaxdiff import data, latents, objectives, posthoc_ema, schedules
from jaxdiff.metrics.digits import check_digits_shape
from jaxdiff.metrics.stats import FEATURES
from jaxdiff.models import PRESETS, DiT, UNet, check_model_image_size, get_model
from jaxdiff.models.dit import MLPS, NORMS
from jaxdiff.objectives.diffusion import SCHEDULES, schedule_from_config
from jaxdiff.samplers import registry
from jaxdiff.training.parallel import MIN_SHARDED_SIZE, MODES, DataParallel, mesh_shape
from jaxdiff.training.sampling import Sampling, check_overrides, network
from jaxdiff.training.state import make_optimizer

__all__ = ["Run", "resolve", "validate_config", "compute_dtype", "make_schedule", "make_model", "get_config",
           "SCHEDULES", "OBJECTIVES", "MODEL_OVERRIDES", "DIT_OVERRIDES", "make_parallel"]

OBJECTIVES = objectives.names()
# config.train.compute_dtype / param_dtype: the network's computation dtype and its parameters' (the
# master weights, the optimizer state and the EMAs take the params' dtype). A platform choice, made here.
DTYPES = ("float32", "bfloat16")
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
    param_dtype: jnp.dtype = jnp.dtype("float32")  # of the master weights (config.train.param_dtype)
    # A latent run (config.data.latents): the latents' manifest and the autoencoder folder that decodes;
    # image_shape is then the latent shape, and the run's images come from decoding (to_images).
    latents: latents.Manifest | None = None
    vae: str = ""

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """The shape ``(H, W, C)`` of the images the run makes (``image_shape``, or that of a latent run's decoded
        images)."""
        return tuple(self.latents.image_shape) if self.latents else tuple(self.image_shape)

    @property
    def image_source(self) -> data.Source:
        """The images the run's samples are compared with (the training data, or the images a latent run's
        latents were encoded from, read at :attr:`image_size`)."""
        return self.latents.image_source() if self.latents else self.source

    @property
    def image_size(self) -> int | None:
        """The size :attr:`image_source`'s images are read at (``jaxdiff.data.get_batch``'s ``image_size``)."""
        size = self.latents.dataset["image_size"] if self.latents else self.config.data.image_size
        return size or None

    @functools.cached_property
    def autoencoder(self) -> latents.Autoencoder | None:
        """A latent run's autoencoder (``config.data.vae`` or the manifest's folder), loaded on first use; else None."""
        name = "config.data.vae" if self.config.data.get("vae") else "the latents' manifest autoencoder.path"
        return latents.load_autoencoder(self.vae, name=name) if self.latents else None

    def to_images(self, x, *, batch_size: int = 64):
        """The run's samples ``x`` ``[N, ...]`` as images ``[N, H, W, C]`` in [-1, 1]: a latent run's decoded
        (:mod:`jaxdiff.latents`), a pixel run's as they are."""
        return self.autoencoder.decode_images(x, batch_size=batch_size) if self.latents else x

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
    if not 0.0 < tr.get("adam_b2", 0.999) < 1.0:
        _fail("train.adam_b2", tr.adam_b2, "must lie in (0, 1)")
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
    if config.parallel.mode == "fsdp" and num_devices is not None:
        try:
            mesh_shape(num_devices, config.parallel.get("data", 1), config.parallel.get("fsdp", -1))
        except ValueError as error:
            raise ValueError(str(error).replace("parallel.", "config.parallel.")) from None
        min_size = config.parallel.get("min_shard_size", MIN_SHARDED_SIZE)
        if not isinstance(min_size, int) or min_size < 0:
            _fail("parallel.min_shard_size", min_size, "must be an integer >= 0")
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
    compute_dtype(config)  # checks config.train.compute_dtype (and the removed config.model.dtype)
    if tr.get("param_dtype", "float32") not in DTYPES:
        _fail("train.param_dtype", tr.param_dtype, f"must be one of {DTYPES}")
    k = tr.get("microbatches", 1)
    if not isinstance(k, int) or k <= 0:
        _fail("train.microbatches", k, "must be a positive integer")
    per_device = tr.global_batch_size // num_devices if num_devices else None
    if per_device is not None and per_device % k:
        _fail("train.microbatches", k, f"must divide the per-device batch of {per_device} examples "
              f"(train.global_batch_size={tr.global_batch_size} over {num_devices} devices)")
    if not tr.get("peak_flops", 0.0) >= 0:
        _fail("train.peak_flops", tr.peak_flops, "must be >= 0 (0: from the device's kind)")
    dit_set = [k for k in DIT_OVERRIDES if md.get(k) is not None]
    preset = md.get("preset") or "digits"
    if dit_set and PRESETS[preset].func is not DiT:
        _fail(f"model.{dit_set[0]}", md[dit_set[0]], f"is a DiT block option; model.preset={preset!r} is not a DiT")
    for name, allowed in (("norm", NORMS), ("mlp", MLPS)):  # qk_norm and rope: bool placeholders
        if md.get(name) is not None and md[name] not in allowed:
            _fail(f"model.{name}", md[name], f"must be one of {allowed}")
    if md.get("conv_backward", "auto") not in CONV_BACKWARDS:
        _fail("model.conv_backward", md.conv_backward, f"must be one of {CONV_BACKWARDS}")
    if config.get("eval") is not None:
        _validate_eval(config.eval, sm.sampler, objective, files=num_devices is not None)
    dt = config.data
    if dt.get("latent_draw", "sample") not in latents.DRAWS:
        _fail("data.latent_draw", dt.latent_draw, f"must be one of {latents.DRAWS}")
    if dt.get("latents") and sm.clip_x0:
        _fail("sample.clip_x0", True, "a latent run (data.latents) samples latents, not images in [-1, 1]; set False")
    return objective


def compute_dtype(config) -> jnp.dtype:
    """The network's computation dtype, ``config.train.compute_dtype`` (``ValueError`` naming the setting).

    ``config.model.dtype`` is its former name: setting it raises, except in the config of a workdir
    written before ``train.compute_dtype`` existed, where it is read as that.
    """
    tr, md = config.train, config.model
    legacy = md.get("dtype")
    if legacy is not None and "compute_dtype" in tr:
        _fail("model.dtype", legacy, "was replaced by config.train.compute_dtype (set that instead)")
    name = tr.get("compute_dtype", legacy or "float32")
    if name not in DTYPES:
        _fail("train.compute_dtype" if "compute_dtype" in tr else "model.dtype", name, f"must be one of {DTYPES}")
    return jnp.dtype(name)


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


def make_model(model_config, *, num_classes: int | None, learned_variance: bool, time_inputs: int = 1,
               dtype="float32") -> UNet:
    """The UNet of ``config.model``: the preset ``model.preset`` with the fields that are set overriding it.

    ``num_classes`` is used only if ``model.class_conditional``; ``learned_variance`` and
    ``time_inputs`` are the objective's (:class:`jaxdiff.objectives.Objective`); ``dtype``: the
    computation dtype (:func:`compute_dtype`: ``config.train.compute_dtype``).
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
        dtype=jnp.dtype(dtype),
        remat=model_config.remat,
        time_inputs=time_inputs,
    )


def resolve(config, *, num_devices: int | None = None, load_workdir=None) -> Run:
    """Validates ``config`` and derives the run's facts (reads the dataset's metadata, builds nothing heavy).

    A training run (``num_devices`` given) also loads what its objective needs only to train
    (:meth:`jaxdiff.objectives.Objective.for_run`: a distillation teacher, read by ``load_workdir``,
    :func:`jaxdiff.training.workdir.load_workdir`, which the training loop passes in)."""
    objective = validate_config(config, num_devices=num_devices)
    dt = config.data
    manifest, vae = None, ""
    if dt.get("latents"):
        source, image_shape = _latent_source(dt)
        manifest, vae = source.manifest, dt.get("vae") or source.manifest.autoencoder["path"]
        output_shape = manifest.image_shape
    else:
        try:
            source = data.make_source(dt.name, dt.split, dt.data_dir or None)
        except ValueError as error:
            raise ValueError(f"config.data.name={dt.name!r}: {error}") from None
        size = dt.image_size or None
        image_shape = (size, size, source.info.image_shape[2]) if size else tuple(source.info.image_shape)
        if None in image_shape:
            _fail("data.image_size", dt.image_size, f"dataset {dt.name!r} has images of varying size; set it")
        output_shape = image_shape
    info, size = source.info, dt.image_size or None
    ev = config.get("eval")
    if ev is not None and (ev.every or ev.final_samples) and ev.features == "digits":
        try:
            check_digits_shape(output_shape)
        except ValueError as error:
            _fail("eval.features", "digits", str(error))
    if config.model.class_conditional and info.num_classes is None:
        _fail("model.class_conditional", True, f"dataset {info.name!r} has no labels")
    num_classes = info.num_classes if config.model.class_conditional else None
    objective = objective.for_run(config, image_shape=image_shape, num_classes=num_classes,
                                  training=num_devices is not None, load_workdir=load_workdir)
    model = make_model(config.model, num_classes=num_classes, learned_variance=objective.learned_variance,
                       time_inputs=objective.time_inputs, dtype=compute_dtype(config))
    try:
        check_model_image_size(model, image_shape[0])
    except ValueError as error:
        field = "patch_size" if hasattr(model, "patch_size") else "ch_mult"
        if size and manifest is None:
            _fail("data.image_size", size, str(error))
        _fail(f"model.{field}", getattr(model, field), f"{error}{' (the latent size)' if manifest else ''}")
    tr = config.train
    tx = make_optimizer(tr.learning_rate, warmup_steps=tr.warmup_steps, grad_clip=tr.grad_clip,
                        b2=tr.get("adam_b2", 0.999))
    return Run(config=config, source=source, image_shape=image_shape, num_classes=num_classes, objective=objective,
               model=model, tx=tx, latents=manifest, vae=vae,
               param_dtype=jnp.dtype(tr.get("param_dtype", "float32")))


def _latent_source(dt) -> tuple[latents.LatentSource, tuple[int, int, int]]:
    """The latents of ``config.data.latents`` and their shape; the folder must be a complete encoding of
    ``config.data``'s images (name, split, image size) and hold flips if ``random_flip`` asks for them."""
    try:
        source = latents.LatentSource(dt.latents, draw=dt.get("latent_draw", "sample"), name="config.data.latents")
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(str(error)) from None
    m = source.manifest
    if (m.dataset["name"], m.dataset["split"]) != (dt.name, dt.split):
        _fail("data.latents", dt.latents, f"encodes {m.dataset['name']}/{m.dataset['split']}, but config.data names "
                                          f"{dt.name}/{dt.split}")
    if dt.image_size and dt.image_size != m.image_shape[0]:
        _fail("data.image_size", dt.image_size, f"the latents were encoded from {m.image_shape[0]}x{m.image_shape[1]} "
                                                f"images; set 0 or {m.image_shape[0]}")
    if dt.random_flip and not m.flips:
        _fail("data.random_flip", True, f"the latents in {dt.latents} hold no flipped images (jaxdiff-encode --flip)")
    return source, tuple(m.latent_shape)


def make_parallel(config, devices=None) -> DataParallel:
    """The :class:`~jaxdiff.training.parallel.DataParallel` of ``config.parallel`` over ``devices`` (default: all)."""
    pc = config.parallel
    return DataParallel(pc.mode, devices, data=pc.get("data", 1), fsdp=pc.get("fsdp", -1),
                        min_shard_size=pc.get("min_shard_size", MIN_SHARDED_SIZE))


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

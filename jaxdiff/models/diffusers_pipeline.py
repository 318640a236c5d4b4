"""diffusers ``DDPMPipeline`` / ``DDIMPipeline`` folders: the UNet, its :class:`Schedule` and sampling defaults.

A pipeline folder holds ``unet/`` (see :mod:`jaxdiff.models.diffusers`), ``scheduler/scheduler_config.json``
and usually ``model_index.json``. Example::

    pipe = from_diffusers_pipeline("ddpm-cifar10-32")
    fn = lambda x, t: pipe.model.apply({"params": pipe.params}, x, t)
    images = sample(pipe.schedule, fn, key, (16, 32, 32, 3), **pipe.sampling.kwargs())
    images = pipe.pipeline.sample(key, 16, sampler="ddim", num_steps=50)  # or through a jaxdiff.Pipeline

Scheduler settings read (missing keys take diffusers' defaults): ``_class_name``
``DDPMScheduler`` (sampler ``ddpm``) or ``DDIMScheduler`` (``ddim``, eta 0);
``num_train_timesteps``; ``beta_schedule`` ``linear`` / ``scaled_linear`` /
``squaredcos_cap_v2`` with ``beta_start`` / ``beta_end``, or ``trained_betas`` (the betas are
checked against diffusers' formula); ``variance_type`` ``fixed_small`` / ``fixed_large`` /
``learned_range`` (the model then has ``learn_sigma``); ``clip_sample`` with
``clip_sample_range`` 1; ``prediction_type`` ``epsilon`` / ``sample`` (x0) / ``v_prediction`` (v).
The 2022 keys ``tensor_format`` (ignored) and ``predict_epsilon`` are understood.
Refused, naming the setting: ``thresholding``, ``steps_offset`` other than 0,
``rescale_betas_zero_snr``, DDIM's ``set_alpha_to_one=false``, other schedulers and schedules.
``timestep_spacing`` (``leading`` / ``linspace`` / ``trailing``) chooses which timesteps
diffusers visits when sampling with fewer steps than ``T``; jaxdiff's samplers use their own
even spacing (:func:`jaxdiff.samplers.spaced_timesteps`), identical to all three at ``T`` steps
(the DDPM default).

``clip_sample`` becomes ``clip_x0``. For DDPM the two are the same step. jaxdiff's DDIM step
recomputes eps from the clipped x0 (Song et al.'s and GLIDE's form), which is diffusers'
``DDIMScheduler.step(..., use_clipped_model_output=True)``; ``DDIMPipeline`` by default keeps
the network's eps, so with ``clip_sample`` the two DDIM chains differ wherever clipping acts.

:func:`to_diffusers_pipeline` writes the reverse: a ``DDPMPipeline`` (sampler ``ddpm``) or
``DDIMPipeline`` (``ddim``) folder whose scheduler holds the schedule's betas as ``trained_betas``.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import numpy as np

from jaxdiff.models import diffusers as dm
from jaxdiff.models.unet import UNet
from jaxdiff.schedules import (
    Schedule,
    cosine_schedule,
    linear_schedule,
    schedule_from_betas,
)

__all__ = [
    "DiffusersPipeline",
    "SamplingDefaults",
    "diffusers_betas",
    "from_diffusers_pipeline",
    "schedule_from_diffusers",
    "to_diffusers_pipeline",
]

SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")
_COMMON = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "clip_sample_range": 1.0, "sample_max_value": 1.0,
    "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
SCHEDULER_DEFAULTS = {
    "DDPMScheduler": {**_COMMON, "variance_type": "fixed_small"},
    "DDIMScheduler": {**_COMMON, "set_alpha_to_one": True},
}
_SAMPLER = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim"}
_PREDICTION = {"epsilon": "epsilon", "sample": "x0", "v_prediction": "v"}
_VARIANCE = ("fixed_small", "fixed_large", "learned_range")
_SPACING = ("leading", "linspace", "trailing")


class SamplingDefaults(NamedTuple):
    """What the diffusers pipeline's scheduler does, as options of :func:`jaxdiff.samplers.sample`."""

    sampler: str  # "ddpm" or "ddim"
    prediction: str  # "epsilon", "x0" or "v"
    clip_x0: bool
    variance: str | None  # ddpm: "fixed_small" / "fixed_large" / "learned_range"; ddim: None
    eta: float | None  # ddim: 0.0; ddpm: None
    num_steps: int | None  # ddpm: T; ddim: None (the sampler's default)

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`jaxdiff.samplers.sample` (``None`` entries left out)."""
        return {k: v for k, v in self._asdict().items() if v is not None}


class DiffusersPipeline(NamedTuple):
    """A loaded pipeline: ``model.apply({"params": params}, x, t)`` predicts ``sampling.prediction``.

    ``image_shape``: ``(sample_size, sample_size, in_channels)`` of ``unet/config.json`` (``None``
    without a ``sample_size``); ``pipeline`` samples it with any jaxdiff sampler.
    """

    model: UNet
    params: Any
    schedule: Schedule
    sampling: SamplingDefaults
    image_shape: tuple[int, int, int] | None = None

    @property
    def pipeline(self):
        """The :class:`~jaxdiff.pipeline.Pipeline` of this folder: its UNet as a :class:`jaxdiff.objectives.Diffusion`
        model of ``schedule`` and ``sampling.prediction``, with the scheduler's sampler, steps, eta,
        ``clip_sample`` and (DDPM) variance as its defaults. ``ValueError`` without an ``image_shape``."""
        from jaxdiff.objectives import Diffusion
        from jaxdiff.pipeline import Pipeline

        if self.image_shape is None:
            raise ValueError("image_shape is None (unet/config.json has no sample_size): give one with "
                             "pipe._replace(image_shape=(H, W, C)).pipeline")
        s = self.sampling
        objective = Diffusion(schedule=self.schedule, prediction=s.prediction, variance=bool(self.model.learn_sigma))
        return Pipeline(objective, self.model.apply, self.params, self.image_shape, num_classes=self.model.num_classes,
                        sampler=s.sampler, num_steps=s.num_steps, eta=s.eta or 0.0, clip_x0=s.clip_x0,
                        options={"variance": s.variance} if s.variance else {})


def diffusers_betas(config: dict) -> np.ndarray:
    """``[T]`` float64 betas of a full DDPM/DDIM scheduler config, as diffusers computes them (in float32)."""
    T = config["num_train_timesteps"]
    if config["trained_betas"] is not None:
        return np.asarray(config["trained_betas"], np.float32).astype(np.float64)
    name, b0, b1 = config["beta_schedule"], config["beta_start"], config["beta_end"]
    if name == "linear":
        betas = np.linspace(b0, b1, T, dtype=np.float32)
    elif name == "scaled_linear":
        betas = np.linspace(b0**0.5, b1**0.5, T, dtype=np.float32) ** 2
    elif name == "squaredcos_cap_v2":
        abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
        i = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - abar((i + 1) / T) / abar(i / T), 0.999).astype(np.float32)
    else:
        raise ValueError(
            f"scheduler: beta_schedule={name!r} is not supported (supported: linear, scaled_linear, squaredcos_cap_v2)"
        )
    return betas.astype(np.float64)


def _upgrade_legacy(config: dict) -> dict:
    """Keys of 2022 configs (google/ddpm-*): ``tensor_format`` (array type only), ``predict_epsilon``."""
    config = {k: v for k, v in config.items() if k != "tensor_format"}
    if "predict_epsilon" in config:
        legacy = "epsilon" if config.pop("predict_epsilon") else "sample"
        if config.setdefault("prediction_type", legacy) != legacy:
            raise ValueError(f"scheduler: predict_epsilon contradicts prediction_type={config['prediction_type']!r}")
    return config


def schedule_from_diffusers(config: dict) -> tuple[Schedule, SamplingDefaults]:
    """The :class:`Schedule` and :class:`SamplingDefaults` of a ``scheduler_config.json`` dict."""
    cls = config.get("_class_name")
    if cls not in SCHEDULER_DEFAULTS:
        raise ValueError(f"scheduler: _class_name={cls!r} is not supported (supported: {sorted(SCHEDULER_DEFAULTS)})")
    defaults = SCHEDULER_DEFAULTS[cls]
    config = _upgrade_legacy(config)
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if unknown:
        raise ValueError(f"scheduler: unsupported setting(s) {unknown} for {cls}")
    c = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    refused = {"thresholding": c["thresholding"] is not False, "steps_offset": c["steps_offset"] != 0,
               "rescale_betas_zero_snr": c["rescale_betas_zero_snr"] is not False,
               "set_alpha_to_one": c.get("set_alpha_to_one", True) is not True,
               "clip_sample_range": c["clip_sample"] and c["clip_sample_range"] != 1.0,
               "timestep_spacing": c["timestep_spacing"] not in _SPACING,
               "prediction_type": c["prediction_type"] not in _PREDICTION,
               "variance_type": c.get("variance_type", "fixed_small") not in _VARIANCE}
    for key, bad in refused.items():
        if bad:
            raise ValueError(f"scheduler: {key}={c[key]!r} is not supported")
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or T < 2:
        raise ValueError(f"scheduler: num_train_timesteps={T!r} must be an int >= 2")
    want = diffusers_betas(c)
    if c["trained_betas"] is not None:
        schedule = schedule_from_betas(want)
    elif c["beta_schedule"] == "linear":
        schedule = linear_schedule(T, c["beta_start"], c["beta_end"])
    elif c["beta_schedule"] == "squaredcos_cap_v2":
        schedule = cosine_schedule(T, s=0.008, max_beta=0.999)
    else:
        schedule = schedule_from_betas(np.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, T) ** 2)
    got = np.asarray(schedule.betas, np.float64)
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-6, atol=0):
        raise ValueError(f"scheduler: beta_schedule={c['beta_schedule']!r}: jaxdiff's betas differ from diffusers'")
    sampler = _SAMPLER[cls]
    sampling = SamplingDefaults(
        sampler=sampler, prediction=_PREDICTION[c["prediction_type"]], clip_x0=bool(c["clip_sample"]),
        variance=c["variance_type"] if sampler == "ddpm" else None, eta=0.0 if sampler == "ddim" else None,
        num_steps=T if sampler == "ddpm" else None,
    )
    return schedule, sampling


def from_diffusers_pipeline(path: str) -> DiffusersPipeline:
    """Loads a ``DDPMPipeline`` / ``DDIMPipeline`` folder: ``unet/`` and ``scheduler/scheduler_config.json``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"diffusers pipeline folder {path!r} does not exist")
    index = os.path.join(path, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            components = json.load(f)
        extra = sorted(k for k in components if not k.startswith("_") and k not in ("unet", "scheduler"))
        if components.get("_class_name") not in ("DDPMPipeline", "DDIMPipeline") or extra:
            raise ValueError(
                f"{index}: _class_name={components.get('_class_name')!r} with components "
                f"{extra + ['unet', 'scheduler']} is not supported (DDPMPipeline / DDIMPipeline: unet + scheduler)"
            )
    sched_path = os.path.join(path, SCHEDULER_CONFIG)
    if not os.path.isfile(sched_path):
        raise FileNotFoundError(f"{sched_path}: missing")
    with open(sched_path) as f:
        try:
            sched_config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{sched_path}: not a JSON config ({e})") from None
    try:
        schedule, sampling = schedule_from_diffusers(sched_config)
    except ValueError as e:
        raise ValueError(f"{sched_path}: {e}") from None
    model, params = dm.from_diffusers(os.path.join(path, "unet"))
    with open(os.path.join(path, "unet", "config.json"), encoding="utf-8") as f:
        unet_config = json.load(f)
    size = unet_config.get("sample_size")
    image_shape = (size, size, params["conv_in"]["kernel"].shape[2]) if isinstance(size, int) else None
    if sampling.variance == "learned_range":
        in_ch = params["conv_in"]["kernel"].shape[2]
        if model.out_channels != 2 * in_ch:
            raise ValueError(
                f"{sched_path}: variance_type='learned_range' needs unet out_channels = 2 * in_channels = {2 * in_ch}, "
                f"got {model.out_channels}"
            )
        model = model.clone(out_channels=in_ch, learn_sigma=True)
    return DiffusersPipeline(model, params, schedule, sampling, image_shape)


_PIPELINE = {"ddpm": ("DDPMPipeline", "DDPMScheduler"), "ddim": ("DDIMPipeline", "DDIMScheduler")}


def to_diffusers_pipeline(model: UNet, params, schedule: Schedule, path: str, *, sampling: SamplingDefaults,
                          sample_size: int | None = None) -> str:
    """Writes a ``DDPMPipeline`` / ``DDIMPipeline`` folder (``unet/``, ``scheduler/``, ``model_index.json``).

    ``sampling.sampler`` (``"ddpm"`` or ``"ddim"``) picks the pipeline; the scheduler gets
    ``trained_betas`` (the schedule's float32 betas, exactly), ``prediction_type``, ``clip_sample``
    and, for DDPM, ``variance_type``. A learned-variance model (``learn_sigma``) needs
    ``variance="learned_range"``. Settings diffusers cannot hold raise ``ValueError`` naming them.
    """
    if sampling.sampler not in _PIPELINE:
        raise ValueError(f"sampling.sampler={sampling.sampler!r}: diffusers pipelines exist for {sorted(_PIPELINE)}")
    if schedule.kind != "vp":
        raise ValueError(f"schedule.kind={schedule.kind!r}: diffusers' DDPM/DDIM schedulers are variance preserving")
    inverse = {v: k for k, v in _PREDICTION.items()}
    if sampling.prediction not in inverse:
        raise ValueError(f"sampling.prediction={sampling.prediction!r} (diffusers: {sorted(inverse)})")
    variance = sampling.variance if sampling.sampler == "ddpm" else None
    if sampling.sampler == "ddpm" and variance not in _VARIANCE:
        raise ValueError(f"sampling.variance={variance!r} (supported: {list(_VARIANCE)})")
    if (variance == "learned_range") != bool(model.learn_sigma):
        raise ValueError(
            f"model.learn_sigma={model.learn_sigma} with sampling.variance={variance!r}: diffusers splits the "
            "output into mean and variance only for variance_type='learned_range'"
        )
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists and is not an empty folder: not overwriting it")
    pipeline, scheduler = _PIPELINE[sampling.sampler]
    config = {"_class_name": scheduler, "_diffusers_version": dm.WRITTEN_VERSION, **SCHEDULER_DEFAULTS[scheduler],
              "num_train_timesteps": int(schedule.num_timesteps),
              "trained_betas": [float(b) for b in np.asarray(schedule.betas, np.float32)],
              "clip_sample": bool(sampling.clip_x0), "prediction_type": inverse[sampling.prediction]}
    if variance is not None:
        config["variance_type"] = variance
    schedule_from_diffusers(config)  # what is written must read back
    dm.to_diffusers(model, params, os.path.join(path, "unet"), sample_size=sample_size)
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": dm.WRITTEN_VERSION,
             "scheduler": ["diffusers", scheduler], "unet": ["diffusers", "UNet2DModel"]}
    for name, content in ((SCHEDULER_CONFIG, config), ("model_index.json", index)):
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
            f.write("\n")
    return path

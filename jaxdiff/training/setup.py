"""From a config to the run's pieces: checks at start-up, schedule, model and optimizer.

This is the boundary where a ``ConfigDict`` becomes explicit keyword arguments; nothing
below it takes a config.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff import flow, schedules
from jaxdiff.diffusion import PREDICTIONS
from jaxdiff.losses import WEIGHTINGS
from jaxdiff.models import UNet, check_image_size
from jaxdiff.samplers import SAMPLERS
from jaxdiff.training.parallel import MODES

__all__ = ["validate_config", "make_schedule", "make_model", "SCHEDULES"]

SCHEDULES = ("linear", "cosine", "sigmoid")
OBJECTIVES = ("diffusion", "flow_matching")
DTYPES = ("float32", "bfloat16", "float16")


def _fail(setting: str, value, why: str):
    raise ValueError(f"config.{setting}={value!r}: {why}")


def validate_config(config, *, num_devices: int, image_shape=None) -> None:
    """Raises ValueError naming the first bad setting (before anything is compiled or saved)."""
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
    if tr.global_batch_size % num_devices:
        _fail("train.global_batch_size", tr.global_batch_size,
              f"must be divisible by the number of devices ({num_devices})")
    if config.parallel.mode not in MODES:
        _fail("parallel.mode", config.parallel.mode, f"must be one of {MODES}")
    if df.objective not in OBJECTIVES:
        _fail("diffusion.objective", df.objective, f"must be one of {OBJECTIVES}")
    if df.objective == "flow_matching":
        if sm.sampler not in flow.METHODS:
            _fail("sample.sampler", sm.sampler, f"flow matching samples with one of {flow.METHODS}")
        if df.learned_variance:
            _fail("diffusion.learned_variance", True, "flow matching has no variance to learn")
    if df.schedule not in SCHEDULES:
        _fail("diffusion.schedule", df.schedule, f"must be one of {SCHEDULES}")
    if df.num_timesteps <= 0:
        _fail("diffusion.num_timesteps", df.num_timesteps, "must be a positive integer")
    if df.prediction not in PREDICTIONS:
        _fail("diffusion.prediction", df.prediction, f"must be one of {PREDICTIONS}")
    if df.weighting not in WEIGHTINGS:
        _fail("diffusion.weighting", df.weighting, f"must be one of {WEIGHTINGS}")
    if sm.sampler not in SAMPLERS:
        _fail("sample.sampler", sm.sampler, f"must be one of {tuple(SAMPLERS)}")
    if not 1 <= sm.num_steps <= df.num_timesteps:
        _fail("sample.num_steps", sm.num_steps, f"must be in [1, diffusion.num_timesteps={df.num_timesteps}]")
    if sm.num_samples <= 0:
        _fail("sample.num_samples", sm.num_samples, "must be positive")
    if md.dtype not in DTYPES:
        _fail("model.dtype", md.dtype, f"must be one of {DTYPES}")
    size = config.data.image_size or (image_shape[0] if image_shape else None)
    if size:
        try:
            check_image_size(size, tuple(md.ch_mult))
        except ValueError as e:
            _fail("data.image_size" if config.data.image_size else "model.ch_mult",
                  config.data.image_size or tuple(md.ch_mult), str(e))


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
    """The UNet of ``config.model`` (``num_classes`` only if class-conditional)."""
    return UNet(
        ch=model_config.ch,
        ch_mult=tuple(model_config.ch_mult),
        num_res_blocks=model_config.num_res_blocks,
        attn_resolutions=tuple(model_config.attn_resolutions),
        dropout=model_config.dropout,
        num_classes=num_classes if model_config.class_conditional else None,
        learn_sigma=learned_variance,
        scale_shift=model_config.scale_shift,
        dtype=jnp.dtype(model_config.dtype),
        remat=model_config.remat,
    )

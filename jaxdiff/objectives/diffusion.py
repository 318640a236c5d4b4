"""The DDPM family on a discrete schedule: epsilon / x0 / v targets, the weightings, learned variance.

The loss is :func:`jaxdiff.losses.diffusion_loss` (``t ~ U{0..T-1}``); the network is called at
the integer timestep ``t``; sampling sees it through :func:`jaxdiff.denoiser.eps_denoiser`, so
every sampler serves it, those on the schedule's integer grid included.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax

from jaxdiff import denoiser as den
from jaxdiff import diffusion, losses, schedules
from jaxdiff.objectives.base import Network, Objective, fail

__all__ = ["Diffusion", "SCHEDULES", "schedule_from_config"]

SCHEDULES = ("linear", "cosine", "sigmoid")


def schedule_from_config(cfg) -> schedules.Schedule:
    """The schedule of ``config.diffusion`` (``schedule``, ``num_timesteps``, ``beta_start``, ``beta_end``).

    ``ValueError`` naming the field (``config.diffusion.beta_end=1.5: ...``) before anything is built.
    """
    if cfg.schedule not in SCHEDULES:
        fail("schedule", cfg.schedule, f"must be one of {SCHEDULES}")
    T = cfg.num_timesteps
    if isinstance(T, bool) or not isinstance(T, int) or T <= 0:
        fail("num_timesteps", T, "must be a positive integer")
    if cfg.schedule == "linear":
        for name in ("beta_start", "beta_end"):
            if not 0.0 < cfg[name] < 1.0:
                fail(name, cfg[name], "a linear schedule's betas must lie in (0, 1)")
        if cfg.beta_end < cfg.beta_start:
            fail("beta_end", cfg.beta_end, f"must be >= diffusion.beta_start ({cfg.beta_start!r}): "
                                           "a decreasing schedule")
    try:
        if cfg.schedule == "linear":
            return schedules.linear_schedule(T, cfg.beta_start, cfg.beta_end)
        if cfg.schedule == "cosine":
            return schedules.cosine_schedule(T)
        return schedules.sigmoid_schedule(T)
    except ValueError as error:  # anything the checks above do not foresee still names the setting
        fail("schedule", cfg.schedule, str(error))


@flax.struct.dataclass
class Diffusion(Objective):
    """Denoising diffusion (Ho et al. 2020) on ``schedule`` with the target ``prediction``.

    ``weighting`` / ``min_snr_gamma``: :func:`jaxdiff.losses.loss_weight`; ``learned_variance``: the
    hybrid objective of Nichol & Dhariwal (the network outputs ``2C`` channels).
    """

    name: ClassVar[str] = "diffusion"
    views: ClassVar[tuple[str, ...]] = ("discrete", "denoiser")

    schedule: schedules.Schedule
    prediction: str = flax.struct.field(pytree_node=False, default="epsilon")
    weighting: str = flax.struct.field(pytree_node=False, default="uniform")
    min_snr_gamma: float = flax.struct.field(pytree_node=False, default=5.0)
    variance: bool = flax.struct.field(pytree_node=False, default=False)  # learned (the 2C-channel output)

    @classmethod
    def from_config(cls, cfg) -> Diffusion:
        if cfg.prediction not in diffusion.PREDICTIONS:
            fail("prediction", cfg.prediction, f"must be one of {diffusion.PREDICTIONS}")
        if cfg.weighting not in losses.WEIGHTINGS:
            fail("weighting", cfg.weighting, f"must be one of {losses.WEIGHTINGS}")
        if not cfg.min_snr_gamma > 0:
            fail("min_snr_gamma", cfg.min_snr_gamma, "must be positive")
        return cls(schedule=schedule_from_config(cfg), prediction=cfg.prediction, weighting=cfg.weighting,
                   min_snr_gamma=float(cfg.min_snr_gamma), variance=bool(cfg.learned_variance))

    @property
    def learned_variance(self) -> bool:
        return self.variance

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def noise_level(self, key):
        return jax.random.randint(key, (), 0, self.schedule.num_timesteps)

    def loss(self, net: Network, x0, key, *, level, noise):
        return losses.diffusion_loss(self.schedule, net, x0, key, prediction=self.prediction, weighting=self.weighting,
                                     min_snr_gamma=self.min_snr_gamma, learned_variance=self.variance, t=level,
                                     noise=noise)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        return den.eps_denoiser(self.schedule, net, self.prediction, clip_x0=clip_x0,
                                      learned_variance=self.variance)


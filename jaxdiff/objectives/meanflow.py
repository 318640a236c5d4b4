"""MeanFlow (Geng et al. 2025): the network predicts the average velocity ``u(z, r, t)`` (:mod:`jaxdiff.meanflow`).

Its noise level is the pair ``[r, t]`` (:func:`jaxdiff.meanflow.sample_r_t`); the network gets the
two time inputs ``time [B, 2] = 999 (t, t - r)`` (a :class:`jaxdiff.models.UNet` with
``time_inputs=2`` embeds both and adds them, as the paper conditions on ``(t, t - r)``). The
loss needs the network's forward-mode derivative (``jax.jvp``). Sampling: the ``meanflow``
sampler (1 or ``n`` jumps) through the average-velocity view, or any Karras-grid sampler on
``u(z, t, t)``, the instantaneous velocity. ``guidance`` / ``guidance_kappa`` (``omega``, ``kappa``)
fold classifier-free guidance into the target (:func:`jaxdiff.meanflow.guided_velocity`) for a
class-conditional network trained with label dropout; its samples then need no guidance.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax.numpy as jnp

from jaxdiff import denoiser as den
from jaxdiff import meanflow
from jaxdiff.objectives.base import Network, Objective, fail

__all__ = ["MeanFlow", "TIME_SCALE"]

TIME_SCALE = 999.0  # the network's time inputs are TIME_SCALE * (t, t - r)


@flax.struct.dataclass
class MeanFlow(Objective):
    """MeanFlow's training of an average-velocity network, with its time sampler and adaptive weight."""

    name: ClassVar[str] = "meanflow"
    views: ClassVar[tuple[str, ...]] = ("denoiser", "average_velocity")
    time_inputs: ClassVar[int] = 2
    uses_labels: ClassVar[bool] = True  # guided training calls the network under the null label

    ratio: float = flax.struct.field(pytree_node=False, default=0.25)
    p_mean: float = flax.struct.field(pytree_node=False, default=-0.4)
    p_std: float = flax.struct.field(pytree_node=False, default=1.0)
    weight_p: float = flax.struct.field(pytree_node=False, default=1.0)
    guidance: float = flax.struct.field(pytree_node=False, default=1.0)  # omega (1: off)
    guidance_kappa: float = flax.struct.field(pytree_node=False, default=0.0)  # kappa

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0 or self.guidance_kappa != 0.0

    @classmethod
    def from_config(cls, cfg) -> MeanFlow:
        if cfg.learned_variance:
            fail("learned_variance", True, "MeanFlow has no variance to learn")
        mf = cfg.get("meanflow")
        if mf is None:
            return cls()
        if not 0.0 <= mf.ratio <= 1.0:
            fail("meanflow.ratio", mf.ratio, "the share of examples with r != t must lie in [0, 1]")
        if not mf.p_std > 0:
            fail("meanflow.p_std", mf.p_std, "must be positive")
        if not mf.weight_p >= 0:
            fail("meanflow.weight_p", mf.weight_p, "must be >= 0 (0: plain L2)")
        omega, kappa = mf.get("guidance", 1.0), mf.get("guidance_kappa", 0.0)
        meanflow.check_guidance(omega, kappa, prefix="config.diffusion.meanflow.")
        return cls(ratio=float(mf.ratio), p_mean=float(mf.p_mean), p_std=float(mf.p_std),
                   weight_p=float(mf.weight_p), guidance=float(omega), guidance_kappa=float(kappa))

    def for_run(self, config, *, image_shape, num_classes, training, load_workdir=None):
        del image_shape, training, load_workdir
        if self.guided and num_classes is None:
            fail("meanflow.guidance", self.guidance, "guided training needs a class-conditional model "
                 "(model.class_conditional=True)")
        if self.guided and not config.train.label_dropout > 0:
            fail("meanflow.guidance", self.guidance, "guided training needs train.label_dropout > 0 "
                 "(the null label's velocity is part of the target)")
        return self

    @staticmethod
    def average_velocity(net: Network):
        """``u(z, r, t) = net(z, 999 [t, t - r])``."""
        return lambda z, r, t: net(z, TIME_SCALE * jnp.stack([t, t - r], axis=-1))

    def noise_level(self, key):
        return meanflow.sample_r_t(key, ratio=self.ratio, mu=self.p_mean, sigma=self.p_std)

    def loss(self, net: Network, x0, key, *, level, noise, labels=None, null_label=None):
        del key
        guide = {}
        if self.guided:
            if labels is None or null_label is None:
                raise ValueError(f"meanflow guidance={self.guidance}: needs a class-conditional network "
                                 "(labels and null_label)")
            null = jnp.full(labels.shape, null_label, labels.dtype)
            guide = dict(guidance=self.guidance, guidance_kappa=self.guidance_kappa, conditional=labels != null_label,
                         u_null_fn=self.average_velocity(lambda x, time: net(x, time, null)))
        return meanflow.meanflow_loss(self.average_velocity(net), x0, r=level[:, 0], t=level[:, 1], noise=noise,
                                      p=self.weight_p, **guide)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        del clip_x0
        return den.average_velocity_denoiser(self.average_velocity(net))


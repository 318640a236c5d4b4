"""EDM (Karras et al. 2022): the network ``F`` preconditioned as a denoiser ``D(x, sigma)``.

``ln sigma ~ N(p_mean, p_std^2)``, the loss :func:`jaxdiff.edm.edm_loss` of
``D = jaxdiff.edm.precondition(F, sigma_data)`` with ``F`` fed ``t = jaxdiff.edm.unet_time(c_noise)``.
Sampling uses the same ``D`` (:class:`jaxdiff.denoiser.Denoiser` with EDM's lowest level 0.002
and no upper bound; the samplers' grids start at their ``sigma_max``, 80 by default):
``sigma_data`` reaches every sampler from here alone.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct

from jaxdiff import denoiser as den
from jaxdiff import edm as edm_lib
from jaxdiff.objectives.base import Network, Objective, fail

__all__ = ["EDM", "SIGMA_MIN"]

SIGMA_MIN = 0.002  # EDM's lowest noise level (its sampler's grid)


@flax.struct.dataclass
class EDM(Objective):
    """EDM's preconditioning and loss (Table 1) with data standard deviation ``sigma_data``."""

    name: ClassVar[str] = "edm"

    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)
    p_mean: float = flax.struct.field(pytree_node=False, default=-1.2)
    p_std: float = flax.struct.field(pytree_node=False, default=1.2)

    @classmethod
    def from_config(cls, cfg) -> EDM:
        if cfg.learned_variance:
            fail("learned_variance", True, "an EDM denoiser has no variance to learn")
        for name in ("sigma_data", "p_std"):
            if not cfg[name] > 0:
                fail(name, cfg[name], "must be positive")
        return cls(sigma_data=float(cfg.sigma_data), p_mean=float(cfg.p_mean), p_std=float(cfg.p_std))

    def _precondition(self, net: Network):
        return edm_lib.precondition(lambda x, c: net(x, edm_lib.unet_time(c)), sigma_data=self.sigma_data)

    def noise_level(self, key):
        return edm_lib.log_normal_sigma(key, (), self.p_mean, self.p_std)

    def loss(self, net: Network, x0, key, *, level, noise):
        return edm_lib.edm_loss(self._precondition(net), x0, key, sigma_data=self.sigma_data, sigma=level,
                                noise=noise)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        del clip_x0  # EDM's sampler never clipped its denoiser
        return den.Denoiser(fn=self._precondition(net), sigma_min=SIGMA_MIN)

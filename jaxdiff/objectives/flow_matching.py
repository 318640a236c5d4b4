"""Flow matching with the linear interpolant (rectified flow; :mod:`jaxdiff.flow`).

``t ~ U[0, 1)``, ``x_t = (1 - t) x0 + t eps``, the network regresses the velocity ``eps - x0``
(:func:`jaxdiff.flow.flow_matching_loss`) and is fed ``999 t`` (the UNet's timestep scale).
Sampling sees it through :func:`jaxdiff.denoiser.velocity_denoiser`: the samplers on a sigma grid
serve it; those on a discrete schedule's integer grid do not.
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff import denoiser as den
from jaxdiff import flow
from jaxdiff.objectives.base import Network, Objective, fail

__all__ = ["FlowMatching", "TIME_SCALE"]

TIME_SCALE = 999.0  # the network's time input is TIME_SCALE * t


@flax.struct.dataclass
class FlowMatching(Objective):
    """Conditional flow matching (Lipman et al. 2023; Liu et al. 2023) with the linear interpolant."""

    name: ClassVar[str] = "flow_matching"

    @classmethod
    def from_config(cls, cfg) -> FlowMatching:
        if cfg.learned_variance:
            fail("learned_variance", True, "flow matching has no variance to learn")
        return cls()

    def noise_level(self, key):
        return jax.random.uniform(key, (), jnp.float32)

    def loss(self, net: Network, x0, key, *, level, noise):
        return flow.flow_matching_loss(flow.with_time_scale(net, TIME_SCALE), x0, key, t=level, noise=noise)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        del clip_x0  # the velocity's x0 estimate is not clipped (as before: flow sampling never clipped)
        return den.velocity_denoiser(flow.with_time_scale(net, TIME_SCALE))

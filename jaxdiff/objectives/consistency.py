"""Consistency training with the iCT recipe (Song & Dhariwal 2023; :mod:`jaxdiff.consistency`).

The network ``F`` is wrapped as the consistency function ``f(x, sigma) = c_skip x + c_out F(c_in x,
t)`` with ``t = jaxdiff.edm.unet_time(ln(sigma) / 4)`` (EDM's noise input on the UNet's scale), so
``f(x, sigma_min) = x`` exactly. Each example's level is the pair ``[sigma_i, sigma_{i+1}]`` of the
current ``N(k)``-point grid, drawn with iCT's log-normal weights; ``N(k)`` follows the curriculum
over ``curriculum_steps`` training steps, which the objective learns from the train step through
:meth:`Objective.at_step`. Sampling: the ``consistency`` sampler (1, 2, 4 ... evaluations).
"""

from __future__ import annotations

from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff import consistency as ct
from jaxdiff import denoiser as den
from jaxdiff import edm as edm_lib
from jaxdiff.diffusion import bcast
from jaxdiff.objectives.base import Network, Objective, fail

__all__ = ["Consistency"]


@flax.struct.dataclass
class Consistency(Objective):
    """iCT consistency training: pseudo-Huber loss, log-normal levels, the doubling curriculum, no EMA teacher."""

    name: ClassVar[str] = "consistency"
    views: ClassVar[tuple[str, ...]] = ("consistency",)

    step: jax.Array = 0  # the training step (set by at_step; traced inside the train step)
    curriculum_steps: int = flax.struct.field(pytree_node=False, default=3000)
    s0: int = flax.struct.field(pytree_node=False, default=10)
    s1: int = flax.struct.field(pytree_node=False, default=1280)
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)
    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)
    p_mean: float = flax.struct.field(pytree_node=False, default=-1.1)
    p_std: float = flax.struct.field(pytree_node=False, default=2.0)

    @classmethod
    def from_config(cls, cfg) -> Consistency:
        if cfg.learned_variance:
            fail("learned_variance", True, "a consistency model has no variance to learn")
        c = cfg.get("consistency")
        if c is None:
            return cls()
        if not (isinstance(c.curriculum_steps, int) and c.curriculum_steps >= 1):
            fail("consistency.curriculum_steps", c.curriculum_steps, "must be an int >= 1 (the run's train.num_steps)")
        if not 2 <= c.s0 <= c.s1:
            fail("consistency.s0", c.s0, f"must satisfy 2 <= s0 <= s1={c.s1}")
        if not c.p_std > 0:
            fail("consistency.p_std", c.p_std, "must be positive")
        return cls(curriculum_steps=c.curriculum_steps, s0=int(c.s0), s1=int(c.s1), p_mean=float(c.p_mean),
                   p_std=float(c.p_std), sigma_data=float(cfg.sigma_data))

    def at_step(self, step) -> Consistency:
        return self.replace(step=step)

    def function(self, net: Network):
        """``f(x [B, ...], sigma [B])``, the consistency function of the network (module docstring)."""

        def f(x, sigma):
            sigma = jnp.asarray(sigma, jnp.float32)
            c_skip, c_out, c_in = ct.coefficients(sigma, sigma_data=self.sigma_data, sigma_min=self.sigma_min)
            out = net(bcast(c_in, x) * x, edm_lib.unet_time(edm_lib.c_noise(sigma)))
            return bcast(c_skip, x) * x + bcast(c_out, x) * out.astype(jnp.float32)

        return f

    def num_scales(self):
        """``N(k)`` at the objective's step."""
        return ct.num_scales(self.step, self.curriculum_steps, s0=self.s0, s1=self.s1)

    def noise_level(self, key):
        n = self.num_scales()
        grid = {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        probs = ct.level_probs(n, self.s1 + 1, p_mean=self.p_mean, p_std=self.p_std, **grid)
        i = jax.random.categorical(key, jnp.log(probs))
        return jnp.stack([ct.karras_grid(i, n, **grid), ct.karras_grid(i + 1, n, **grid)])

    def loss(self, net: Network, x0, key, *, level, noise):
        del key
        return ct.ct_loss(self.function(net), x0, sigma=level[:, 0], sigma_next=level[:, 1], noise=noise)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        del clip_x0
        return den.Denoiser(fn=self.function(net), sigma_min=self.sigma_min, consistency=True)

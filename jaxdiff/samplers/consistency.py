"""Multistep sampling of a consistency model (Song et al. 2023, Algorithm 1; :mod:`jaxdiff.consistency`).

``x0 = f(sigma_0 z_0, sigma_0)``, then for ``j = 1..n-1``: ``x0 = f(x0 + sqrt(sigma_j^2 - sigma_min^2) z_j,
sigma_j)``. The levels ``sigma_0 = sigma_max > sigma_1 > ... > sigma_{n-1}`` are the first ``n``
points of the ``n + 1``-point Karras grid from ``sigma_max`` to ``sigma_min`` (rho 7): one step is
the one-step generator, two steps re-noise to about sigma 2.5. NFE ``n``; ``n`` may be traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import karras_sigma
from jaxdiff.samplers.common import check_num_steps, one_per_step, run_loop, steps_result

__all__ = ["multistep"]


def multistep(denoiser, x_T, key, *, num_steps=1, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """``n`` evaluations of the consistency function ``denoiser.fn`` from the unit normal ``x_T`` ``[B, ...]``.

    ``key`` draws the re-noising ``z_j`` (``fold_in(key, j)``). Returns ``(x0 [B, ...], nfe = n)``.
    """
    if not denoiser.consistency:
        raise ValueError("the consistency sampler needs a consistency model (Denoiser.consistency)")
    num_steps = check_num_steps(num_steps)
    x = jnp.asarray(x_T, jnp.float32)
    b = x.shape[0]
    level = lambda j: karras_sigma(j, jnp.asarray(num_steps) + 1, sigma_min, sigma_max, rho)

    def body(j, x0):
        sigma = level(j)
        z = jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
        start = jnp.where(j == 0, sigma * x, x0 + jnp.sqrt(jnp.maximum(sigma**2 - sigma_min**2, 0.0)) * z)
        return denoiser.fn(start, jnp.full((b,), sigma)).astype(x.dtype)

    return steps_result(num_steps, run_loop(body, x, num_steps), one_per_step(num_steps))

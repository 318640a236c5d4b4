"""The few-step sampler of an average-velocity model (MeanFlow, Geng et al. 2025; :mod:`jaxdiff.meanflow`).

``u(z_t, r, t)`` is the average velocity of the linear interpolant's ODE over ``[r, t]``, so one
jump ``z_r = z_t - (t - r) u(z_t, r, t)`` moves a sample exactly from time ``t`` to ``r`` when ``u``
is exact. ``n`` uniform jumps ``t_i = 1 - i / n`` carry ``z_1 ~ N(0, I)`` to data at ``t = 0``;
``n = 1`` is the one-step generator ``x = z_1 - u(z_1, 0, 1)``. NFE ``n``; ``n`` may be traced.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiff.samplers.common import check_num_steps, one_per_step, run_loop, steps_result

__all__ = ["sample_steps"]


def sample_steps(denoiser, x_T, key=None, *, num_steps=1):
    """``n`` MeanFlow jumps from the unit normal ``x_T`` ``[B, ...]`` at ``t = 1``. Returns ``(x0, nfe = n)``.

    ``denoiser``: a :class:`jaxdiff.denoiser.Denoiser` with ``average_velocity_fn``
    (:func:`jaxdiff.denoiser.average_velocity_denoiser`).
    """
    del key
    if denoiser.average_velocity_fn is None:
        raise ValueError("the meanflow sampler needs an average-velocity model (Denoiser.average_velocity_fn)")
    num_steps = check_num_steps(num_steps)
    u = denoiser.average_velocity_fn
    x = jnp.asarray(x_T, jnp.float32)
    b = x.shape[0]
    dt = 1.0 / jnp.asarray(num_steps, jnp.float32)

    def body(i, z):
        t = 1.0 - i * dt
        r = jnp.maximum(t - dt, 0.0)
        out = u(z, jnp.full((b,), r), jnp.full((b,), t)).astype(z.dtype)
        return z - (t - r) * out

    return steps_result(num_steps, run_loop(body, x, num_steps), one_per_step(num_steps))

"""Pieces shared by the samplers: timestep grids, the prior, and the continuous-time view.

The continuous-time samplers (DPM-Solver++, Karras, probability-flow ODE) move along the
log-SNR ``lambda = log(abar / (1 - abar))`` of the discrete schedule. A ``lambda`` (or a VE
noise level ``sigma = sqrt((1 - abar) / abar) = exp(-lambda / 2)``) is mapped back to a
*fractional* timestep on the ``[0, T-1]`` scale by inverting the monotone table
``schedule.log_snr`` with linear interpolation. That is the exact inverse of
:func:`jaxdiff.diffusion.alpha_sigma`, which interpolates the same table, so the network is
asked about the noise level the sampler means.

Internally these samplers keep the state in VP coordinates ``x = alpha x0 + sigma eps``
(``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``) and call the model in the
schedule's own coordinates (the VE ones for ``kind="ve"``), so one code path serves both kinds.

**Step counts below 1.** A concrete ``num_steps`` (a Python or NumPy int, or a JAX array outside
``jit``) below 1, or above ``T`` for the samplers on the integer grid, raises ``ValueError``
(:func:`~jaxdiff.samplers.common.check_num_steps`). A *traced* ``num_steps`` cannot be checked, so every fixed-step
sampler (and :func:`jaxdiff.flow.sample`) ends with :func:`steps_result`: when ``n < 1`` the
samples are all NaN and the reported NFE is 0, so the mistake is visible instead of returning
the prior noise as if it were a sample. A traced ``n`` above ``T`` on the integer grid is not
caught (the grid then repeats timesteps).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks
from jaxdiff import diffusion as d
from jaxdiff.denoiser import prediction_fn as denoiser  # re-exported: (x0_hat, eps_hat) of a network
from jaxdiff.diffusion import (  # re-exported: the process maths lives in jaxdiff.diffusion
    alpha_sigma_from_log_snr,
    bcast,
    karras_sigma,
    t_from_log_snr,
    t_from_sigma,
)
from jaxdiff.schedules import Schedule

__all__ = [
    "spaced_timesteps",
    "karras_sigma",
    "run_loop",
    "prior_sample",
    "bcast",
    "t_from_log_snr",
    "t_from_sigma",
    "alpha_sigma_from_log_snr",
    "denoiser",
    "clipped_sigma_max",
    "check_num_steps",
    "steps_result",
    "one_per_step",
]


def spaced_timesteps(num_timesteps: int, num_steps, i):
    """``(t_i, t_{i+1})`` of ``num_steps`` evenly spaced steps from ``T-1`` down to ``0``, then ``-1``.

    ``t_i = floor((T-1)(n-1-i)/(n-1))`` (``T-1`` for ``n = 1``), so ``n = T`` visits every
    timestep; the step after ``t = 0`` is ``-1`` (x0). Integer arithmetic, works on tracers.
    """
    n = jnp.asarray(num_steps, jnp.int32)
    i = jnp.asarray(i, jnp.int32)
    T = num_timesteps - 1
    denom = jnp.maximum(n - 1, 1)

    def at(j):
        t = jnp.where(n == 1, T, (T * (n - 1 - j)) // denom)
        return jnp.where(j >= n, -1, t)

    return at(i), at(i + 1)


def run_loop(body: Callable, init, num_steps):
    """``lax.fori_loop(0, num_steps, body, init)``: with a traced ``num_steps`` it is a while loop.

    Each step's result is cast to the dtypes of ``init`` (the carry: float32 for every sampler), so
    a model whose output is another float type (float64 under ``jax_enable_x64``, bfloat16) runs
    the chain in the carry's precision instead of failing lax's carry-type check.
    """
    init = jax.tree.map(jnp.asarray, init)

    def step(i, carry):
        return jax.tree.map(lambda new, old: jnp.asarray(new).astype(old.dtype), body(i, carry), carry)

    return jax.lax.fori_loop(0, num_steps, step, init)


def prior_sample(schedule: Schedule, key, shape) -> jax.Array:
    """``x_{T-1}`` from the prior in the schedule's coordinates: ``N(0, I)`` (VP), ``N(0, (1 + sigma_T^2) I)`` (VE)."""
    x = jax.random.normal(key, shape, jnp.float32)
    t = jnp.full((shape[0],), schedule.num_timesteps - 1, jnp.int32)
    return d.from_vp(schedule, x, t)


def clipped_sigma_max(schedule: Schedule, sigma_max=None) -> jax.Array:
    """``sigma_max`` clipped to ``[sigmas[0], sigmas[T-1]]`` (``None``: ``sigmas[T-1]``); may be traced."""
    hi = schedule.sigmas[schedule.num_timesteps - 1]
    if sigma_max is None:
        return hi
    return jnp.clip(jnp.asarray(sigma_max, jnp.float32), schedule.sigmas[0], hi)


def check_num_steps(num_steps, name: str = "num_steps", upper: int | None = None):
    """A concrete step count must be an integer in ``[1, upper]``; a traced one passes (see :func:`steps_result`)."""
    if isinstance(num_steps, bool):
        raise ValueError(f"{name} must be an int, got {num_steps!r}")
    v = checks.concrete_value(num_steps)
    if v is not None:
        if v.shape != () or not np.issubdtype(v.dtype, np.integer):
            raise ValueError(f"{name} must be an int, got {num_steps!r}")
        if v < 1 or (upper is not None and v > upper):
            bound = f"[1, {upper}]" if upper is not None else ">= 1"
            raise ValueError(f"{name} must be {bound}, got {v.item()}")
    return num_steps


def steps_result(num_steps, x, nfe):
    """``(x, nfe)`` of a fixed-step sampler, or ``(NaN like x, 0)`` when a traced ``num_steps < 1``.

    The one place that implements the module docstring's rule for traced step counts; a Python
    int ``num_steps`` (checked by :func:`~jaxdiff.samplers.common.check_num_steps`) returns ``(x, nfe)`` unchanged.
    """
    if isinstance(num_steps, (int, np.integer)):
        return x, nfe
    ok = jnp.asarray(num_steps) >= 1
    return jnp.where(ok, x, jnp.nan), jnp.where(ok, jnp.asarray(nfe, jnp.int32), 0)


def one_per_step(num_steps):
    """NFE of a sampler that evaluates the network once per step: ``n``."""
    return num_steps

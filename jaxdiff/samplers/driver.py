"""The shared loop driver: a whole reverse chain as one ``lax`` loop (one XLA program).

``num_steps`` and ``eta`` may be traced values: under ``jax.jit`` changing them does not
recompile (the loop is a ``while_loop`` with a dynamic trip count and the timesteps are computed
inside it). ``jax.vmap`` over ``key`` draws independent chains.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.losses import VARIANCES
from jaxdiff.samplers.ddim import ddim_step
from jaxdiff.samplers.ddpm import ddpm_step_between
from jaxdiff.schedules import Schedule

__all__ = ["spaced_timesteps", "run_loop", "prior_sample", "sample", "SAMPLERS"]

SAMPLERS = ("ddpm", "ddim")


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
        return jnp.where(j >= n, -1, (T * (n - 1 - j)) // denom)

    return at(i), at(i + 1)


def run_loop(body: Callable, init, num_steps):
    """``lax.fori_loop(0, num_steps, body, init)``: with a traced ``num_steps`` it is a while loop."""
    return jax.lax.fori_loop(0, num_steps, body, init)


def prior_sample(schedule: Schedule, key, shape) -> jax.Array:
    """``x_{T-1}`` from the prior in the schedule's coordinates: ``N(0, I)`` (VP), ``N(0, (1 + sigma_T^2) I)`` (VE)."""
    x = jax.random.normal(key, shape, jnp.float32)
    t = jnp.full((shape[0],), schedule.num_timesteps - 1, jnp.int32)
    return d.from_vp(schedule, x, t)


def sample(schedule: Schedule, model_fn: Callable, key, shape, *, sampler: str = "ddim", num_steps=None,
           eta=0.0, prediction: str = "epsilon", variance: str = "fixed_small", clip_x0: bool = False,
           x_T=None) -> jax.Array:
    """Runs a reverse chain from the prior to data in one compiled loop.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] int32) -> [B, ...]`` (``2C`` channels for
        ``variance="learned_range"``).
      key: a PRNG key (``vmap`` over keys for independent chains).
      shape: static ``(B, ...)``.
      sampler: ``"ddpm"`` (ancestral, respaced when ``num_steps < T``) or ``"ddim"``.
      num_steps: number of network evaluations (NFE); default ``T`` for ddpm, 50 for ddim.
        May be a traced int.
      eta: DDIM's eta (traced values allowed). variance: ddpm's reverse variance.
      x_T: optional starting point ``[B, ...]`` instead of a prior draw.
    Returns: samples ``[B, ...]`` (float32; clip/quantize them for images). NFE = ``num_steps``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    d.check_prediction(prediction)
    T = schedule.num_timesteps
    if num_steps is None:
        num_steps = T if sampler == "ddpm" else min(50, T)
    if isinstance(num_steps, int) and not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    k_init, k_steps = jax.random.split(key)
    x = prior_sample(schedule, k_init, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape} but shape is {tuple(shape)}")
    b = shape[0]

    def body(i, x):
        t, t_prev = spaced_timesteps(T, num_steps, i)
        tb, tpb = jnp.full((b,), t), jnp.full((b,), t_prev)
        out = model_fn(x, tb)
        k = jax.random.fold_in(k_steps, i)
        if sampler == "ddim":
            return ddim_step(schedule, out, x, tb, tpb, k, eta=eta, prediction=prediction, clip_x0=clip_x0)
        z = jax.random.normal(k, x.shape, x.dtype)
        return ddpm_step_between(schedule, out, x, tb, tpb, z, prediction=prediction, variance=variance,
                                 clip_x0=clip_x0)

    return run_loop(body, x, num_steps)

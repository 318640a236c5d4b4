"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on the full or a respaced schedule."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.samplers.common import check_num_steps, one_per_step, run_loop, spaced_timesteps, steps_result
from jaxdiff.schedules import Schedule

__all__ = ["ddpm_step", "respaced_posterior", "ddpm_step_between", "step_noise", "ddpm_loop", "ddpm_nfe"]

ddpm_nfe = one_per_step


def step_noise(key, noise, x_t: jax.Array, name: str = "noise") -> jax.Array:
    """The Gaussian noise of one step: ``noise`` as given (checked against ``x_t``) or drawn from ``key``."""
    if noise is not None:
        noise = jnp.asarray(noise)
        if noise.shape != x_t.shape:
            raise ValueError(f"{name} must have the shape of x_t {x_t.shape}, got {noise.shape}")
        return noise
    if key is None:
        raise ValueError("a stochastic step needs either `key` or `noise`; both are None")
    return jax.random.normal(key, x_t.shape, x_t.dtype)


def ddpm_step(schedule: Schedule, model_output, x_t, t, key=None, *, noise=None, prediction: str = "epsilon",
              variance: str = "fixed_small", clip_x0: bool = False) -> jax.Array:
    """One ancestral step ``x_t -> x_{t-1} ~ p(x_{t-1} | x_t)``.

    Args:
      model_output: the network's output at ``(x_t, t)``: ``[B, ...]`` (``[B, ..., 2C]`` for
        ``variance="learned_range"``).
      x_t: ``[B, ...]``. t: ``[B]`` int in ``{0..T-1}``.
      key, noise: the step's randomness; give ``noise`` (like ``x_t``) to make the step
        deterministic. No noise is added where ``t == 0``.
      variance: ``"fixed_small"`` (beta-tilde), ``"fixed_large"`` (beta) or ``"learned_range"``.
    Returns: ``x_{t-1}`` ``[B, ...]``.
    """
    d.check_variance(variance)
    t = d.check_t(t, x_t, "x_t")
    mean, _, logvar, _, _ = d.p_mean_variance(schedule, model_output, x_t, t, prediction=prediction,
                                            variance=variance, clip_x0=clip_x0)
    z = step_noise(key, noise, x_t)
    nonzero = (t > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
    return mean + nonzero * jnp.exp(0.5 * logvar) * z


def _log_abar(schedule: Schedule, t):
    """``(log abar_t, log(1 - abar_t))`` from the log-SNR (accurate near abar = 1); t < 0 -> (0, -inf)."""
    t = jnp.asarray(t)
    tc = jnp.clip(t, 0, schedule.num_timesteps - 1)
    lam = schedule.log_snr[tc] if jnp.issubdtype(t.dtype, jnp.integer) else jnp.interp(
        tc, jnp.arange(schedule.num_timesteps, dtype=jnp.float32), schedule.log_snr)
    neg = t < 0
    return jnp.where(neg, 0.0, -jax.nn.softplus(-lam)), jnp.where(neg, -jnp.inf, -jax.nn.softplus(lam))


def respaced_posterior(schedule: Schedule, t, t_prev):
    """Posterior of the process restricted to the pair ``t_prev < t`` (``t_prev = -1`` is x0).

    Returns ``[B]`` arrays ``(coef_x0, coef_xt, var_small, var_large)`` in VP coordinates:
    ``beta' = 1 - abar_t / abar_prev``, ``var_small = beta' (1 - abar_prev) / (1 - abar_t)``,
    ``var_large = beta'``, mean ``= coef_x0 x0 + coef_xt x_t``. With ``t_prev = t - 1`` these are
    the schedule's own ``posterior_*`` coefficients.
    """
    la_t, l1m_t = _log_abar(schedule, t)
    la_p, l1m_p = _log_abar(schedule, t_prev)
    beta = -jnp.expm1(la_t - la_p)
    one_m_t, one_m_p = jnp.exp(l1m_t), jnp.exp(l1m_p)
    coef_x0 = jnp.exp(0.5 * la_p) * beta / one_m_t
    coef_xt = jnp.exp(0.5 * (la_t - la_p)) * one_m_p / one_m_t
    return coef_x0, coef_xt, beta * one_m_p / one_m_t, beta


def ddpm_step_between(schedule: Schedule, model_output, x_t, t, t_prev, noise, *, prediction: str = "epsilon",
                      variance: str = "fixed_small", clip_x0: bool = False) -> jax.Array:
    """Ancestral step from ``t`` to an earlier ``t_prev`` of a respaced schedule (Nichol & Dhariwal 2021, sec. 4).

    ``noise`` ``[B, ...]`` is required (no noise is added where ``t_prev < 0``). Works in the
    schedule's coordinates; for a VE schedule ``x_t`` is mapped to VP coordinates and back.
    """
    model_output, values = d.split_variance_output(model_output, x_t, variance)
    x0_hat, _ = d.x0_eps_from_prediction(schedule, model_output, x_t, t, prediction)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    c_x0, c_xt, v_small, v_large = respaced_posterior(schedule, t, t_prev)
    bc = lambda a: a.reshape(a.shape + (1,) * (x_t.ndim - 1))
    mean = bc(c_x0) * x0_hat + bc(c_xt) * d.to_vp(schedule, x_t, t)
    logvar = d.model_log_variance(variance, bc(jnp.log(jnp.maximum(v_small, 1e-20))), bc(jnp.log(v_large)), values)
    keep = bc((t_prev >= 0).astype(x_t.dtype))
    return d.from_vp(schedule, mean + keep * jnp.exp(0.5 * logvar) * noise, t_prev)


def ddpm_loop(schedule: Schedule, model_fn: Callable, x_T, key, *, num_steps=None, variance: str = "fixed_small",
              prediction: str = "epsilon", clip_x0: bool = False):
    """Ancestral sampling on ``n`` evenly spaced timesteps (respaced when ``n < T``; default ``n = T``).

    ``model_fn(x_t [B, ...], t [B] int32) -> [B, ...]`` (``2C`` channels for ``"learned_range"``).
    Returns ``(x0 [B, ...], nfe = n)``.
    """
    d.check_variance(variance)
    T = schedule.num_timesteps
    num_steps = check_num_steps(T if num_steps is None else num_steps, upper=T)
    b = x_T.shape[0]

    def body(i, x):
        t, t_prev = spaced_timesteps(T, num_steps, i)
        tb, tpb = jnp.full((b,), t), jnp.full((b,), t_prev)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return ddpm_step_between(schedule, model_fn(x, tb), x, tb, tpb, z, prediction=prediction,
                                 variance=variance, clip_x0=clip_x0)

    return steps_result(num_steps, run_loop(body, x_T, num_steps), ddpm_nfe(num_steps))

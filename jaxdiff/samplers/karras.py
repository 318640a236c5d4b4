"""Euler, Heun and Euler-ancestral samplers on the Karras et al. (2022, "EDM") noise grid.

They work in the VE view of the process, ``y = x / alpha = x0 + sigma eps`` with
``sigma = sqrt((1 - abar)/abar)`` (``schedule.sigmas``), where the probability-flow ODE is
``dy/dsigma = (y - D(y, sigma)) / sigma = eps_hat`` (EDM eq. 3 with ``s(t) = 1``, ``sigma(t) = t``).
The denoiser ``D`` is the network called at the fractional timestep of ``sigma``
(:func:`jaxdiff.samplers.common.t_from_sigma`).

Grid (EDM eq. 5): ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho`` for
``i = 0..n-1`` and ``sigma_n = 0``, with ``smin = sigmas[0]``, ``rho = 7`` and ``smax`` the option
``sigma_max`` clipped to the schedule's range ``[sigmas[0], sigmas[T-1]]`` (``None``: ``sigmas[T-1]``).
It is computed inside the loop from ``(i, n)``: ``n`` may be traced.

``sigma_max`` (default 80, EDM's choice for VP models): a VP schedule's terminal ``sigma`` is far
above the data's scale (about 2e4 for the cosine schedule, whose ``beta`` is clipped at 0.999; 157
for the linear one), and steps spent there barely change the sample. The chain starts at
``smax`` from the prior draw ``x_T ~ N(0, I)`` (VP coordinates at ``t = T-1``) used as the VP state
at ``t(smax)``: the marginal there is ``alpha x0 + sqrt(1 - alpha^2) eps`` with
``alpha^2 = 1 / (1 + smax^2)``, i.e. ``N(0, I)`` up to the data's share ``var(x0) / (1 + smax^2)`` of
the variance (``1.6e-4 var(x0)`` at ``smax = 80``). A schedule with ``sigmas[T-1] <= sigma_max``
(e.g. a VE schedule ending below 80) is unchanged.

NFE (network evaluations) for ``n = num_steps`` steps:

* ``euler``: ``n``; ``euler_ancestral``: ``n``;
* ``heun``: ``2n - 1`` -- every step adds a corrector evaluation at ``sigma_{i+1}`` except the
  last one, which lands on ``sigma_n = 0`` and is a plain Euler step (EDM Algorithm 1).

The step onto ``sigma = 0`` returns the denoiser's output ``D`` (``y - sigma eps_hat``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff import diffusion as d
from jaxdiff.samplers.common import (
    check_num_steps,
    denoiser,
    karras_sigma,
    one_per_step,
    run_loop,
    steps_result,
    t_from_sigma,
)
from jaxdiff.schedules import Schedule

__all__ = ["karras_sigmas", "clipped_sigma_max", "euler", "heun", "euler_ancestral", "euler_nfe", "heun_nfe"]


euler_nfe = one_per_step  # NFE of euler and euler_ancestral: n


def heun_nfe(num_steps):
    """NFE of :func:`heun`: ``2n - 1`` (the last step, onto ``sigma = 0``, is an Euler step)."""
    return 2 * num_steps - 1


def clipped_sigma_max(schedule: Schedule, sigma_max=None) -> jax.Array:
    """``sigma_max`` clipped to ``[sigmas[0], sigmas[T-1]]`` (``None``: ``sigmas[T-1]``); may be traced."""
    hi = schedule.sigmas[schedule.num_timesteps - 1]
    if sigma_max is None:
        return hi
    return jnp.clip(jnp.asarray(sigma_max, jnp.float32), schedule.sigmas[0], hi)


def karras_sigmas(schedule: Schedule, num_steps, i, rho=7.0, sigma_max=None) -> jax.Array:
    """``sigma_i`` of the ``num_steps``-point Karras grid (``0`` for ``i >= num_steps``); scalar, traceable.

    ``sigma_max``: the grid's first point, clipped to the schedule's range (``None``: ``sigmas[T-1]``).
    """
    return karras_sigma(i, num_steps, schedule.sigmas[0], clipped_sigma_max(schedule, sigma_max), rho)


def _step_sigmas(schedule: Schedule, num_steps, i, rho, sigma_max):
    """``(sigma_i, sigma_{i+1})`` of step ``i`` on the Karras grid."""
    return (karras_sigmas(schedule, num_steps, i, rho, sigma_max),
            karras_sigmas(schedule, num_steps, i + 1, rho, sigma_max))


def _setup(schedule: Schedule, model_fn: Callable, x_T, prediction: str, clip_x0: bool, sigma_max):
    """Returns ``(y, eps_fn)``: the VE-view start at ``sigma_max`` and ``eps_fn(y, sigma) -> (x0_hat, eps_hat)``."""
    denoise = denoiser(schedule, model_fn, prediction, clip_x0)
    T = schedule.num_timesteps
    b = x_T.shape[0]
    t_last = jnp.full((b,), T - 1, jnp.int32)
    # The prior's VP state, taken as the VP state at sigma_max (see the module docstring); y = x_vp / alpha.
    y = d.to_vp(schedule, x_T, t_last) * jnp.sqrt(1.0 + clipped_sigma_max(schedule, sigma_max) ** 2)

    def eps_fn(y, sigma):
        alpha = jax.lax.rsqrt(1.0 + sigma**2)
        return denoise(alpha * y, jnp.full((b,), t_from_sigma(schedule, sigma)))

    return y, eps_fn


def euler(schedule: Schedule, model_fn: Callable, x_T, key=None, *, num_steps=50, rho=7.0, sigma_max=80.0,
          prediction: str = "epsilon", clip_x0: bool = False):
    """Euler on the Karras grid (deterministic). Returns ``(x0 [B, ...], nfe = n)``; default ``n = 50``."""
    del key
    num_steps = check_num_steps(num_steps)
    y, eps_fn = _setup(schedule, model_fn, x_T, prediction, clip_x0, sigma_max)

    def body(i, y):
        sigma, sigma_next = _step_sigmas(schedule, num_steps, i, rho, sigma_max)
        x0, eps = eps_fn(y, sigma)
        return jnp.where(sigma_next > 0, y + (sigma_next - sigma) * eps, x0)

    return steps_result(num_steps, run_loop(body, y, num_steps), euler_nfe(num_steps))


def heun(schedule: Schedule, model_fn: Callable, x_T, key=None, *, num_steps=25, rho=7.0, sigma_max=80.0,
         prediction: str = "epsilon", clip_x0: bool = False):
    """Heun's 2nd-order method on the Karras grid (EDM Algorithm 1 without churn).

    Returns ``(x0 [B, ...], nfe = 2n - 1)``; default ``n = 25``.
    """
    del key
    num_steps = check_num_steps(num_steps)
    y, eps_fn = _setup(schedule, model_fn, x_T, prediction, clip_x0, sigma_max)

    def body(i, y):
        sigma, sigma_next = _step_sigmas(schedule, num_steps, i, rho, sigma_max)
        x0, eps = eps_fn(y, sigma)
        y_euler = y + (sigma_next - sigma) * eps

        def correct(_):
            _, eps_next = eps_fn(y_euler, sigma_next)
            return y + (sigma_next - sigma) * 0.5 * (eps + eps_next)

        # The predicate does not depend on the data, so this stays a cond under vmap over keys.
        return jax.lax.cond(sigma_next > 0, correct, lambda _: x0, None)

    return steps_result(num_steps, run_loop(body, y, num_steps), heun_nfe(num_steps))


def euler_ancestral(schedule: Schedule, model_fn: Callable, x_T, key, *, num_steps=50, eta=1.0, rho=7.0,
                    sigma_max=80.0, prediction: str = "epsilon", clip_x0: bool = False):
    """Euler ancestral on the Karras grid (k-diffusion's ``sample_euler_ancestral``).

    Each step goes down to ``sigma_down`` deterministically and adds noise ``sigma_up``:
    ``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))``,
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``eta = 1`` is the DDPM posterior in the VE view,
    ``eta = 0`` is :func:`euler`. ``eta >= 0`` may be traced. Returns ``(x0, nfe = n)``; default ``n = 50``.
    """
    num_steps = check_num_steps(num_steps)
    checks.check_nonnegative(eta, "eta")
    y, eps_fn = _setup(schedule, model_fn, x_T, prediction, clip_x0, sigma_max)

    def body(i, y):
        sigma, sigma_next = _step_sigmas(schedule, num_steps, i, rho, sigma_max)
        x0, eps = eps_fn(y, sigma)
        var_up = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
        sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(jnp.maximum(var_up, 0.0)))
        sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
        z = jax.random.normal(jax.random.fold_in(key, i), y.shape, y.dtype)
        y_new = y + (sigma_down - sigma) * eps + sigma_up * z
        return jnp.where(sigma_next > 0, y_new, x0)

    return steps_result(num_steps, run_loop(body, y, num_steps), euler_nfe(num_steps))

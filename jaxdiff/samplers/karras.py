"""Euler, Heun (with EDM's churn) and Euler-ancestral on the Karras et al. (2022, "EDM") sigma grid.

Written once against a :class:`jaxdiff.denoiser.Denoiser`, so they sample every model: a network
on a discrete schedule (through its VP / VE column), a flow-matching velocity and an EDM
denoiser alike. They work in VE coordinates ``x = x0 + sigma eps``, where the probability-flow ODE
is ``dx/dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 3 with ``s(t) = 1``, ``sigma(t) = t``).

Grid (EDM eq. 5, :func:`jaxdiff.diffusion.karras_sigma`): ``sigma_i = (smax^(1/rho) + i/(n-1)
(smin^(1/rho) - smax^(1/rho)))^rho`` for ``i = 0..n-1`` and ``sigma_n = 0``. ``smin`` / ``smax`` are
the options ``sigma_min`` / ``sigma_max`` clipped to the Denoiser's range (``None``: its ends), so a
schedule model's grid stays within ``[sigmas[0], sigmas[T-1]]``. It is computed inside the loop
from ``(i, n)``: ``n`` may be traced. :func:`heun_on_grid` takes an explicit grid instead
(:func:`jaxdiff.edm.sample`).

Start: ``x = sqrt(prior_data_var + smax^2) z`` for the unit normal ``z = x_T``. ``sigma_max``
defaults to 80, EDM's choice: a VP schedule's terminal ``sigma`` is far above the data's scale
(about 2e4 for the cosine schedule, 157 for the linear one) and steps spent there barely change
the sample; the start then neglects the data's share ``var(x0) / (1 + smax^2)`` of the variance
(``1.6e-4 var(x0)`` at 80).

NFE for ``n = num_steps`` steps: ``euler`` and ``euler_ancestral`` ``n``; ``heun`` ``2n - 1``:
every step adds a corrector evaluation at ``sigma_{i+1}`` except the last one, which lands on
``sigma_n = 0`` and returns the denoiser's output (EDM Algorithms 1 and 2). ``heun`` with
``s_churn > 0`` is EDM's Algorithm 2; the registry's ``edm`` is ``heun`` with EDM's 18 steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff.diffusion import bcast, karras_sigma
from jaxdiff.samplers.common import check_num_steps, one_per_step, run_loop, steps_result

__all__ = ["grid_sigma", "euler", "heun", "euler_ancestral", "heun_on_grid", "ode_step", "euler_nfe", "heun_nfe"]


euler_nfe = one_per_step  # NFE of euler and euler_ancestral: n


def heun_nfe(num_steps):
    """NFE of :func:`heun`: ``2n - 1`` (the last step, onto ``sigma = 0``, is an Euler step)."""
    return 2 * num_steps - 1


def _range(denoiser, sigma_min, sigma_max):
    """``(smin, smax)``: the options clipped to the Denoiser's range (``None``: its ends)."""
    lo, hi = denoiser.sigma_min, denoiser.sigma_max
    smin = lo if sigma_min is None else jnp.clip(jnp.asarray(sigma_min, jnp.float32), lo, hi)
    if sigma_max is None:
        if isinstance(hi, (int, float)) and not math.isfinite(hi):
            raise ValueError("sigma_max=None means the model's largest noise level, and this model knows every "
                             "level: pass a finite sigma_max (EDM's is 80)")
        smax = hi
    else:
        smax = jnp.clip(jnp.asarray(sigma_max, jnp.float32), lo, hi)
    return smin, smax


def grid_sigma(denoiser, num_steps, i, rho=7.0, sigma_min=None, sigma_max=80.0) -> jax.Array:
    """``sigma_i`` of the ``num_steps``-point Karras grid on the Denoiser's range (0 for ``i >= n``); traceable."""
    smin, smax = _range(denoiser, sigma_min, sigma_max)
    return karras_sigma(i, num_steps, smin, smax, rho)


def _start(denoiser, x_T, smax) -> jax.Array:
    return jnp.sqrt(denoiser.prior_data_var + jnp.asarray(smax, jnp.float32) ** 2) * jnp.asarray(x_T, jnp.float32)


def _deriv(denoiser, x, sigma):
    """``(D(x, sigma), (x - D) / sigma)``: the denoised estimate and ``dx/dsigma`` (``sigma`` scalar or
    ``[B]``); one evaluation."""
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    den = denoiser.fn(x, sigma).astype(jnp.float32)
    return den, (x - den) / bcast(sigma, x)


def _step(denoiser, x, d, sigma, sigma_next, corrector: bool):
    """From ``x`` at ``sigma`` with slope ``d`` to ``sigma_next > 0``: Euler, and with ``corrector``
    Heun's trapezoid (one more evaluation, at ``sigma_next``). ``sigma``, ``sigma_next``: scalar or ``[B]``."""
    h = bcast(jnp.asarray(sigma_next, jnp.float32) - sigma, x)
    x_euler = x + h * d
    if not corrector:
        return x_euler
    return x + h * 0.5 * (d + _deriv(denoiser, x_euler, sigma_next)[1])


def ode_step(denoiser, x, sigma, sigma_next, *, corrector: bool = True) -> jax.Array:
    """One deterministic step of :func:`heun` (``corrector``, 2 evaluations) or :func:`euler` (1) of the
    probability-flow ODE from ``x`` ``[B, ...]`` at ``sigma`` to ``sigma_next`` (``[B]`` or scalars, both
    positive): the step of those samplers' chains, for one example's own levels (consistency distillation's
    teacher move)."""
    _, d = _deriv(denoiser, x, sigma)
    return _step(denoiser, x, d, sigma, sigma_next, corrector)


def _chain(denoiser, x, sigma_at: Callable, num_steps, key, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"),
           s_noise=1.0, corrector: bool = True, noise=None):
    """The one Euler / Heun body (EDM Algorithm 2) over ``sigma_at(i)``, ``i = 0..n``, ``sigma_n = 0``."""
    gamma_max = jnp.minimum(s_churn / jnp.maximum(jnp.asarray(num_steps), 1).astype(jnp.float32),
                            math.sqrt(2.0) - 1.0)

    def body(i, x):
        sigma, sigma_next = sigma_at(i), sigma_at(i + 1)
        gamma = jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma_max, 0.0)
        sigma_hat = sigma * (1.0 + gamma)
        if noise is not None:
            z = noise[i]
        elif key is not None:  # draw nothing where gamma = 0 (the predicate does not depend on the data)
            z = jax.lax.cond(gamma > 0, lambda: jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype),
                             lambda: jnp.zeros_like(x))
        else:
            z = jnp.zeros_like(x)
        x_hat = x + jnp.sqrt(jnp.maximum(sigma_hat**2 - sigma**2, 0.0)) * s_noise * z
        den, d = _deriv(denoiser, x_hat, sigma_hat)
        if not corrector:
            return jnp.where(sigma_next > 0, _step(denoiser, x_hat, d, sigma_hat, sigma_next, False), den)

        def correct(_):
            return _step(denoiser, x_hat, d, sigma_hat, sigma_next, True)

        # The predicate does not depend on the data, so this stays a cond under vmap over keys.
        return jax.lax.cond(sigma_next > 0, correct, lambda _: den, None)

    return run_loop(body, x, num_steps)


def _check_churn(key, s_churn):
    if key is None and not (isinstance(s_churn, (int, float)) and s_churn == 0):
        raise ValueError(f"s_churn={s_churn!r} adds noise: pass `key` (or s_churn=0.0)")
    checks.check_nonnegative(s_churn, "s_churn")


def euler(denoiser, x_T, key=None, *, num_steps=50, rho=7.0, sigma_min=None, sigma_max=80.0):
    """Euler on the Karras grid (deterministic) from the unit normal ``x_T`` ``[B, ...]``.

    Returns ``(x0 [B, ...], nfe = n)``; default ``n = 50``.
    """
    del key
    num_steps = check_num_steps(num_steps)
    smin, smax = _range(denoiser, sigma_min, sigma_max)
    at = lambda i: karras_sigma(i, num_steps, smin, smax, rho)
    x = _chain(denoiser, _start(denoiser, x_T, smax), at, num_steps, None, corrector=False)
    return steps_result(num_steps, x, euler_nfe(num_steps))


def heun(denoiser, x_T, key=None, *, num_steps=25, rho=7.0, sigma_min=None, sigma_max=80.0, s_churn=0.0,
         s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Heun's 2nd-order method on the Karras grid: EDM Algorithm 1, and Algorithm 2 with ``s_churn > 0``.

    Step ``i``: ``gamma_i = min(s_churn / n, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax`` else 0;
    ``sigma_hat = (1 + gamma_i) sigma_i``; ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise z_i``
    (``z_i`` from ``fold_in(key, i)``); an Euler step to ``sigma_{i+1}`` and, if ``sigma_{i+1} > 0``,
    the trapezoidal correction. The churn settings may be traced.
    Returns ``(x0 [B, ...], nfe = 2n - 1)``; default ``n = 25``.
    """
    num_steps = check_num_steps(num_steps)
    _check_churn(key, s_churn)
    smin, smax = _range(denoiser, sigma_min, sigma_max)
    at = lambda i: karras_sigma(i, num_steps, smin, smax, rho)
    x = _chain(denoiser, _start(denoiser, x_T, smax), at, num_steps, key, s_churn=s_churn, s_tmin=s_tmin,
               s_tmax=s_tmax, s_noise=s_noise)
    return steps_result(num_steps, x, heun_nfe(num_steps))


def heun_on_grid(denoiser, x, sigmas, key=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,
                 noise=None):
    """:func:`heun` from ``x`` at ``sigmas[0]`` over an explicit decreasing grid ``sigmas`` ``[M + 1]``.

    The chain runs ``N`` steps, ``N`` the index of the grid's first zero (``M`` if none: it then
    stops at ``sigmas[M] > 0`` with a corrected step), so one zero-padded grid serves every step
    count. ``noise``: optional ``[M, B, ...]`` unit normals ``z_i`` instead of ``key``.
    Returns ``(x_N, {"nfe", "num_steps"})`` (int32 scalars).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be a 1-D grid of at least 2 points, got shape {sigmas.shape}")
    capacity = sigmas.shape[0] - 1
    x = jnp.asarray(x, jnp.float32)
    if noise is not None and noise.shape != (capacity,) + x.shape:
        raise ValueError(f"noise must have shape [len(sigmas) - 1, *x.shape] = {(capacity,) + x.shape}, "
                         f"got {noise.shape}")
    if noise is None:
        _check_churn(key, s_churn)
    positive = sigmas[:capacity] > 0
    n = jnp.where(jnp.all(positive), capacity, jnp.argmin(positive)).astype(jnp.int32)
    out = _chain(denoiser, x, lambda i: sigmas[i], n, key, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                 s_noise=s_noise, noise=noise)
    evals = n + jnp.sum(jnp.where(jnp.arange(capacity) < n, sigmas[1:] > 0, False))
    return out, {"nfe": evals.astype(jnp.int32), "num_steps": n}


def euler_ancestral(denoiser, x_T, key, *, num_steps=50, eta=1.0, rho=7.0, sigma_min=None, sigma_max=80.0):
    """Euler ancestral on the Karras grid (k-diffusion's ``sample_euler_ancestral``).

    Each step goes down to ``sigma_down`` deterministically and adds noise ``sigma_up``:
    ``sigma_up = min(sigma', eta sqrt(sigma'^2 (sigma^2 - sigma'^2) / sigma^2))``,
    ``sigma_down = sqrt(sigma'^2 - sigma_up^2)``; ``eta = 1`` is the DDPM posterior in the VE view,
    ``eta = 0`` is :func:`euler`. ``eta >= 0`` may be traced. Returns ``(x0, nfe = n)``; default ``n = 50``.
    """
    num_steps = check_num_steps(num_steps)
    checks.check_nonnegative(eta, "eta")
    smin, smax = _range(denoiser, sigma_min, sigma_max)

    def body(i, x):
        sigma = karras_sigma(i, num_steps, smin, smax, rho)
        sigma_next = karras_sigma(i + 1, num_steps, smin, smax, rho)
        den, d = _deriv(denoiser, x, sigma)
        var_up = sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2
        sigma_up = jnp.minimum(sigma_next, eta * jnp.sqrt(jnp.maximum(var_up, 0.0)))
        sigma_down = jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0))
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return jnp.where(sigma_next > 0, x + (sigma_down - sigma) * d + sigma_up * z, den)

    x = run_loop(body, _start(denoiser, x_T, smax), num_steps)
    return steps_result(num_steps, x, euler_nfe(num_steps))


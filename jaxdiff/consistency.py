"""Consistency models by consistency training, the iCT recipe (Song & Dhariwal 2023, "Improved
Techniques for Training Consistency Models"; Song et al. 2023).

A consistency function ``f(x, sigma)`` maps any point of a probability-flow trajectory (VE
coordinates ``x = x0 + sigma z``, EDM's) to the trajectory's end at ``sigma_min``. It is
parameterised so that the boundary condition ``f(x, sigma_min) = x`` holds exactly
(:func:`coefficients`):

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),
    c_skip = sigma_d^2 / ((sigma - sigma_min)^2 + sigma_d^2),
    c_out = sigma_d (sigma - sigma_min) / sqrt(sigma_d^2 + sigma^2),   c_in = 1 / sqrt(sigma^2 + sigma_d^2).

Consistency training (no teacher, no EMA target) on the Karras grid of ``N(k)`` points
(:func:`karras_grid`, the library's one Karras formula in increasing order; :func:`num_scales`:
the curriculum doubling ``N`` from ``s0 = 10`` to ``s1 = 1280`` over training): draw ``i`` with
iCT's log-normal weights (:func:`level_probs`), and minimise

    lambda(sigma_i) d(f(x0 + sigma_{i+1} z, sigma_{i+1}), sg(f(x0 + sigma_i z, sigma_i)))

with ``lambda = 1 / (sigma_{i+1} - sigma_i)`` and the pseudo-Huber ``d(a, b) = sqrt(||a - b||^2 +
c^2) - c``, ``c = 0.00054 sqrt(dim)`` (:func:`ct_loss`).

Consistency distillation (CD, Song et al. 2023, Algorithm 2; :func:`cd_loss`): the point at the lower
level is the teacher's one ODE step from ``x_{i+1} = x0 + sigma_{i+1} z`` down to ``sigma_i`` instead of
``x0 + sigma_i z``; the target ``f(x_hat_i, sigma_i)`` uses the same parameters under stop-gradient
(as iCT: no EMA target). The same weight ``lambda`` and distance (pseudo-Huber, or ``l2``: ``||a - b||^2``
per element's mean) serve both.

Sampling (:mod:`jaxdiff.samplers.consistency`): ``x0 = f(sigma_max z, sigma_max)``, then for each
further level ``sigma``: ``x0 = f(x0 + sqrt(sigma^2 - sigma_min^2) z', sigma)`` (multistep).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff.diffusion import bcast, karras_sigma

__all__ = ["coefficients", "num_scales", "karras_grid", "level_probs", "pseudo_huber", "DISTANCES", "ct_loss",
           "cd_loss"]


def coefficients(sigma, *, sigma_data=0.5, sigma_min=0.002):
    """``(c_skip, c_out, c_in)`` of the consistency parameterisation (module docstring); ``c_skip(sigma_min) = 1``
    and ``c_out(sigma_min) = 0`` exactly."""
    c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)
    c_out = sigma_data * (sigma - sigma_min) * jax.lax.rsqrt(sigma_data**2 + sigma**2)
    c_in = jax.lax.rsqrt(sigma**2 + sigma_data**2)
    return c_skip, c_out, c_in


def num_scales(step, total_steps: int, *, s0: int = 10, s1: int = 1280):
    """iCT's discretisation curriculum: ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` with
    ``K' = floor(K / (log2(s1 / s0) + 1))``. ``step`` may be traced; returns int32."""
    k_prime = max(math.floor(total_steps / (math.log2(s1 / s0) + 1)), 1)
    doublings = jnp.asarray(step, jnp.int32) // k_prime
    n = jnp.minimum(s0 * jnp.left_shift(1, jnp.minimum(doublings, 30)), s1)
    return (n + 1).astype(jnp.int32)


def karras_grid(i, n, *, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Level ``i`` of the ``n``-point Karras grid in increasing order (``sigma_0 = sigma_min``,
    ``sigma_{n-1} = sigma_max``): :func:`jaxdiff.diffusion.karras_sigma` read backwards. Traceable."""
    return karras_sigma(jnp.asarray(n) - 1 - jnp.asarray(i), n, sigma_min, sigma_max, rho)


def level_probs(n, max_scales: int = 1281, *, p_mean=-1.1, p_std=2.0, **grid) -> jax.Array:
    """iCT's ``p(i) ∝ erf((ln sigma_{i+1} - P_mean) / (sqrt2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt2 P_std))``
    for ``i = 0..n-2`` of an ``n``-point grid, as ``[max_scales - 1]`` (zero past ``n - 2``; ``n`` may be traced)."""
    i = jnp.arange(max_scales - 1)
    lo = jnp.log(karras_grid(i, n, **grid))
    hi = jnp.log(karras_grid(i + 1, n, **grid))
    w = jax.scipy.special.erf((hi - p_mean) / (math.sqrt(2.0) * p_std)) - jax.scipy.special.erf(
        (lo - p_mean) / (math.sqrt(2.0) * p_std))
    w = jnp.where(i < n - 1, w, 0.0)
    return w / jnp.sum(w)


def pseudo_huber(a, b, c):
    """``sqrt(||a - b||^2 + c^2) - c`` per example (``[B]``), the norm over all but the first axis."""
    sq = jnp.sum(((a - b) ** 2).reshape(a.shape[0], -1), axis=-1)
    return jnp.sqrt(sq + c**2) - c


#: The distances ``d`` of :func:`ct_loss` and :func:`cd_loss`.
DISTANCES = ("pseudo_huber", "l2")


def _consistency_loss(pred, target, x0, sigma, sigma_next, c, distance):
    """``mean(lambda d(pred, sg(target)))`` with ``lambda = 1 / (sigma_next - sigma)``, and the metrics."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if pred.shape != x0.shape:
        raise ValueError(f"the consistency function returned shape {pred.shape}; expected {x0.shape}")
    b = x0.shape[0]
    target = jax.lax.stop_gradient(target.astype(jnp.float32))
    pred = pred.astype(jnp.float32)
    sq = jnp.mean(((pred - target) ** 2).reshape(b, -1), axis=-1)
    if distance == "l2":
        d = sq
    else:
        d = pseudo_huber(pred, target, 0.00054 * math.sqrt(math.prod(x0.shape[1:])) if c is None else c)
    loss = jnp.mean(d / (sigma_next - sigma))
    return loss, {"loss": loss, "mse": jnp.mean(sq)}


def ct_loss(f: Callable, x0: jax.Array, *, sigma: jax.Array, sigma_next: jax.Array, noise: jax.Array,
            c: float | None = None, distance: str = "pseudo_huber"):
    """The consistency-training loss of ``f(x [B, ...], sigma [B])``. Returns ``(loss, metrics)``.

    ``sigma < sigma_next`` ``[B]`` are adjacent grid levels; ``noise`` ``z`` is shared by both points.
    ``c``: the pseudo-Huber constant (default ``0.00054 sqrt(dim)``, dim = elements per example);
    ``distance``: one of :data:`DISTANCES`.
    """
    target = f(x0 + bcast(sigma, x0) * noise, sigma)
    pred = f(x0 + bcast(sigma_next, x0) * noise, sigma_next)
    return _consistency_loss(pred, target, x0, sigma, sigma_next, c, distance)


def cd_loss(f: Callable, teacher_move: Callable, x0: jax.Array, *, sigma: jax.Array, sigma_next: jax.Array,
            noise: jax.Array, c: float | None = None, distance: str = "pseudo_huber"):
    """The consistency-distillation loss of ``f(x [B, ...], sigma [B])``. Returns ``(loss, metrics)``.

    ``teacher_move(x [B, ...], sigma_from [B], sigma_to [B])``: the teacher's ODE step (e.g. one step of
    :func:`jaxdiff.samplers.karras.ode_step` through its Denoiser), under stop-gradient. ``sigma <
    sigma_next`` ``[B]``: adjacent grid levels; ``noise``: the unit ``z`` of ``x_{i+1} = x0 + sigma_next z``.
    ``c``, ``distance``: as :func:`ct_loss`.
    """
    x_next = x0 + bcast(sigma_next, x0) * noise
    x_hat = jax.lax.stop_gradient(teacher_move(x_next, sigma_next, sigma).astype(jnp.float32))
    if x_hat.shape != x0.shape:
        raise ValueError(f"the teacher's move returned shape {x_hat.shape}; expected {x0.shape}")
    return _consistency_loss(f(x_next, sigma_next), f(x_hat, sigma), x0, sigma, sigma_next, c, distance)

"""Flow matching with the linear interpolant (rectified flow; Lipman et al. 2023, Liu et al. 2023).

Time convention: ``t in [0, 1]``, ``t = 0`` is data and ``t = 1`` is noise:

    x_t = (1 - t) x0 + t eps,   eps ~ N(0, I),   dx_t/dt = eps - x0.

The network ``model_fn(x_t [B, ...], t [B] float in [0, 1]) -> [B, ...]`` regresses the
velocity ``v = eps - x0`` (:func:`flow_matching_loss`); its minimizer is
``E[eps - x0 | x_t]``, whose ODE ``dx/dt = v(x, t)`` carries ``N(0, I)`` at ``t = 1`` to the data at
``t = 0``. That ODE is EDM's probability-flow ODE in other coordinates (``t = sigma / (1 + sigma)``,
``x_t = x / (1 + sigma)``), so the velocity is sampled as a :class:`jaxdiff.denoiser.Denoiser`
(:func:`jaxdiff.denoiser.velocity_denoiser`) by the one Euler / Heun of
:mod:`jaxdiff.samplers.karras`, on the Karras grid from ``sigma = 80`` (``t = 0.988``) down.

A :class:`jaxdiff.models.UNet` embeds its timestep sinusoidally with frequencies made for
integers ``0..999``; give it ``t`` scaled to that range::

    model_fn = with_time_scale(lambda x, t: net.apply({"params": p}, x, t, train=False), 999.0)

NFE: :func:`sample` with ``method="euler"`` uses ``n``, ``method="heun"`` ``2n - 1`` (the
registry's counts: the last step lands on ``sigma = 0`` and is not corrected). Both run as one
``lax`` loop; ``n`` may be traced. A concrete ``n < 1`` raises ``ValueError``; a traced one gives
NaN samples and NFE 0, the rule of every fixed-step sampler (:func:`jaxdiff.samplers.common.steps_result`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff.denoiser import velocity_denoiser
from jaxdiff.diffusion import bcast
from jaxdiff.samplers import registry, sample_denoiser

__all__ = ["METHODS", "interpolate", "velocity_target", "flow_matching_loss", "sample", "sample_with_info",
           "nfe", "with_time_scale"]

METHODS = ("euler", "heun")


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """``x_t = (1 - t) x0 + t noise`` with ``t`` ``[B]``."""
    return (1.0 - bcast(t, x0)) * x0 + bcast(t, x0) * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """``dx_t/dt = noise - x0``."""
    return noise - x0


def with_time_scale(model_fn: Callable, scale: float = 999.0) -> Callable:
    """``fn(x, t) = model_fn(x, scale * t)``: feeds ``t in [0, 1]`` to a network made for ``[0, scale]``."""
    return lambda x, t: model_fn(x, scale * t)


def flow_matching_loss(model_fn: Callable, x0: jax.Array, key: jax.Array, *, t: jax.Array | None = None,
                       noise: jax.Array | None = None):
    """Conditional flow-matching loss ``E ||model_fn(x_t, t) - (eps - x0)||^2`` (mean over all axes).

    ``x0``: ``[B, ...]`` clean data (images in ``[-1, 1]``, :func:`jaxdiff.checks.check_data`).
    ``t ~ U[0, 1)`` ``[B]`` and ``noise ~ N(0, I)`` are drawn from ``key`` unless given.
    Returns ``(loss, {"loss", "mse", "target_norm"})``.
    """
    checks.check_key(key)
    x0 = checks.check_data(x0, "x0")
    if t is not None and jnp.shape(t) != (x0.shape[0],):
        raise ValueError(f"t must have shape [B]={x0.shape[:1]}, got {jnp.shape(t)}")
    if noise is not None and noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}")
    k_t, k_n = jax.random.split(key)
    if t is None:
        t = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32)
    if noise is None:
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
    pred = model_fn(interpolate(x0, noise, t), t)
    if pred.shape != x0.shape:
        raise ValueError(f"model_fn returned shape {pred.shape}; expected {x0.shape}")
    target = velocity_target(x0, noise)
    mse = jnp.mean((pred.astype(jnp.float32) - target) ** 2)
    return mse, {"loss": mse, "mse": mse, "target_norm": jnp.mean(target**2)}


def nfe(method: str, num_steps):
    """Network evaluations of :func:`sample`: ``n`` (euler), ``2n - 1`` (heun)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return registry.nfe(method, num_steps)


def sample_with_info(model_fn: Callable, key, shape, *, method: str = "euler", num_steps=50, x1=None, **options):
    """Integrates ``dx/dt = model_fn(x, t)`` from ``x1 ~ N(0, I)`` at ``t = 1`` to ``t = 0``.

    ``method``: ``"euler"`` or ``"heun"`` (:mod:`jaxdiff.samplers.karras`, whose ``options``
    such as ``sigma_max`` or ``rho`` are forwarded). ``x1`` optionally replaces the noise draw.
    Returns ``(x0 [B, ...], {"nfe": n or 2n - 1})``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x1 is None:
        checks.check_key(key)
    elif key is None:
        key = jax.random.key(0)  # unused: euler and heun without churn draw nothing
    model_fn = checks.shape_checked(checks.check_callable(model_fn, "model_fn"), "model_fn")
    return sample_denoiser(velocity_denoiser(model_fn), key, shape, sampler=method, num_steps=num_steps, x_T=x1,
                           **options)


def sample(model_fn: Callable, key, shape, *, method: str = "euler", num_steps=50, x1=None, **options) -> jax.Array:
    """Like :func:`sample_with_info`, returning the samples ``[B, ...]`` only."""
    return sample_with_info(model_fn, key, shape, method=method, num_steps=num_steps, x1=x1, **options)[0]

"""MeanFlow (Geng et al. 2025, "Mean Flows for One-step Generative Modeling"): average velocities.

The linear interpolant of :mod:`jaxdiff.flow`, ``z_t = (1 - t) x0 + t eps`` (``t in [0, 1]``,
``t = 1`` noise), has the instantaneous velocity ``v = eps - x0``. MeanFlow's network predicts
the *average* velocity over ``[r, t]``,

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,   so that   z_r = z_t - (t - r) u(z_t, r, t),

and is trained on the MeanFlow identity (eq. 6) ``u = v - (t - r) du/dt`` with the total
derivative along the trajectory, ``du/dt = v d_z u + d_t u``: the target
``u_tgt = v - (t - r) jvp(u, (z, r, t), (v, 0, 1))`` under stop-gradient (:func:`meanflow_target`),
the loss ``||u - sg(u_tgt)||^2`` with the adaptive weight ``sg(1 / (||Delta||^2 + c)^p)``
(:func:`meanflow_loss`). ``(r, t)`` are drawn by :func:`sample_r_t`: two logit-normal times
``t >= r``, and ``r = t`` (plain flow matching) for a share ``1 - ratio`` of the examples.

Classifier-free guidance folded into training (MeanFlow's Sec. 4.2 and its Appendix eq. with
``kappa``): for an example with a label ``c``, ``v`` is replaced by the guided field

    v_tilde = omega v + kappa u(z_t, t, t | c) + (1 - omega - kappa) u(z_t, t, t | null)

(:func:`guided_velocity`; ``u(., t, t)`` the network's own instantaneous velocity under
stop-gradient) in the target and in the JVP's tangent; null-label examples keep ``v``. At the fixed
point the network's conditional velocity is ``w v(z, t | c) + (1 - w) v(z, t)`` with the effective
scale ``w = omega / (1 - kappa)``, so its 1-step samples are guided with no guidance at sampling.
``omega = 1, kappa = 0`` is plain MeanFlow.

``u(z, t, t) = v(z, t)``, so the same network is also a flow model
(:func:`jaxdiff.denoiser.average_velocity_denoiser`); the registry's ``meanflow`` sampler makes
``n`` jumps (:mod:`jaxdiff.samplers.meanflow`), one for one-step generation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff.diffusion import bcast
from jaxdiff.flow import interpolate, velocity_target

__all__ = ["sample_r_t", "meanflow_target", "guided_velocity", "check_guidance", "meanflow_loss"]


def sample_r_t(key, *, ratio: float = 0.25, mu: float = -0.4, sigma: float = 1.0) -> jax.Array:
    """One example's ``[r, t]`` (``0 <= r <= t < 1``): MeanFlow's time sampler (its Table 1a/1b).

    Two draws ``sigmoid(N(mu, sigma^2))``; ``t`` is the larger, ``r`` the smaller, and with
    probability ``1 - ratio`` ``r = t``. Returns ``[2]`` float32.
    """
    k_pair, k_keep = jax.random.split(key)
    a, b = jax.nn.sigmoid(mu + sigma * jax.random.normal(k_pair, (2,), jnp.float32))
    t, r = jnp.maximum(a, b), jnp.minimum(a, b)
    r = jnp.where(jax.random.bernoulli(k_keep, ratio), r, t)
    return jnp.stack([r, t])


def meanflow_target(u_fn: Callable, z: jax.Array, r: jax.Array, t: jax.Array, v: jax.Array):
    """``(u(z, r, t), u_tgt)``: the prediction and the MeanFlow target ``v - (t - r) du/dt``.

    ``u_fn(z [B, ...], r [B], t [B]) -> [B, ...]``; ``du/dt`` is one ``jax.jvp`` with tangent
    ``(v, 0, 1)``. The target is under ``stop_gradient``; the prediction is differentiable.
    """
    u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
    target = v - bcast(t - r, z) * dudt.astype(jnp.float32)
    return u, jax.lax.stop_gradient(target)


def guided_velocity(v: jax.Array, u_cond: jax.Array, u_null: jax.Array, conditional: jax.Array, *,
                    omega: float, kappa: float = 0.0) -> jax.Array:
    """``omega v + kappa u_cond + (1 - omega - kappa) u_null`` where ``conditional`` ``[B]`` (bool), else ``v``.

    ``v``, ``u_cond`` (``u(z, t, t | c)``), ``u_null`` (``u(z, t, t | null)``): ``[B, ...]``; the
    network's terms are put under ``stop_gradient`` here.
    """
    u_cond, u_null = jax.lax.stop_gradient(u_cond), jax.lax.stop_gradient(u_null)
    guided = omega * v + kappa * u_cond + (1.0 - omega - kappa) * u_null
    return jnp.where(bcast(conditional, v), guided, v)


def check_guidance(omega, kappa, prefix: str = "") -> None:
    """``ValueError`` naming ``prefix + guidance`` / ``guidance_kappa`` unless ``omega > 0`` and ``0 <= kappa < 1``."""
    if not omega > 0:
        raise ValueError(f"{prefix}guidance={omega!r}: must be positive (1: no guidance)")
    if not 0.0 <= kappa < 1.0:
        raise ValueError(f"{prefix}guidance_kappa={kappa!r}: must lie in [0, 1) (0: MeanFlow's plain CFG)")


def meanflow_loss(u_fn: Callable, x0: jax.Array, *, r: jax.Array, t: jax.Array, noise: jax.Array,
                  p: float = 1.0, c: float = 1e-3, guidance: float = 1.0, guidance_kappa: float = 0.0,
                  u_null_fn: Callable | None = None, conditional: jax.Array | None = None):
    """MeanFlow's loss (eq. 9 with the adaptive weighting of its Sec. 4.3). Returns ``(loss, metrics)``.

    Args:
      u_fn: ``u(z [B, ...], r [B], t [B]) -> [B, ...]``.
      x0: ``[B, ...]`` data; r, t: ``[B]`` times (:func:`sample_r_t`); noise: unit normal like ``x0``.
      p, c: the weight ``sg(1 / (e_b + c)^p)`` of example ``b``'s error ``e_b`` (the mean squared
        error over its elements; ``p = 0``: plain L2).
      guidance, guidance_kappa: ``omega`` and ``kappa`` of the guided field (module docstring;
        ``1, 0``: off). With guidance on, ``u_null_fn(z, r, t)`` is ``u`` under the null label and
        ``conditional`` ``[B]`` (bool) marks the examples with a label.
    Returns the weighted mean and ``{"loss", "mse"`` (the unweighted mean squared error)``}``.
    """
    check_guidance(guidance, guidance_kappa)
    guided = guidance != 1.0 or guidance_kappa != 0.0
    x0 = checks.as_float_array(x0, "x0")
    b = x0.shape[0]
    for name, a in (("r", r), ("t", t)):
        if jnp.shape(a) != (b,):
            raise ValueError(f"{name} must have shape [B]=({b},), got {jnp.shape(a)}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}")
    if guided and (u_null_fn is None or conditional is None or jnp.shape(conditional) != (b,)):
        raise ValueError("guidance != 1 or guidance_kappa != 0 needs u_null_fn and conditional [B] "
                         "(a class-conditional network)")
    z = interpolate(x0, noise, t)
    v = velocity_target(x0, noise)
    if guided:
        v = guided_velocity(v, u_fn(z, t, t), u_null_fn(z, t, t), conditional, omega=guidance, kappa=guidance_kappa)
    u, target = meanflow_target(u_fn, z, r, t, v)
    if u.shape != x0.shape:
        raise ValueError(f"u_fn returned shape {u.shape}; expected {x0.shape}")
    err = jnp.mean(((u.astype(jnp.float32) - target) ** 2).reshape(b, -1), axis=-1)
    weight = jax.lax.stop_gradient(1.0 / (err + c) ** p)
    loss = jnp.mean(weight * err)
    return loss, {"loss": loss, "mse": jnp.mean(err)}

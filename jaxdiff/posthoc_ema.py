"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "EDM2", sec. 3 and App. C).

A power-function EMA with exponent ``gamma`` averages the parameters ``theta_tau`` seen up to step
``t`` with the profile ``p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)`` on ``(0, t]`` (EDM2 eq. 2).
Its width is given by the relative standard deviation ``sigma_rel`` (the profile's standard
deviation divided by ``t``), ``sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))``
(EDM2 eq. 123): :func:`gamma_to_sigma_rel`, and its inverse :func:`sigma_rel_to_gamma` which
takes the largest real root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0``,
``s = sigma_rel^-2`` (EDM2 eq. 126, Algorithm 2). ``sigma_rel = 0.05`` is ``gamma = 16.97``,
``0.10`` is ``6.94``.

Tracking (EDM2 eq. 127, :func:`update`): after optimizer step ``t = 1, 2, ...``,
``theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t``, ``beta_t = (1 - 1/t)^(gamma + 1)``,
whose weights ``(tau^(gamma+1) - (tau-1)^(gamma+1)) / t^(gamma+1)`` are the profile integrated
over ``(tau - 1, tau]``. Several ``sigma_rel`` are tracked at once in one :class:`PowerEMAState`
(leaves ``[K, ...]``).

Reconstruction (EDM2 App. C.2-C.3, :func:`solve_posthoc_coefficients`, :func:`reconstruct`): given
snapshots ``theta_hat_i`` of profiles ``(t_i, gamma_i)``, the combination ``sum_i x_i theta_hat_i``
whose profile is closest in L2 to the target ``(t, gamma)`` solves ``A x = b`` with the inner
products ``A_ij = <p_i, p_j>``, ``b_i = <p_i, p_target>`` of power-function profiles
(EDM2 eq. 151, Algorithm 3), ``<p_a, p_b> = (g_a + 1)(g_b + 1) (t_a/t_b)^(g_b) / ((g_a + g_b + 1) t_b)``
for ``t_a <= t_b`` (symmetric otherwise); ``x`` is then normalized to sum to 1. The system is
ill-conditioned, so it is solved on the host in float64 NumPy (the inputs are a handful of step
counts and exponents); the combination of the snapshot pytrees is a JAX function.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PowerEMAState",
    "gamma_to_sigma_rel",
    "sigma_rel_to_gamma",
    "power_beta",
    "init",
    "update",
    "profile_inner_product",
    "solve_posthoc_coefficients",
    "combine",
    "reconstruct",
]


def gamma_to_sigma_rel(gamma):
    """EDM2 eq. 123: ``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (float64 NumPy)."""
    gamma = np.asarray(gamma, np.float64)
    return np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def sigma_rel_to_gamma(sigma_rel):
    """EDM2 eq. 126 / Algorithm 2: the exponent of relative standard deviation ``sigma_rel`` (float64 NumPy).

    The largest real root of ``gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s)``, ``s = sigma_rel^-2``.
    Raises ``ValueError`` unless every ``sigma_rel`` gives a profile (``gamma > -1``), which holds
    for ``0 < sigma_rel <= 0.28`` (``sigma_rel = 1/sqrt(12) = 0.2887`` is ``gamma = 0``, the uniform average).
    """
    sr = np.asarray(sigma_rel, np.float64)
    if not np.all(np.isfinite(sr)) or np.any(sr <= 0):
        raise ValueError(f"sigma_rel must be positive and finite, got {sigma_rel!r}")
    out = []
    for s in sr.reshape(-1) ** -2.0:
        roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
        out.append(roots[np.abs(roots.imag) < 1e-9].real.max())
    gamma = np.asarray(out, np.float64).reshape(sr.shape)
    if np.any(gamma <= -1.0 + 1e-6):
        raise ValueError(f"sigma_rel={sigma_rel!r} is too wide for a power-function profile (gamma <= -1); "
                         "use sigma_rel <= 0.28")
    return gamma


def _one_minus_beta(gamma, step):
    """``1 - beta_t = -expm1((gamma + 1) log1p(-1/t))``: accurate in float32 for millions of steps, where
    ``1 - 1/t`` itself would round to a few percent of ``1/t``."""
    t = jnp.asarray(step, jnp.float32)
    return -jnp.expm1((jnp.asarray(gamma, jnp.float32) + 1.0) * jnp.log1p(-1.0 / t))


def power_beta(gamma, step):
    """EDM2 eq. 127: ``beta_t = (1 - 1/t)^(gamma + 1)`` (0 at ``t = 1``, which copies the parameters)."""
    return 1.0 - _one_minus_beta(gamma, step)


@flax.struct.dataclass
class PowerEMAState:
    """Power-function EMAs of one parameter pytree for ``K`` exponents."""

    gammas: jax.Array  # [K] exponents of the tracked profiles
    ema: Any  # the parameter pytree with every leaf [K, ...]: ema[k] is the average for gammas[k]


def init(params, sigma_rels: Sequence[float]) -> PowerEMAState:
    """A state tracking every ``sigma_rel`` (e.g. EDM2's ``(0.05, 0.10)``), each EMA equal to ``params``."""
    sigma_rels = np.asarray(sigma_rels, np.float64)
    if sigma_rels.ndim != 1 or sigma_rels.size < 1:
        raise ValueError(f"sigma_rels must be a non-empty sequence, got {sigma_rels!r}")
    gammas = sigma_rel_to_gamma(sigma_rels)
    k = gammas.shape[0]
    ema = jax.tree_util.tree_map(lambda p: jnp.broadcast_to(jnp.asarray(p), (k,) + jnp.shape(p)).astype(jnp.float32),
                                 params)
    return PowerEMAState(gammas=jnp.asarray(gammas, jnp.float32), ema=ema)


def update(state: PowerEMAState, params, step) -> PowerEMAState:
    """EDM2 eq. 127 for every tracked exponent: ``ema_k <- beta_k ema_k + (1 - beta_k) params``.

    ``step`` is ``t >= 1``, the number of optimizer steps taken including the one that produced
    ``params`` (a training state's step counter after its increment); it may be traced.
    """
    w = _one_minus_beta(state.gammas, step)  # [K]

    def one(e, p):
        return e + w.reshape(w.shape + (1,) * (e.ndim - 1)) * (jnp.asarray(p, jnp.float32)[None] - e)

    return state.replace(ema=jax.tree_util.tree_map(one, state.ema, params))


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
    """``<p_a, p_b> = int_0^inf p_a(tau) p_b(tau) dtau`` of power-function profiles (EDM2 eq. 151).

    Float64 NumPy; the arguments broadcast.
    """
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, g_b, -g_a)
    t_max = np.maximum(t_a, t_b)
    return (g_a + 1.0) * (g_b + 1.0) * ratio**exponent / ((g_a + g_b + 1.0) * t_max)


def solve_posthoc_coefficients(in_steps, in_gammas, out_steps, out_gammas) -> np.ndarray:
    """EDM2 Algorithm 3: ``[N_in, N_out]`` coefficients, column ``j`` the least-squares combination of the
    input profiles ``(in_steps[i], in_gammas[i])`` closest to output profile ``j``, normalized to sum to 1.

    All arguments broadcast to ``[N_in]`` / ``[N_out]`` (float64 NumPy; steps ``> 0``, gammas ``> -1/2``).
    """
    in_steps, in_gammas = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(in_steps, in_gammas))
    out_steps, out_gammas = (np.ravel(v).astype(np.float64) for v in np.broadcast_arrays(out_steps, out_gammas))
    for name, v in (("in_steps", in_steps), ("out_steps", out_steps)):
        if v.size == 0 or np.any(~np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{name} must be non-empty and positive, got {v}")
    for name, v in (("in_gammas", in_gammas), ("out_gammas", out_gammas)):
        if np.any(~np.isfinite(v)) or np.any(v <= -0.5):
            raise ValueError(f"{name} must be > -1/2 (square-integrable profiles), got {v}")
    a = profile_inner_product(in_steps[:, None], in_gammas[:, None], in_steps[None], in_gammas[None])
    b = profile_inner_product(in_steps[:, None], in_gammas[:, None], out_steps[None], out_gammas[None])
    if np.linalg.matrix_rank(a) < a.shape[0]:
        raise ValueError(f"the input profiles are linearly dependent (repeated (step, gamma) pairs?): "
                         f"steps {in_steps}, gammas {in_gammas}")
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0, keepdims=True)


def combine(snapshots, coefficients):
    """``sum_i coefficients[i] snapshots[i]``.

    ``snapshots``: a pytree with leaves ``[N, ...]``; ``coefficients``: ``[N]``. Returns leaves ``[...]``.
    """
    c = jnp.asarray(coefficients, jnp.float32)

    def one(leaf):
        if leaf.shape[:1] != c.shape:
            raise ValueError(f"snapshot leaves must have a leading axis of {c.shape[0]} (coefficients), "
                             f"got {leaf.shape}")
        return jnp.tensordot(c, leaf.astype(jnp.float32), axes=1)

    return jax.tree_util.tree_map(one, snapshots)


def reconstruct(snapshots: Sequence[PowerEMAState], steps: Sequence[int], sigma_rel: float, step: int | None = None):
    """The parameters of a power-function EMA of ``sigma_rel`` at ``step`` (default: the last snapshot's)
    reconstructed from ``snapshots[i]``, the :class:`PowerEMAState` saved at optimizer step ``steps[i]``.

    Every tracked exponent of every snapshot is one input profile (EDM2 App. C.3). Returns the
    parameter pytree (leaves without the ``[K]`` axis).
    """
    if len(snapshots) != len(steps) or not snapshots:
        raise ValueError(f"need one step per snapshot, got {len(snapshots)} snapshots and {len(steps)} steps")
    k = snapshots[0].gammas.shape[0]
    in_gammas = np.concatenate([np.asarray(s.gammas, np.float64) for s in snapshots])
    in_steps = np.repeat(np.asarray(steps, np.float64), k)
    out_step = float(max(steps) if step is None else step)
    coef = solve_posthoc_coefficients(in_steps, in_gammas, out_step, sigma_rel_to_gamma(sigma_rel))[:, 0]
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves, axis=0), *[s.ema for s in snapshots])
    return combine(stacked, coef)

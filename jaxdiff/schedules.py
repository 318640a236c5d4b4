"""Noise schedules: data, not behaviour.

A :class:`Schedule` is a frozen pytree of float32 arrays of length ``T`` computed in
float64 with NumPy. It is passed as an argument to every function of the library (never
captured in a closure), so one compiled function serves any schedule of the same length.

Conventions (the library's contract):

* Integer timesteps ``t`` lie in ``{0, ..., T-1}`` and ``t`` indexes ``betas[t]``, which is
  the paper's step ``t + 1`` (Ho et al. 2020 count steps 1..T).
* ``alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])`` and ``alphas_cumprod_prev[t]`` is
  ``alphas_cumprod[t - 1]`` with ``alphas_cumprod_prev[0] = 1``.

Two kinds of process share the representation:

* ``kind="vp"`` (variance preserving, DDPM):
  ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``.
* ``kind="ve"`` (variance exploding): ``x_{t+1} = x_t + n_t``, ``n_t ~ N(0, sigma^2 dt)``,
  so ``x_t = x_0 + sigma_t eps`` with ``sigma_t^2 = sigma_q^2 (t + 1) / T``. The fields hold
  the *equivalent* variance-preserving process ``x_t / sqrt(1 + sigma_t^2)``, whose
  ``abar_t = 1 / (1 + sigma_t^2)``; :func:`jaxdiff.diffusion.q_sample` and the samplers
  apply the scaling, so every formula is written once.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Schedule",
    "linear_schedule",
    "cosine_schedule",
    "sigmoid_schedule",
    "schedule_from_betas",
    "ve_schedule",
]


@flax.struct.dataclass
class Schedule:
    """A discrete diffusion process of ``T`` steps. Every array field has shape ``[T]``."""

    betas: jax.Array  # [T] beta_t, in (0, 1)
    alphas: jax.Array  # [T] 1 - beta_t
    alphas_cumprod: jax.Array  # [T] abar_t
    alphas_cumprod_prev: jax.Array  # [T] abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: jax.Array  # [T] sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod: jax.Array  # [T] sqrt(1 - abar_t)
    log_one_minus_alphas_cumprod: jax.Array  # [T] log(1 - abar_t)
    sqrt_recip_alphas_cumprod: jax.Array  # [T] 1 / sqrt(abar_t)
    sqrt_recipm1_alphas_cumprod: jax.Array  # [T] sqrt(1 / abar_t - 1)
    posterior_variance: jax.Array  # [T] beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    posterior_log_variance_clipped: jax.Array  # [T] log beta-tilde, [0] set to [1]
    posterior_mean_coef1: jax.Array  # [T] coefficient of x_0 in the posterior mean
    posterior_mean_coef2: jax.Array  # [T] coefficient of x_t in the posterior mean
    log_snr: jax.Array  # [T] log(abar_t / (1 - abar_t))
    kind: str = flax.struct.field(pytree_node=False, default="vp")  # "vp" or "ve"

    @property
    def num_timesteps(self) -> int:
        """``T``, static (read from the array shape)."""
        return self.betas.shape[0]

    @property
    def sigmas(self) -> jax.Array:
        """[T] ``sqrt((1 - abar_t) / abar_t)``: the noise level of the VE view of the process."""
        return self.sqrt_recipm1_alphas_cumprod


def _validate_betas(betas: np.ndarray) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 1:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if not np.all(np.isfinite(betas)):
        raise ValueError("betas must be finite")
    if np.any(betas <= 0.0) or np.any(betas >= 1.0):
        bad = betas[(betas <= 0.0) | (betas >= 1.0)]
        raise ValueError(
            f"betas must lie in the open interval (0, 1); got values such as {bad[:3].tolist()}"
        )
    return betas


def schedule_from_betas(betas, *, kind: str = "vp") -> Schedule:
    """Builds a :class:`Schedule` from ``betas`` ``[T]`` (computed in float64, stored float32)."""
    if kind not in ("vp", "ve"):
        raise ValueError(f"kind must be 'vp' or 've', got {kind!r}")
    betas = _validate_betas(betas)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # beta-tilde_0 = 0: clip the log as Ho et al.'s reference code does.
    post_logvar = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(betas) > 1 else (
        np.log(betas)
    )
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - abar)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
        log_snr=f32(np.log(abar) - np.log1p(-abar)),
        kind=kind,
    )


def _check_num_timesteps(num_timesteps) -> int:
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    return int(num_timesteps)


def linear_schedule(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Ho et al. (2020): betas linear from ``beta_start`` to ``beta_end``.

    ``beta_start`` and ``beta_end`` are given for ``T = 1000`` steps, as in the paper; they are
    used as they are for any ``T``. ``beta_end < beta_start`` (a decreasing schedule) is a
    ``ValueError``.
    """
    T = _check_num_timesteps(num_timesteps)
    if beta_end < beta_start:
        raise ValueError(f"beta_end must be >= beta_start, got beta_start={beta_start}, beta_end={beta_end}")
    return schedule_from_betas(np.linspace(beta_start, beta_end, T, dtype=np.float64))


def cosine_schedule(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal (2021), eq. 17: ``abar(t) = f(t)/f(0)``, ``f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``.

    ``beta_t = min(1 - abar(t+1)/abar(t), max_beta)`` for ``t = 0..T-1``.
    """
    T = _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    steps = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((steps + s) / (1.0 + s) * np.pi / 2.0) ** 2
    abar = f / f[0]
    betas = np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    return schedule_from_betas(betas)


def sigmoid_schedule(
    num_timesteps: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, clip_min: float = 1e-9
) -> Schedule:
    """Sigmoid schedule (Jabri et al. 2022, "Scalable adaptive computation for iterative generation").

    ``abar(t) = (sigmoid(end/tau) - sigmoid((t/T (end-start) + start)/tau)) /
    (sigmoid(end/tau) - sigmoid(start/tau))``, betas from consecutive ratios, clipped to 0.999.
    """
    T = _check_num_timesteps(num_timesteps)
    if not start < end:
        raise ValueError(f"start must be below end, got start={start}, end={end}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    steps = np.arange(T + 1, dtype=np.float64) / T
    v_start, v_end = sig(start / tau), sig(end / tau)
    abar = (v_end - sig((steps * (end - start) + start) / tau)) / (v_end - v_start)
    abar = np.clip(abar, clip_min, 1.0)
    betas = np.clip(1.0 - abar[1:] / abar[:-1], 1e-12, 0.999)
    return schedule_from_betas(betas)


def ve_schedule(num_timesteps: int, sigma_q: float = 1.0) -> Schedule:
    """Variance-exploding process ``x_{t+1} = x_t + n_t``, ``n_t ~ N(0, sigma^2)``, ``sigma = sigma_q sqrt(dt)``.

    With ``dt = 1/T`` the marginal is ``x_t = x_0 + sigma_t eps``, ``sigma_t^2 = sigma_q^2 (t+1)/T``,
    so the terminal variance is ``sigma_q^2`` whatever ``T`` is. Stored as the equivalent
    variance-preserving process (``abar_t = 1/(1 + sigma_t^2)``) with ``kind="ve"``.
    """
    T = _check_num_timesteps(num_timesteps)
    if not sigma_q > 0:
        raise ValueError(f"sigma_q must be positive, got {sigma_q}")
    sigma2 = sigma_q**2 * np.arange(1, T + 1, dtype=np.float64) / T
    abar = 1.0 / (1.0 + sigma2)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    return schedule_from_betas(1.0 - abar / abar_prev, kind="ve")

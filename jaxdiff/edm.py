"""EDM: preconditioning, training loss and sampler of Karras, Aittala, Aila & Laine (2022).

Everything here works in the VE coordinates of EDM, ``x = x0 + sigma n`` with ``n ~ N(0, I)``
(``s(t) = 1``, ``sigma(t) = t``), through a *denoiser* ``D(x [B, ...], sigma [B]) -> x0_hat [B, ...]``.

* Preconditioning (EDM Table 1, eq. 7): ``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` for
  a raw network ``F``. The EDM column (:func:`c_skip`, :func:`c_out`, :func:`c_in`, :func:`c_noise`,
  :func:`edm_coefficients`) and the VP / VE columns (:func:`vp_coefficients`,
  :func:`ve_coefficients`); :func:`precondition` builds ``D`` from ``F`` and a column.
  :func:`denoiser_from_eps` turns a network trained with :func:`jaxdiff.losses.diffusion_loss` on a
  discrete :class:`~jaxdiff.schedules.Schedule` (any ``prediction``) into ``D``; for an epsilon
  network on a VP schedule that is the VP column with ``c_noise`` = the fractional timestep.
* The loss (EDM eq. 8 and Table 1 "Training"): ``ln sigma ~ N(P_mean, P_std^2)``, weight
  ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2`` (:func:`edm_loss`).
* The sampler (EDM Algorithm 2): Heun's method on the grid of eq. 5 (:func:`karras_sigmas`) with
  optional stochastic "churn" (:func:`sample`).

One compiled sampler for every step count: a grid's length is static, so :func:`karras_sigmas`
takes ``max_steps`` and pads the ``[max_steps + 1]`` grid with zeros after ``sigma_n = 0``;
:func:`sample` stops at the first zero (a ``lax`` while loop with a dynamic trip count). Under
``jax.jit(lambda x, n, churn: sample(D, x, karras_sigmas(n, max_steps=256), key, s_churn=churn))``
changing ``n`` (up to 256) or the churn settings does not recompile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff import denoiser as den
from jaxdiff.denoiser import denoiser_from_eps  # re-exported: the VP / VE columns of Table 1 for any jaxdiff model
from jaxdiff.diffusion import bcast, karras_sigma, t_from_sigma
from jaxdiff.samplers import karras
from jaxdiff.schedules import Schedule

__all__ = [
    "Coefficients",
    "c_skip",
    "c_out",
    "c_in",
    "c_noise",
    "unet_time",
    "edm_coefficients",
    "vp_coefficients",
    "ve_coefficients",
    "precondition",
    "denoiser_from_eps",
    "loss_weight",
    "log_normal_sigma",
    "edm_loss",
    "karras_sigmas",
    "sample",
    "sample_with_info",
    "sample_nfe",
]

Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

# --------------------------------------------------------------------------- preconditioning (Table 1)


class Coefficients(NamedTuple):
    """One column of EDM Table 1 evaluated at ``sigma``: each entry has the shape of ``sigma``."""

    c_skip: jax.Array
    c_out: jax.Array
    c_in: jax.Array
    c_noise: jax.Array


def c_skip(sigma, sigma_data=0.5):
    """EDM Table 1: ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)``."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data=0.5):
    """EDM Table 1: ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)``."""
    return sigma * sigma_data * jax.lax.rsqrt(sigma**2 + sigma_data**2)


def c_in(sigma, sigma_data=0.5):
    """EDM Table 1: ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``."""
    return jax.lax.rsqrt(sigma**2 + sigma_data**2)


def c_noise(sigma):
    """EDM Table 1: ``c_noise = ln(sigma) / 4``."""
    return jnp.log(sigma) / 4.0


def unet_time(c_noise_value):
    """The UNet's time input for EDM's ``c_noise = ln(sigma) / 4``: ``t = 1000 (c_noise + 1.6) / 3``.

    The UNet's sinusoidal time embedding is built for ``t`` in ``[0, 999]`` (DDPM timesteps); fed
    ``c_noise`` itself (about ``[-1.6, 1.1]``), its lower frequencies would barely move. This fixed
    affine map sends ``ln sigma`` in ``[-6.4, 5.6]`` (``sigma`` in ``[0.0017, 270]``) onto ``[0, 1000]``:
    EDM's sampling range ``[0.002, 80]`` lands on ``[15, 898]`` and the central 99.7% of the
    training distribution (``ln sigma ~ N(-1.2, 1.2^2)``) on ``[133, 733]``. The training step and
    ``generate`` both call it, so the network sees the same scale in training and sampling.
    """
    return (1000.0 / 3.0) * (c_noise_value + 1.6)


def edm_coefficients(sigma, sigma_data=0.5) -> Coefficients:
    """The EDM column of Table 1 at ``sigma`` (scalar or ``[B]``)."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return Coefficients(c_skip(sigma, sigma_data), c_out(sigma, sigma_data), c_in(sigma, sigma_data), c_noise(sigma))


def ve_coefficients(sigma) -> Coefficients:
    """The VE column of Table 1 (Song et al. 2021): ``(1, sigma, 1, ln(sigma / 2))``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    one = jnp.ones_like(sigma)
    return Coefficients(one, sigma, one, jnp.log(0.5 * sigma))


def vp_coefficients(sigma, schedule: Schedule | None = None, *, beta_d=19.9, beta_min=0.1, m=1000) -> Coefficients:
    """The VP column of Table 1: ``(1, -sigma, 1 / sqrt(sigma^2 + 1), c_noise)``.

    ``c_noise`` is the network's time input at ``sigma``: with a discrete ``schedule``, the
    fractional timestep on its ``[0, T-1]`` scale (:func:`jaxdiff.samplers.common.t_from_sigma`,
    the schedule's own ``(M - 1) sigma^-1(sigma)``); without one, the paper's continuous VP,
    ``(M - 1) t`` with ``t = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d``.
    """
    sigma = jnp.asarray(sigma, jnp.float32)
    if schedule is not None:
        noise = t_from_sigma(schedule, sigma)
    else:
        t = (jnp.sqrt(beta_min**2 + 2.0 * beta_d * jnp.log1p(sigma**2)) - beta_min) / beta_d
        noise = (m - 1) * t
    return Coefficients(jnp.ones_like(sigma), -sigma, jax.lax.rsqrt(sigma**2 + 1.0), noise)


def precondition(net_fn: Callable, *, sigma_data: float = 0.5, coefficients: Callable | None = None) -> Callable:
    """The denoiser of EDM eq. 7: ``D(x, sigma, *args) = c_skip x + c_out F(c_in x, c_noise, *args)``.

    Args:
      net_fn: the raw network ``F(x [B, ...], c_noise [B], *args) -> [B, ...]`` (``args``: labels, ...).
      coefficients: ``fn(sigma [B]) -> Coefficients``; default :func:`edm_coefficients` with
        ``sigma_data``. Use e.g. ``functools.partial(vp_coefficients, schedule=s)`` for the VP column.
    Returns ``D(x [B, ...], sigma [B], *args) -> [B, ...]``.
    """
    coef_fn = coefficients if coefficients is not None else (lambda s: edm_coefficients(s, sigma_data))

    def fn(x, sigma, *args):
        c = coef_fn(jnp.asarray(sigma, jnp.float32))
        out = net_fn(bcast(c.c_in, x) * x, c.c_noise, *args)
        return bcast(c.c_skip, x) * x + bcast(c.c_out, x) * out.astype(jnp.float32)

    return fn


# --------------------------------------------------------------------------- the loss (eq. 8)


def loss_weight(sigma, sigma_data=0.5):
    """EDM Table 1: ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2``."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def log_normal_sigma(key, shape=(), p_mean=-1.2, p_std=1.2) -> jax.Array:
    """Training noise levels of EDM Table 1: ``ln sigma ~ N(P_mean, P_std^2)``."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape, jnp.float32))


def _example_keys(key, b: int) -> jax.Array:
    """``[B]`` keys: a batch of keys is used as is; a single key gives ``fold_in(key, i)``."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    single = key.shape == () if typed else key.shape == (2,)
    if single:
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(b))
    if key.shape[0] != b:
        raise ValueError(f"key must be one key or a batch of {b} keys (x0.shape[0]), got key shape {key.shape}")
    return key


def edm_loss(denoiser_fn: Denoiser, x0: jax.Array, key: jax.Array, *, sigma_data: float = 0.5, p_mean: float = -1.2,
             p_std: float = 1.2, sigma: jax.Array | None = None, noise: jax.Array | None = None):
    """EDM's training loss (eq. 8): ``E lambda(sigma) ||D(x0 + sigma n, sigma) - x0||^2``. Returns ``(loss, metrics)``.

    Every example ``b`` draws its own ``sigma_b`` (log-normal, :func:`log_normal_sigma`) and unit
    noise ``n_b`` from its own key ``k_b`` (``split(k_b)``), so the loss does not depend on how
    the batch is split across devices: ``key`` is either ``[B]`` keys (the training step's
    per-example keys) or one key, used as ``k_b = fold_in(key, b)``.

    Args:
      denoiser_fn: ``D(x [B, ...], sigma [B]) -> [B, ...]`` (e.g. :func:`precondition` of a network;
        close over labels for a conditional one).
      x0: ``[B, ...]`` clean data (images in ``[-1, 1]``, :func:`jaxdiff.checks.check_data`).
      sigma: optional ``[B]`` noise levels. noise: optional unit normal noise like ``x0`` (scaled
        by ``sigma`` here).
    Returns: the scalar loss (the mean over examples of ``lambda(sigma_b)`` times the mean squared
      error over the other axes), and metrics ``{"loss", "mse"`` (the same weighted error, as
      :func:`jaxdiff.losses.diffusion_loss`), ``"x0_mse"`` (unweighted)``}``.
    """
    x0 = checks.check_data(x0, "x0")
    b = x0.shape[0]
    keys = jax.vmap(jax.random.split)(_example_keys(key, b))  # [B, 2]
    if sigma is None:
        sigma = jax.vmap(lambda k: log_normal_sigma(k, (), p_mean, p_std))(keys[:, 0])
    sigma = jnp.asarray(sigma, jnp.float32)
    if sigma.shape != (b,):
        raise ValueError(f"sigma must have shape [B] = ({b},), got {sigma.shape}")
    if noise is None:
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(keys[:, 1])
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {x0.shape}, got {noise.shape}")
    out = denoiser_fn(x0 + bcast(sigma, x0) * noise, sigma)
    if out.shape != x0.shape:
        raise ValueError(f"denoiser_fn returned shape {out.shape}; expected {x0.shape}")
    err = jnp.mean(((out.astype(jnp.float32) - x0) ** 2).reshape(b, -1), axis=-1)
    loss = jnp.mean(loss_weight(sigma, sigma_data) * err)
    return loss, {"loss": loss, "mse": loss, "x0_mse": jnp.mean(err)}


# --------------------------------------------------------------------------- the sampler (Algorithm 2)


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, max_steps: int | None = None) -> jax.Array:
    """The time steps of EDM eq. 5, ``t_0 = sigma_max > ... > t_{N-1} = sigma_min``, then ``t_N = 0``.

    Returns ``[num_steps + 1]`` (``num_steps`` a Python int), or with ``max_steps`` the fixed
    capacity ``[max_steps + 1]`` grid, zero from index ``num_steps`` on; then ``num_steps`` may be
    traced (``1 <= num_steps <= max_steps``; a traced value above ``max_steps`` is not checked and
    runs ``max_steps`` steps of a truncated grid). ``sigma_min``, ``sigma_max``, ``rho`` may be traced.
    """
    if max_steps is None:
        if not isinstance(num_steps, int) or isinstance(num_steps, bool):
            raise ValueError(f"num_steps must be a Python int without max_steps (got {num_steps!r}); for a traced "
                             "step count pass max_steps, the grid's static capacity")
        max_steps = num_steps
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}")
    if isinstance(num_steps, int) and not 1 <= num_steps <= max_steps:
        raise ValueError(f"num_steps must be in [1, max_steps={max_steps}], got {num_steps}")
    i = jnp.arange(max_steps + 1)
    return karras_sigma(i, num_steps, sigma_min, sigma_max, rho).astype(jnp.float32)


def sample_nfe(num_steps):
    """Denoiser evaluations of :func:`sample` on a grid of ``n`` steps ending in 0: ``2n - 1``."""
    return 2 * num_steps - 1


def sample_with_info(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, key=None, *, s_churn=0.0, s_tmin=0.0,
                     s_tmax=float("inf"), s_noise=1.0, noise: jax.Array | None = None):
    """Like :func:`sample`, returning ``(x0, {"nfe", "num_steps"})`` (int32 scalars)."""
    if key is None and noise is None and not (isinstance(s_churn, (int, float)) and s_churn == 0):
        raise ValueError(f"s_churn={s_churn!r} adds noise: pass `key` or `noise` (or s_churn=0.0)")
    return karras.heun_on_grid(_as_denoiser(denoiser), x, sigmas, key, s_churn=s_churn, s_tmin=s_tmin,
                               s_tmax=s_tmax, s_noise=s_noise, noise=noise)


def _as_denoiser(fn) -> den.Denoiser:
    return fn if isinstance(fn, den.Denoiser) else den.Denoiser(fn=fn)


def sample(denoiser: Denoiser, x: jax.Array, sigmas: jax.Array, key=None, *, s_churn=0.0, s_tmin=0.0,
           s_tmax=float("inf"), s_noise=1.0, noise: jax.Array | None = None) -> jax.Array:
    """EDM Algorithm 2: Heun's method on ``sigmas`` with stochastic churn; Euler on the step to ``sigma = 0``.

    Step ``i`` (``0 <= i < N``): ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` if
    ``s_tmin <= sigma_i <= s_tmax`` else 0; ``sigma_hat = (1 + gamma_i) sigma_i``;
    ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise eps_i``; ``d = (x_hat - D(x_hat, sigma_hat)) / sigma_hat``;
    ``x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d``, then, if ``sigma_{i+1} > 0``, the trapezoidal
    correction with ``d' = (x_{i+1} - D(x_{i+1}, sigma_{i+1})) / sigma_{i+1}``.
    ``s_churn = 0`` is Algorithm 1 (deterministic). NFE ``2N - 1`` when the grid ends in 0
    (:func:`sample_with_info` reports it). The chain is :func:`jaxdiff.samplers.karras.heun_on_grid`,
    the library's one Heun.

    Args:
      denoiser: ``D(x [B, ...], sigma [B]) -> [B, ...]`` (:func:`precondition`, :func:`denoiser_from_eps`).
      x: ``[B, ...]`` initial latent at ``sigmas[0]``, e.g. ``sigmas[0] * N(0, I)``.
      sigmas: ``[M + 1]`` decreasing grid (:func:`karras_sigmas`); the chain runs ``N`` steps, ``N``
        the index of its first zero (``M`` if none: it then stops at ``sigmas[M] > 0``). Entries
        after the first zero are ignored, so one padded grid serves every step count.
      key: randomness for the churn: ``eps_i ~ N(0, I)`` from ``fold_in(key, i)``.
      s_churn, s_tmin, s_tmax, s_noise: EDM's ``S_churn, S_tmin, S_tmax, S_noise``; may be traced.
      noise: optional ``[M, B, ...]`` unit normal ``eps_i`` instead of ``key`` (for testing).
    Returns ``x_N`` ``[B, ...]`` float32.
    """
    return sample_with_info(denoiser, x, sigmas, key, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                            s_noise=s_noise, noise=noise)[0]

"""The forward process and the conversions between parameterizations, as pure functions.

Shapes: ``x0``, ``x_t``, ``noise`` are ``[B, ...]`` (images ``[B, H, W, C]``); ``t`` is ``[B]``.
Integer ``t`` in ``{0..T-1}`` indexes the schedule; float ``t`` on the same ``[0, T-1]`` scale is
accepted where noted and is evaluated by linear interpolation of the log-SNR (so samplers
can visit fractional times); ``t = -1`` means "no noise" (``abar = 1``) in the coefficient
functions (:func:`alpha_sigma` and the conversions), which the samplers' final steps use.

Out-of-range timesteps in the forward process (:func:`q_sample`, :func:`q_mean_variance`,
:func:`q_posterior`, hence :func:`p_mean_variance`): a concrete ``t`` outside ``[0, T-1]``
raises ``ValueError``; under ``jax.jit`` an integer ``t`` outside ``{0..T-1}`` gives NaN for
its examples (a ``[B]``-sized select, no measurable cost: ``bench/input_checks.py``), never a
clamped or noise-free result. Float ``t`` is clamped to ``[0, T-1]`` under ``jit``.

For a variance-exploding schedule (``schedule.kind == "ve"``) ``x_t`` is in the VE coordinates
``x_0 + sigma_t eps``; every function here maps it to the equivalent VP coordinates
``sqrt(abar_t) x_t`` internally, so all formulas are those of the VP process.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import checks
from jaxdiff.schedules import Schedule

__all__ = [
    "PREDICTIONS",
    "VARIANCES",
    "check_prediction",
    "check_variance",
    "check_t",
    "check_t_range",
    "alpha_sigma",
    "q_sample",
    "q_mean_variance",
    "q_posterior",
    "x0_from_eps",
    "eps_from_x0",
    "v_from_x0_eps",
    "x0_eps_from_v",
    "score_from_eps",
    "eps_from_score",
    "x0_eps_from_prediction",
    "prediction_target",
    "prior_kl",
    "normal_kl",
    "to_vp",
    "from_vp",
    "split_variance_output",
    "model_log_variance",
    "p_mean_variance",
]

PREDICTIONS = ("epsilon", "x0", "v", "score")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")  # of the reverse model p(x_{t-1} | x_t)


# --------------------------------------------------------------------------- checks


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def check_variance(variance: str, allowed: tuple[str, ...] = VARIANCES) -> str:
    if variance not in allowed:
        raise ValueError(f"variance must be one of {allowed}, got {variance!r}")
    return variance


def check_t(t, x, name: str = "x") -> jax.Array:
    """``t`` must be a ``[B]`` array matching ``x.shape[0]``; returns it as an array."""
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got shape {t.shape} (with {name}.shape={x.shape})")
    if x.ndim < 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t has shape {t.shape} but {name} has shape {x.shape}: t must be [B] = [{name}.shape[0]]")
    return t


def check_t_range(schedule: Schedule, t, name: str = "t"):
    """A concrete ``t`` must lie in ``[0, T-1]`` (``ValueError`` naming ``name`` otherwise); traced ``t`` passes."""
    T = schedule.num_timesteps
    return checks.check_int_range(t, name, 0, T - 1, f" (T={T} timesteps)")


def _nan_outside(schedule: Schedule, t, c):
    """``c`` ``[B]`` with NaN where an integer ``t`` lies outside ``{0..T-1}`` (the rule under ``jit``)."""
    if not jnp.issubdtype(t.dtype, jnp.integer):
        return c
    return jnp.where((t < 0) | (t >= schedule.num_timesteps), jnp.nan, c)


def check_same_shape(a, b, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {a.shape} and {b.shape}")
    if a.dtype != b.dtype and not (jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
        raise ValueError(f"{name_a} and {name_b} must both be floating, got {a.dtype} and {b.dtype}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name_a} must be a floating array, got dtype {a.dtype}")


# --------------------------------------------------------------------------- coefficients


def bcast(c: jax.Array, x: jax.Array) -> jax.Array:
    """A scalar or ``[B]`` coefficient broadcast against ``x`` ``[B, ...]`` (explicit rank)."""
    c = jnp.asarray(c)
    if c.ndim == 0:
        return c
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


_bcast = bcast


def t_from_log_snr(schedule: Schedule, lam) -> jax.Array:
    """Fractional timestep ``t`` in ``[0, T-1]`` whose interpolated log-SNR is ``lam`` (clamped to the table).

    The exact inverse of :func:`jaxdiff.diffusion.alpha_sigma`, which interpolates the same table.
    """
    T = schedule.num_timesteps
    lam = jnp.asarray(lam, jnp.float32)
    if T == 1:
        return jnp.zeros_like(lam)
    # log_snr decreases with t, so -log_snr is the increasing table jnp.interp needs.
    return jnp.interp(-lam, -schedule.log_snr, jnp.arange(T, dtype=jnp.float32))


def t_from_sigma(schedule: Schedule, sigma) -> jax.Array:
    """Fractional timestep of the VE noise level ``sigma = sqrt((1 - abar)/abar)`` (``lambda = -2 log sigma``)."""
    return t_from_log_snr(schedule, -2.0 * jnp.log(jnp.asarray(sigma, jnp.float32)))


def alpha_sigma_from_log_snr(lam) -> tuple[jax.Array, jax.Array]:
    """``(alpha, sigma) = (sqrt(sigmoid(lambda)), sqrt(sigmoid(-lambda)))``."""
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def karras_sigma(i, num_steps, sigma_min, sigma_max, rho=7.0) -> jax.Array:
    """``sigma_i`` of the ``num_steps``-point Karras et al. (2022) grid, EDM eq. 5; ``0`` for ``i >= num_steps``.

    ``sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho`` for ``i < n``
    (``sigma_0 = smax``, ``sigma_{n-1} = smin``; ``smax`` alone for ``n = 1``). Elementwise in ``i``;
    every argument may be traced.
    """
    n = jnp.asarray(num_steps, jnp.float32)
    frac = jnp.asarray(i, jnp.float32) / jnp.maximum(n - 1.0, 1.0)
    inv = 1.0 / rho
    sigma = (sigma_max**inv + frac * (sigma_min**inv - sigma_max**inv)) ** rho
    return jnp.where(jnp.asarray(i) >= num_steps, 0.0, sigma)


def _gather(arr: jax.Array, t: jax.Array) -> jax.Array:
    return arr[jnp.clip(t, 0, arr.shape[0] - 1)]


def alpha_sigma(schedule: Schedule, t) -> tuple[jax.Array, jax.Array]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))``, each ``[B]`` (or the shape of ``t``).

    Integer ``t`` gathers the float64-derived tables; float ``t`` interpolates the log-SNR
    linearly between neighbouring integers; ``t < 0`` gives ``(1, 0)``.
    """
    t = jnp.asarray(t)
    if jnp.issubdtype(t.dtype, jnp.integer):
        a = _gather(schedule.sqrt_alphas_cumprod, t)
        s = _gather(schedule.sqrt_one_minus_alphas_cumprod, t)
    else:
        T = schedule.num_timesteps
        tc = jnp.clip(t, 0.0, T - 1.0)
        lo = jnp.floor(tc).astype(jnp.int32)
        hi = jnp.minimum(lo + 1, T - 1)
        w = tc - lo
        lam = (1.0 - w) * schedule.log_snr[lo] + w * schedule.log_snr[hi]
        a = jnp.sqrt(jax.nn.sigmoid(lam))
        s = jnp.sqrt(jax.nn.sigmoid(-lam))
    neg = t < 0
    return jnp.where(neg, 1.0, a), jnp.where(neg, 0.0, s)


def _vp_scale(schedule: Schedule, t) -> jax.Array:
    """[B] factor mapping model coordinates to VP coordinates (1 for VP, sqrt(abar_t) for VE)."""
    if schedule.kind == "vp":
        return jnp.ones(jnp.shape(t), jnp.float32)
    return alpha_sigma(schedule, t)[0]


def to_vp(schedule: Schedule, x_t: jax.Array, t) -> jax.Array:
    """Maps ``x_t`` from the schedule's coordinates to the VP coordinates (identity for VP)."""
    if schedule.kind == "vp":
        return x_t
    return x_t * _bcast(_vp_scale(schedule, t), x_t)


def from_vp(schedule: Schedule, x_t: jax.Array, t) -> jax.Array:
    """Inverse of :func:`to_vp`."""
    if schedule.kind == "vp":
        return x_t
    return x_t / _bcast(_vp_scale(schedule, t), x_t)


# --------------------------------------------------------------------------- forward process


def q_sample(schedule: Schedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
    """Samples ``q(x_t | x_0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (VP) or ``x0 + sigma_t noise`` (VE).

    Args: ``x0`` ``[B, ...]`` (a nested list is converted); ``t`` ``[B]`` int in ``{0..T-1}``
    (or float in ``[0, T-1]``; out of range: module docstring); ``noise`` like ``x0``.
    Returns ``x_t`` ``[B, ...]``.
    """
    x0, noise = checks.as_float_array(x0, "x0"), checks.as_float_array(noise, "noise")
    check_same_shape(x0, noise, "x0", "noise")
    t = check_t(t, x0, "x0")
    check_t_range(schedule, t)
    a, s = alpha_sigma(schedule, t)
    a = _nan_outside(schedule, t, a)
    x_vp = _bcast(a, x0) * x0 + _bcast(s, x0) * noise
    return from_vp(schedule, x_vp, t)


def q_mean_variance(schedule: Schedule, x0: jax.Array, t) -> tuple[jax.Array, jax.Array]:
    """Mean ``[B, ...]`` and variance ``[B, 1, ...]`` of ``q(x_t | x_0)`` in the schedule's coordinates."""
    t = check_t(t, x0, "x0")
    check_t_range(schedule, t)
    a, s = alpha_sigma(schedule, t)
    a = _nan_outside(schedule, t, a)
    scale = _vp_scale(schedule, t)
    return _bcast(a / scale, x0) * x0, _bcast((s / scale) ** 2, x0)


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``q(x_{t-1} | x_t, x_0)`` (Ho et al. 2020, eq. 6-7).

    Returns ``(mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...])``; the
    variance at ``t = 0`` is 0 and its log is clipped to that of ``t = 1``.
    """
    check_same_shape(x0, x_t, "x0", "x_t")
    t = check_t(t, x_t, "x_t")
    check_t_range(schedule, t)
    c1 = _bcast(_nan_outside(schedule, t, _gather(schedule.posterior_mean_coef1, t)), x_t)
    c2 = _bcast(_gather(schedule.posterior_mean_coef2, t), x_t)
    var = _bcast(_gather(schedule.posterior_variance, t), x_t)
    logvar = _bcast(_gather(schedule.posterior_log_variance_clipped, t), x_t)
    mean = c1 * x0 + c2 * to_vp(schedule, x_t, t)
    if schedule.kind == "ve":  # back to VE coordinates at t-1
        prev = _bcast(jnp.sqrt(_gather(schedule.alphas_cumprod_prev, t)), x_t)
        mean, var, logvar = mean / prev, var / prev**2, logvar - 2.0 * jnp.log(prev)
    return mean, var, logvar


# --------------------------------------------------------------------------- parameterizations


def x0_from_eps(schedule: Schedule, x_t, t, eps):
    """``x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)`` (VP coordinates of ``x_t``)."""
    a, s = alpha_sigma(schedule, t)
    return (to_vp(schedule, x_t, t) - _bcast(s, x_t) * eps) / _bcast(a, x_t)


def eps_from_x0(schedule: Schedule, x_t, t, x0):
    """``eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)``."""
    a, s = alpha_sigma(schedule, t)
    return (to_vp(schedule, x_t, t) - _bcast(a, x_t) * x0) / _bcast(s, x_t)


def v_from_x0_eps(schedule: Schedule, t, x0, eps):
    """``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022)."""
    a, s = alpha_sigma(schedule, t)
    return _bcast(a, x0) * eps - _bcast(s, x0) * x0


def x0_eps_from_v(schedule: Schedule, x_t, t, v):
    """``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``, ``eps = sqrt(1 - abar) x_t + sqrt(abar) v``."""
    a, s = alpha_sigma(schedule, t)
    a, s, xv = _bcast(a, x_t), _bcast(s, x_t), to_vp(schedule, x_t, t)
    return a * xv - s * v, s * xv + a * v


def score_from_eps(schedule: Schedule, t, eps):
    """Score of the marginal of ``x_t`` in the schedule's coordinates.

    ``-eps / sqrt(1 - abar)`` (VP), ``-eps / sigma_t`` (VE).
    """
    _, s = alpha_sigma(schedule, t)
    return -eps / _bcast(s / _vp_scale(schedule, t), eps)


def eps_from_score(schedule: Schedule, t, score):
    """Inverse of :func:`score_from_eps`."""
    _, s = alpha_sigma(schedule, t)
    return -score * _bcast(s / _vp_scale(schedule, t), score)


def x0_eps_from_prediction(schedule: Schedule, model_output, x_t, t, prediction: str = "epsilon"):
    """Turns a network output of any parameterization into ``(x0_hat, eps_hat)``, each ``[B, ...]``."""
    check_prediction(prediction)
    if model_output.shape != x_t.shape:
        raise ValueError(f"model_output has shape {model_output.shape} but x_t has shape {x_t.shape}")
    if prediction == "epsilon":
        return x0_from_eps(schedule, x_t, t, model_output), model_output
    if prediction == "x0":
        return model_output, eps_from_x0(schedule, x_t, t, model_output)
    if prediction == "v":
        return x0_eps_from_v(schedule, x_t, t, model_output)
    eps = eps_from_score(schedule, t, model_output)
    return x0_from_eps(schedule, x_t, t, eps), eps


def prediction_target(schedule: Schedule, x0, t, noise, prediction: str = "epsilon"):
    """The regression target for a network of the given parameterization."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from_x0_eps(schedule, t, x0, noise)
    return score_from_eps(schedule, t, noise)


# --------------------------------------------------------------------------- KL terms


def normal_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def prior_kl(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """``L_T = KL(q(x_T | x_0) || N(0, I))`` in nats, summed over all but the batch axis: ``[B]``.

    Computed in VP coordinates (for a VE schedule the prior is the equivalent
    ``N(0, (1 + sigma_T^2) I)``; the KL is invariant to the common scaling).
    """
    T = schedule.num_timesteps
    a = schedule.sqrt_alphas_cumprod[T - 1]
    logvar = schedule.log_one_minus_alphas_cumprod[T - 1]
    kl = normal_kl(a * x0, logvar, 0.0, 0.0)
    return jnp.sum(kl.reshape(x0.shape[0], -1), axis=-1)


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis: ``[B, ...] -> [B]``."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def sum_flat(x: jax.Array) -> jax.Array:
    """Sum over all but the batch axis: ``[B, ...] -> [B]``."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


LOG2 = float(np.log(2.0))


# --------------------------------------------------------------------------- the reverse model


def split_variance_output(model_output, x_t, variance: str):
    """``(prediction [B, ..., C], variance_values [B, ..., C] | None)`` of a network output.

    For ``variance="learned_range"`` the output has ``2C`` channels whose last ``C`` are the
    variance values ``v`` in ``[-1, 1]``; otherwise it has ``C`` channels.
    """
    check_variance(variance)
    if variance != "learned_range":
        return model_output, None
    c = x_t.shape[-1]
    if model_output.shape[-1] != 2 * c:
        raise ValueError(f"variance='learned_range' needs model_output with 2C={2 * c} channels, "
                         f"got shape {model_output.shape}")
    return model_output[..., :c], model_output[..., c:]


def model_log_variance(variance: str, log_small, log_beta, values=None, *, log_large=None):
    """The log variance of ``p(x_{t-1} | x_t)`` for a variance choice (arrays broadcast against ``x_t``).

    ``fixed_small``: ``log_small`` (the posterior's beta-tilde); ``fixed_large``: ``log_large``
    (default ``log_beta``); ``learned_range``: ``frac log_beta + (1 - frac) log_small`` with
    ``frac = (values + 1) / 2`` (Nichol & Dhariwal 2021, eq. 15, with their code's ``[-1, 1]`` input).
    """
    if variance == "fixed_small":
        return log_small
    if variance == "fixed_large":
        return log_beta if log_large is None else log_large
    check_variance(variance)
    frac = (values + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_small


def p_mean_variance(schedule: Schedule, model_output, x_t, t, *, prediction: str = "epsilon",
                    variance: str = "fixed_small", clip_x0: bool = False):
    """The reverse model ``p(x_{t-1} | x_t)``: ``(mean, variance, log_variance, x0_hat, eps_hat)``.

    ``model_output`` is ``[B, ..., C]`` or, for ``variance="learned_range"``, ``[B, ..., 2C]``
    (see :func:`~jaxdiff.diffusion.split_variance_output` and
    :func:`~jaxdiff.diffusion.model_log_variance`). ``fixed_large`` uses
    ``beta_t``, with ``beta-tilde_1`` at ``t = 0`` as Ho et al.'s code; ``learned_range``
    interpolates towards ``log beta_t`` at every ``t``, ``t = 0`` included (Nichol & Dhariwal's
    code). Means and variances are in the schedule's coordinates at ``t - 1``; all arrays are
    like ``x_t`` (``[B, ...]``).
    """
    check_prediction(prediction)
    t = check_t(t, x_t, "x_t")
    check_t_range(schedule, t)
    model_output, values = split_variance_output(model_output, x_t, variance)
    x0_hat, eps_hat = x0_eps_from_prediction(schedule, model_output, x_t, t, prediction)
    if clip_x0:
        x0_hat = jnp.clip(x0_hat, -1.0, 1.0)
    mean, _, small_logvar = q_posterior(schedule, x0_hat, x_t, t)
    tc = jnp.clip(t, 0, schedule.num_timesteps - 1)
    log_beta = jnp.log(schedule.betas[tc])
    large_log = jnp.where(tc == 0, jnp.log(schedule.posterior_variance[1 % schedule.num_timesteps]), log_beta)
    bshape = t.shape + (1,) * (x_t.ndim - 1)
    large_log, log_beta = large_log.reshape(bshape), log_beta.reshape(bshape)
    if schedule.kind == "ve":
        to_ve = jnp.log(schedule.alphas_cumprod_prev[tc]).reshape(bshape)
        large_log, log_beta = large_log - to_ve, log_beta - to_ve
    logvar = model_log_variance(variance, small_logvar, log_beta, values, log_large=large_log)
    logvar = jnp.broadcast_to(logvar, x_t.shape)
    return mean, jnp.exp(logvar), logvar, x0_hat, eps_hat

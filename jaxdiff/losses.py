"""Training objectives and the variational bound, as pure functions.

Every objective takes the network as ``model_fn(x_t, t) -> prediction`` (``[B, ...]`` and
``[B]`` in, ``[B, ...]`` out, or ``[B, ..., 2C]`` when the variance is learned), so it serves any
network. A class-conditional model is passed as ``lambda x, t: net(x, t, labels)``.

References: Ho et al. 2020 (L_simple, the bound, the discretized decoder), Nichol & Dhariwal
2021 (learned interpolated variance, hybrid objective), Hang et al. 2023 (min-SNR-gamma),
Salimans & Ho 2022 (v-prediction).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff import diffusion as d
from jaxdiff.schedules import Schedule

__all__ = [
    "WEIGHTINGS",
    "snr",
    "loss_weight",
    "diffusion_loss",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "vlb_term",
    "variational_bound",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
WEIGHTINGS = ("uniform", "min_snr", "elbo")


def _check_choice(value: str, choices, name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def snr(schedule: Schedule, t) -> jax.Array:
    """``SNR(t) = abar_t / (1 - abar_t)`` for int or float ``t`` ``[B]``."""
    a, s = d.alpha_sigma(schedule, t)
    return (a / s) ** 2


def loss_weight(schedule: Schedule, t, *, prediction: str, weighting: str, min_snr_gamma: float = 5.0) -> jax.Array:
    """Per-example weight ``[B]`` of the squared error *in the prediction's own space*.

    * ``"uniform"``: 1 (L_simple for epsilon prediction).
    * ``"min_snr"``: Hang et al. 2023, ``min(SNR, gamma)`` expressed for the target:
      ``/ SNR`` for epsilon, ``/ (SNR + 1)`` for v, as is for x0; for score, the x0 weight times
      ``(1 - abar)^2 / abar`` (since ``x0 - x0_hat = (1 - abar)/sqrt(abar) (s_hat - s)``), or times
      ``sigma_t^4 = ((1 - abar)/abar)^2`` for a VE schedule, whose score is in VE coordinates.
    * ``"elbo"``: the weight that makes the loss ``T * L_{t-1}`` of the bound in nats per
      dimension: ``T * c1_t^2 / (2 var_t)`` in x0 space, with ``c1`` the posterior mean's x0
      coefficient and ``var_t`` the clipped posterior variance (``fixed_small`` decoder).

    ``min_snr_gamma`` must be positive (``ValueError`` when it is a concrete value).
    """
    _check_choice(weighting, WEIGHTINGS, "weighting")
    d.check_prediction(prediction)
    checks.check_nonnegative(min_snr_gamma, "min_snr_gamma", strict=True)
    t = jnp.asarray(t)
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    a, s = d.alpha_sigma(schedule, t)
    abar, one_m = a**2, s**2
    snr_t = abar / one_m
    if weighting == "min_snr":
        w_x0 = jnp.minimum(snr_t, min_snr_gamma)
    else:
        c1 = schedule.posterior_mean_coef1[t]
        var = jnp.exp(schedule.posterior_log_variance_clipped[t])
        w_x0 = schedule.num_timesteps * c1**2 / (2.0 * var)
    # Convert an x0-space weight into the prediction's space: ||x0 - x0_hat||^2 = k * ||p - p_hat||^2.
    # The score lives in the schedule's coordinates: x0 error = (1 - abar)/sqrt(abar) * score error
    # for VP, sigma_t^2 = (1 - abar)/abar * score error for VE (x_t = x0 + sigma_t eps).
    k = {
        "x0": jnp.ones_like(abar),
        "epsilon": one_m / abar,
        "v": one_m,
        "score": one_m**2 / abar if schedule.kind == "vp" else (one_m / abar) ** 2,
    }[prediction]
    if weighting == "min_snr" and prediction == "v":
        return jnp.minimum(snr_t, min_snr_gamma) / (snr_t + 1.0)  # == w_x0 * (1 - abar)
    return w_x0 * k


def diffusion_loss(
    schedule: Schedule,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction: str = "epsilon",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    learned_variance: bool = False,
    vlb_weight: float = 0.001,
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
):
    """The denoising training loss. Returns ``(loss, metrics)``.

    Samples ``t ~ U{0..T-1}`` and ``noise ~ N(0, I)`` from ``key`` (or takes them), forms
    ``x_t = q_sample(x0, t, noise)`` and regresses ``model_fn(x_t, t)`` onto the target of
    ``prediction`` with the per-example ``weighting`` (:func:`~jaxdiff.losses.loss_weight`).

    With ``learned_variance=True`` the network outputs ``2C`` channels and the hybrid objective
    of Nichol & Dhariwal is used: ``L_simple + vlb_weight * T * L_{t-1}`` (the VLB term in
    bits/dim, as in their code, so ``vlb_weight = 0.001`` is their lambda; computed with a
    stop-gradient on the mean, so it trains the variance only).

    Args:
      x0: ``[B, ...]`` clean data (a nested list is converted; images in ``[-1, 1]``: a concrete image
        batch that looks like ``[0, 255]`` pixels raises, :func:`jaxdiff.checks.check_data`). key: a PRNG key.
      t: optional ``[B]`` int timesteps in ``{0..T-1}``. noise: optional noise like ``x0``.
    Returns: scalar loss, and metrics ``{"loss", "mse"[, "vlb"]}`` (scalars).
    """
    _check_choice(weighting, WEIGHTINGS, "weighting")
    d.check_prediction(prediction)
    checks.check_key(key)
    x0 = checks.check_data(x0, "x0")
    checks.check_nonnegative(min_snr_gamma, "min_snr_gamma", strict=True)
    k_t, k_n = jax.random.split(key)
    b = x0.shape[0]
    if t is None:
        t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps)
    if noise is None:
        noise = jax.random.normal(k_n, x0.shape, x0.dtype)
    x_t = d.q_sample(schedule, x0, t, noise)
    out = model_fn(x_t, t)
    c = x0.shape[-1]
    expected = 2 * c if learned_variance else c
    if out.shape[:-1] != x0.shape[:-1] or out.shape[-1] != expected:
        raise ValueError(
            f"model_fn returned shape {out.shape}; expected {x0.shape[:-1] + (expected,)}"
            f" (learned_variance={learned_variance})"
        )
    pred = out[..., :c]
    target = d.prediction_target(schedule, x0, t, noise, prediction)
    err = d.mean_flat((target - pred.astype(jnp.float32)) ** 2)
    w = loss_weight(schedule, t, prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma)
    mse = jnp.mean(w * err)
    metrics = {"mse": mse}
    loss = mse
    if learned_variance:
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), out[..., c:]], axis=-1)
        vlb = vlb_term(schedule, frozen, x0, x_t, t, prediction=prediction, variance="learned_range")
        vlb_loss = jnp.mean(vlb) * schedule.num_timesteps  # bits/dim times T, as Nichol & Dhariwal's code
        metrics["vlb"] = jnp.mean(vlb)
        loss = mse + vlb_weight * vlb_loss
    metrics["loss"] = loss
    return loss, metrics


# --------------------------------------------------------------------------- the bound


def approx_standard_normal_cdf(x):
    """Fast tanh approximation of the standard normal CDF used by Ho et al.'s decoder."""
    return 0.5 * (1.0 + jnp.tanh(jnp.sqrt(2.0 / jnp.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """``log p(x)`` elementwise for 8-bit data scaled to ``[-1, 1]`` (Ho et al. 2020, eq. 13).

    Each value is a bin of width ``2/255``; the outermost bins extend to ``+-inf``.
    ``log_scales`` is the log standard deviation. Returns an array like ``x``, in nats.
    """
    if x.shape != means.shape:
        raise ValueError(f"x and means must have the same shape, got {x.shape} and {means.shape}")
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(
        x < -0.999,
        log_cdf_plus,
        jnp.where(x > 0.999, log_one_minus_cdf_min, jnp.log(jnp.maximum(cdf_delta, 1e-12))),
    )


def vlb_term(schedule: Schedule, model_output, x0, x_t, t, *, prediction: str = "epsilon",
             variance: str = "fixed_small", clip_x0: bool = False) -> jax.Array:
    """One term of the bound, ``[B]`` in bits/dim: ``L_{t-1} = KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))``
    for ``t > 0`` and the decoder ``L_0 = -log p(x0 | x_1)`` (discretized Gaussian) at ``t = 0``."""
    t = d.check_t(t, x_t, "x_t")
    true_mean, _, true_logvar = d.q_posterior(schedule, x0, x_t, t)
    mean, _, logvar, _, _ = d.p_mean_variance(schedule, model_output, x_t, t, prediction=prediction,
                                            variance=variance, clip_x0=clip_x0)
    kl = d.mean_flat(d.normal_kl(true_mean, true_logvar, mean, logvar)) / d.LOG2
    nll = -d.mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / d.LOG2
    return jnp.where(t == 0, nll, kl)


def variational_bound(schedule: Schedule, model_fn: ModelFn, x0: jax.Array, key: jax.Array, *,
                      prediction: str = "epsilon", variance: str = "fixed_small",
                      clip_x0: bool = False) -> dict:
    """The full bound ``L_T + sum_t L_{t-1}`` for every example, in bits/dim.

    Evaluates every one of the ``T`` terms (one network call each) inside one ``lax.scan``, with
    fresh noise per term derived from ``key`` by ``fold_in(key, t)``.

    Returns ``{"total_bpd": [B], "prior_bpd": [B], "terms_bpd": [B, T]}``.
    """
    d.check_variance(variance)
    checks.check_key(key)
    x0 = checks.as_float_array(x0, "x0")
    b = x0.shape[0]
    dims = x0[0].size

    def body(_, t_scalar):
        t = jnp.full((b,), t_scalar, jnp.int32)
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, x0.dtype)
        x_t = d.q_sample(schedule, x0, t, noise)
        term = vlb_term(schedule, model_fn(x_t, t), x0, x_t, t, prediction=prediction,
                        variance=variance, clip_x0=clip_x0)
        return None, term

    _, terms = jax.lax.scan(body, None, jnp.arange(schedule.num_timesteps, dtype=jnp.int32))
    terms = terms.T  # [B, T]
    prior = d.prior_kl(schedule, x0) / (dims * d.LOG2)
    return {"total_bpd": prior + jnp.sum(terms, axis=1), "prior_bpd": prior, "terms_bpd": terms}

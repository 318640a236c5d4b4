"""Float64 NumPy references written from the papers, independent of the code under test.

Nothing here imports ``jaxdiff``. Index convention: integer ``t`` in ``{0..T-1}`` is the
papers' step ``t + 1`` (``betas[t]`` is Ho et al.'s ``beta_{t+1}``), ``t = -1`` is the data.

Sources:
* Ho, Jain & Abbeel 2020 (DDPM): eq. 4 (``q(x_t | x_0)``), eqs. 6-7 (posterior), eq. 11 and
  Algorithm 2 (ancestral step), eqs. 12-13 (bound terms and the discretized decoder).
* Song, Meng & Ermon 2021 (DDIM): eq. 12 (the step), eq. 16 (``sigma(eta)``).
* Nichol & Dhariwal 2021: eq. 15 of the paper / ``learned_range`` of their code (interpolated
  log variance), eq. 17 (cosine schedule), sec. 4 (respaced process, ``beta' = 1 - abar_t/abar_s``).
* Salimans & Ho 2022: ``v = alpha eps - sigma x``.
* Hang et al. 2023: min-SNR-gamma weights.
* Jabri, Fleet & Chen 2022 (RIN), Algorithm: sigmoid ``gamma(t)``.
"""

from __future__ import annotations

import numpy as np
from scipy import stats
from scipy.special import expit, logsumexp

# --------------------------------------------------------------------------- schedules


def linear_betas(T, beta_start=1e-4, beta_end=0.02):
    """Ho et al.: ``beta`` linear from ``beta_start`` (step 1) to ``beta_end`` (step T)."""
    if T == 1:
        return np.array([beta_start], np.float64)
    i = np.arange(T, dtype=np.float64)
    return beta_start + (beta_end - beta_start) * i / (T - 1)


def cosine_abar(u, T, s=0.008):
    """Nichol & Dhariwal eq. 17: ``abar(u) = f(u) / f(0)``, ``f(u) = cos^2((u/T + s)/(1 + s) * pi/2)``."""
    f = lambda v: np.cos((v / T + s) / (1.0 + s) * np.pi / 2.0) ** 2
    return f(np.asarray(u, np.float64)) / f(0.0)


def cosine_betas(T, s=0.008, max_beta=0.999):
    """``beta_t = min(1 - abar(t) / abar(t - 1), max_beta)`` for paper steps ``t = 1..T``."""
    out = []
    for step in range(1, T + 1):
        out.append(min(1.0 - cosine_abar(step, T, s) / cosine_abar(step - 1, T, s), max_beta))
    return np.array(out, np.float64)


def sigmoid_gamma(u, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9):
    """Jabri et al. 2022, ``sigmoid_schedule(t)`` for continuous ``u`` in [0, 1]."""
    v_start, v_end = expit(start / tau), expit(end / tau)
    out = (v_end - expit((u * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(out, clip_min, 1.0)


def sigmoid_betas(T, start=-3.0, end=3.0, tau=1.0, clip_min=1e-9, max_beta=0.999):
    out = []
    for step in range(1, T + 1):
        g1 = sigmoid_gamma(step / T, start, end, tau, clip_min)
        g0 = sigmoid_gamma((step - 1) / T, start, end, tau, clip_min)
        out.append(min(1.0 - g1 / g0, max_beta))
    return np.array(out, np.float64)


def ve_sigma2(T, sigma_q):
    """VE marginal variance after ``t + 1`` increments of variance ``sigma_q^2 / T``: ``[T]``."""
    return sigma_q**2 * np.arange(1, T + 1, dtype=np.float64) / T


def ve_betas(T, sigma_q):
    """Betas of the VP process equivalent to the VE one: ``abar_t = 1 / (1 + sigma_t^2)``."""
    abar = 1.0 / (1.0 + ve_sigma2(T, sigma_q))
    return 1.0 - abar / np.append(1.0, abar[:-1])


def schedule_fields(betas):
    """Every field of the schedule (Ho et al. eqs. 4, 6, 7), computed with explicit loops."""
    betas = np.asarray(betas, np.float64)
    T = len(betas)
    alphas = 1.0 - betas
    abar = np.empty(T)
    running = 1.0
    for i in range(T):
        running *= alphas[i]
        abar[i] = running
    abar_prev = np.array([1.0] + list(abar[:-1]))
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # Ho et al.'s code: log(append(posterior_variance[1], posterior_variance[1:])).
    clipped = np.log(np.append(post_var[1], post_var[1:])) if T > 1 else None
    return {
        "betas": betas,
        "alphas": alphas,
        "alphas_cumprod": abar,
        "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": np.sqrt(abar),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
        "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(abar),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - abar) / abar),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": clipped,
        "posterior_mean_coef1": np.sqrt(abar_prev) * betas / (1.0 - abar),
        "posterior_mean_coef2": np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),
        "log_snr": np.log(abar / (1.0 - abar)),
    }


# --------------------------------------------------------------------------- forward process


def bc(c, x):
    """``[B] -> [B, 1, ..., 1]``."""
    c = np.asarray(c, np.float64)
    return c.reshape(c.shape + (1,) * (np.ndim(x) - 1))


def q_sample(abar, x0, t, eps):
    """Ho et al. eq. 4 (reparameterized): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``."""
    a = abar[t]
    return bc(np.sqrt(a), x0) * x0 + bc(np.sqrt(1.0 - a), x0) * eps


def q_posterior(betas, x0, x_t, t):
    """Ho et al. eqs. 6-7: mean and variance of ``q(x_{t-1} | x_t, x_0)`` (``t`` paper-step ``t+1``)."""
    f = schedule_fields(betas)
    ab, abp, al, be = f["alphas_cumprod"][t], f["alphas_cumprod_prev"][t], f["alphas"][t], betas[t]
    mean = bc(np.sqrt(abp) * be / (1 - ab), x0) * x0 + bc(np.sqrt(al) * (1 - abp) / (1 - ab), x0) * x_t
    var = (1 - abp) / (1 - ab) * be
    return mean, var


def ve_bridge(sigma2, x0, x_t, t):
    """VE posterior ``q(x_{t-1} | x_t, x0)`` (Brownian bridge): mean and variance. ``t = 0`` -> ``x0``."""
    s_t = sigma2[t]
    s_p = np.where(t > 0, sigma2[np.maximum(t - 1, 0)], 0.0)
    r = s_p / s_t
    return x0 + bc(r, x0) * (x_t - x0), s_p * (s_t - s_p) / s_t


def x0_from_eps(abar_t, x_t, eps):
    return (x_t - bc(np.sqrt(1 - abar_t), x_t) * eps) / bc(np.sqrt(abar_t), x_t)


def eps_from_x0(abar_t, x_t, x0):
    return (x_t - bc(np.sqrt(abar_t), x_t) * x0) / bc(np.sqrt(1 - abar_t), x_t)


def v_from(abar_t, x0, eps):
    """Salimans & Ho 2022: ``v = alpha eps - sigma x`` with ``alpha^2 = abar``, ``sigma^2 = 1 - abar``."""
    return bc(np.sqrt(abar_t), x0) * eps - bc(np.sqrt(1 - abar_t), x0) * x0


def score_vp(abar_t, eps):
    """``grad log q(x_t | x0) = -(x_t - sqrt(abar) x0)/(1 - abar) = -eps / sqrt(1 - abar)``."""
    return -eps / bc(np.sqrt(1 - abar_t), eps)


def normal_kl(m1, v1, m2, v2):
    """Closed-form ``KL(N(m1, v1) || N(m2, v2))`` (variances, not log-variances)."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def discretized_gaussian_loglik(x, mean, std):
    """Ho et al. eq. 13 with the exact normal CDF: bins of width 2/255, outer bins to +-inf."""
    x, mean, std = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(mean, np.float64),
                                       np.asarray(std, np.float64))
    upper = np.where(x > 0.999, np.inf, x + 1.0 / 255.0)
    lower = np.where(x < -0.999, -np.inf, x - 1.0 / 255.0)
    p = stats.norm.cdf((upper - mean) / std) - stats.norm.cdf((lower - mean) / std)
    with np.errstate(divide="ignore"):  # an empty bin has log-probability -inf
        return np.log(p)


# --------------------------------------------------------------------------- reverse steps


def ddpm_step_eps(betas, x_t, t, eps, z, variance="fixed_small"):
    """Ho et al. Algorithm 2, line 4: ``x_{t-1} = (x_t - beta/sqrt(1-abar) eps)/sqrt(alpha) + sigma z``.

    ``sigma^2 = beta-tilde`` (``fixed_small``) or ``beta`` (``fixed_large``); ``z = 0`` at the last step.
    """
    f = schedule_fields(betas)
    al, ab, be = f["alphas"][t], f["alphas_cumprod"][t], betas[t]
    mean = (x_t - bc(be / np.sqrt(1 - ab), x_t) * eps) / bc(np.sqrt(al), x_t)
    var = f["posterior_variance"][t] if variance == "fixed_small" else be
    return mean + bc(np.where(t > 0, np.sqrt(var), 0.0), x_t) * z


def learned_range_logvar(betas, t, v):
    """Nichol & Dhariwal (code): ``frac = (v + 1)/2``, ``frac log beta_t + (1 - frac) log beta-tilde_t``
    with ``log beta-tilde`` clipped at the first step as Ho et al.'s code; ``v`` in [-1, 1]."""
    f = schedule_fields(betas)
    frac = (v + 1.0) / 2.0
    return frac * bc(np.log(betas[t]), v) + (1.0 - frac) * bc(f["posterior_log_variance_clipped"][t], v)


def ddim_step(abar_t, abar_prev, x_t, eps, eta, z):
    """Song et al. eq. 12 with sigma from eq. 16 (``abar_prev = 1`` for the last step to x0)."""
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar_t)) * np.sqrt(1 - abar_t / abar_prev)
    x0 = (x_t - bc(np.sqrt(1 - abar_t), x_t) * eps) / bc(np.sqrt(abar_t), x_t)
    return (bc(np.sqrt(abar_prev), x_t) * x0 + bc(np.sqrt(1 - abar_prev - sigma**2), x_t) * eps
            + bc(sigma, x_t) * z)


# --------------------------------------------------------------------------- loss weights


def min_snr_weight(snr, prediction, gamma=5.0):
    """Hang et al. 2023: ``min(SNR, gamma)`` for x0, ``/ SNR`` for epsilon, ``/ (SNR + 1)`` for v."""
    m = np.minimum(snr, gamma)
    return {"x0": m, "epsilon": m / snr, "v": m / (snr + 1.0)}[prediction]


# --------------------------------------------------------------------------- Gaussian mixtures


def mixture_logpdf(x, weights, means, covs):
    """``log sum_k w_k N(x; mu_k, S_k)`` with scipy, ``x`` ``[N, D]``."""
    comps = [np.log(w) + stats.multivariate_normal(m, c).logpdf(x) for w, m, c in zip(weights, means, covs)]
    return logsumexp(np.stack(comps, axis=-1), axis=-1)


def noised_mixture_logpdf(x, a, s, weights, means, covs):
    """Density of ``a x0 + s eps`` for ``x0`` from the mixture: ``sum_k w_k N(a mu_k, a^2 S_k + s^2 I)``."""
    dim = means.shape[1]
    covs_t = [a**2 * c + s**2 * np.eye(dim) for c in covs]
    return mixture_logpdf(x, weights, [a * m for m in means], covs_t)


def mixture_score(x, a, s, weights, means, covs):
    """Analytic ``grad log p_t(x)`` in float64, ``x`` ``[N, D]``, scalar ``a, s``."""
    dim = means.shape[1]
    logp, grads = [], []
    for w, m, c in zip(weights, means, covs):
        ct = a**2 * c + s**2 * np.eye(dim)
        inv = np.linalg.inv(ct)
        diff = x - a * m
        logp.append(np.log(w) + stats.multivariate_normal(a * m, ct).logpdf(x))
        grads.append(-diff @ inv.T)
    logp = np.stack(logp, -1)
    resp = np.exp(logp - logsumexp(logp, axis=-1, keepdims=True))
    return np.einsum("nk,knd->nd", resp, np.stack(grads))

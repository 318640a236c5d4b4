"""Likelihoods against analytic references (scipy, float64): the mixture's log-density and the
exact probabilities of its 8-bit quantization (diagonal covariances: products of normal CDFs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from jaxdiff.likelihood import dequantize, ode_bpd, ode_nll, variational_bound_bpd
from jaxdiff.oracle import GaussianMixture, default_mixture
from jaxdiff.schedules import linear_schedule

LIN = linear_schedule(1000)
MIX = default_mixture(2)
# A mixture inside [-1, 1] with diagonal covariances, for 8-bit data.
W8 = np.array([0.6, 0.4])
MU8 = np.array([[-0.4, 0.3], [0.5, -0.2]])
SD8 = np.array([[0.2, 0.15], [0.25, 0.2]])
MIX8 = GaussianMixture.create(W8, MU8, [np.diag(s**2) for s in SD8])


def mixture_nll(mix, x):
    """``-log p(x)`` of a Gaussian mixture, float64 scipy."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (mix.weights, mix.means, mix.covs))
    comp = [np.log(w[k]) + stats.multivariate_normal(mu[k], cov[k]).logpdf(np.asarray(x, np.float64))
            for k in range(len(w))]
    return -logsumexp(np.stack(comp, 1), axis=1)


def quantized_bpd(x_levels):
    """Exact ``-log2 P(k) / D`` of MIX8 quantized to the bins ``[x, x + 2/255)`` of ``x = k/127.5 - 1``."""
    lo, hi = x_levels, x_levels + 2.0 / 255.0
    p = sum(W8[c] * np.prod(stats.norm.cdf(hi, MU8[c], SD8[c]) - stats.norm.cdf(lo, MU8[c], SD8[c]), axis=1)
            for c in range(2))
    return -np.log2(p) / x_levels.shape[1]


def mixture_samples(w, mu, sd, n, seed):
    rng = np.random.default_rng(seed)
    comp = rng.choice(len(w), size=n, p=w)
    return mu[comp] + sd[comp] * rng.normal(size=(n, mu.shape[1]))


def eight_bit_points(n, seed):
    x = mixture_samples(W8, MU8, SD8, n, seed)
    return np.clip(np.round((x + 1.0) * 127.5), 0, 255) / 127.5 - 1.0


@pytest.fixture(scope="module")
def exact_nll():
    """The PF-ODE NLL with the exact divergence for 8 mixture samples (computed once)."""
    w, mu, cov = (np.asarray(a, np.float64) for a in (MIX.weights, MIX.means, MIX.covs))
    comp = np.random.default_rng(1).choice(3, size=8, p=w)
    z = np.random.default_rng(2).normal(size=(8, 2))
    x = jnp.asarray(mu[comp] + np.einsum("nij,nj->ni", np.linalg.cholesky(cov)[comp], z), jnp.float32)
    out = jax.jit(lambda x: ode_nll(LIN, MIX.model_fn(LIN), x, trace="exact"))(x)
    return np.asarray(x), out


def test_ode_nll_matches_the_analytic_density(exact_nll):
    """Within 0.01 nats per dimension (the remaining error: the N(0, I) prior vs the true
    marginal at t = T-1, and the sigma_0 = 0.01 blur at t = 0)."""
    x, out = exact_nll
    err = np.abs(np.asarray(out["nll"]) - mixture_nll(MIX, x)) / 2
    assert np.all(err < 0.01), err
    assert int(out["nfe"]) > 7 and (int(out["nfe"]) - 1) % 6 == 0


def test_hutchinson_estimate_is_unbiased(exact_nll):
    """Rademacher probes, one per key: the mean over 48 keys agrees with the exact trace."""
    x, out = exact_nll
    x2 = jnp.asarray(x[:2])
    f = jax.jit(jax.vmap(lambda k: ode_nll(LIN, MIX.model_fn(LIN), x2, k, probe="rademacher")["nll"]))
    draws = np.asarray(f(jax.random.split(jax.random.key(2), 48)))  # [48, 2]
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(mean - np.asarray(out["nll"][:2])) < 4 * se + 0.01), (mean, out["nll"][:2], se)
    assert np.all(draws.std(0) > 0)  # the probe does matter for D = 2
    with pytest.raises(ValueError, match="needs a key"):
        ode_nll(LIN, MIX.model_fn(LIN), x2)


def test_dequantized_bpd_matches_the_quantized_mixture():
    """``(E_u nll(x + (2/255) u)/D + log 127.5)/log 2`` ~ ``-log2 P(k)/D`` of the exactly quantized
    mixture (the Jensen gap and the sigma_0 blur are far below the bins' scale here)."""
    xq = eight_bit_points(16, 0)
    out = jax.jit(lambda x, k: ode_bpd(LIN, MIX8.model_fn(LIN), x, k, num_dequant=4, trace="exact"))(
        jnp.asarray(xq, jnp.float32), jax.random.key(1))
    exact = quantized_bpd(xq)
    assert abs(float(np.mean(out["bpd"])) - float(np.mean(exact))) < 0.01
    np.testing.assert_allclose(out["bpd"], exact, atol=0.06)


def test_dequantize_stays_inside_the_bin():
    x = jnp.asarray(eight_bit_points(64, 3), jnp.float32)
    u = np.asarray(dequantize(x, jax.random.key(0))) - np.asarray(x)
    assert np.all(u >= 0.0) and np.all(u < 2.0 / 255.0 + 1e-6)


def test_variational_bound_over_a_dataset(capsys):
    """Batched over uneven batches = the same batches as an iterable; an upper bound on the exact
    quantized bits/dim (measured ~0.7 bit above it: fixed_small variances). ``progress`` shows a
    bar of the 3 batches on stderr and changes nothing."""
    xq = jnp.asarray(eight_bit_points(32, 4), jnp.float32)
    model = MIX8.model_fn(LIN)
    out = variational_bound_bpd(LIN, model, xq, jax.random.key(5), batch_size=12)
    assert capsys.readouterr().err == ""
    again = variational_bound_bpd(LIN, model, [xq[:12], xq[12:24], xq[24:]], jax.random.key(5), progress=True)
    final = capsys.readouterr().err.split("\r")[-1]  # the bar's last state
    assert final.startswith("bits/dim (bound): 100%") and " 3/3 " in final, final
    assert out["num_examples"] == again["num_examples"] == 32
    assert out["bpd"] == pytest.approx(again["bpd"], rel=1e-6)
    assert out["terms_bpd"].shape == (1000,)
    assert out["bpd"] == pytest.approx(out["prior_bpd"] + float(np.sum(out["terms_bpd"])), rel=1e-5)
    exact = float(np.mean(quantized_bpd(np.asarray(xq, np.float64))))
    assert exact - 0.05 < out["bpd"] < exact + 1.5, (out["bpd"], exact)

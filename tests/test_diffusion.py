"""Tests for jaxdiff.diffusion: forward process, posterior, conversions and KL terms.

Everything is compared with float64 NumPy formulas from tests/reference.py (Ho et al. 2020,
Salimans & Ho 2022), with the VE process checked in its own coordinates (x0 + sigma eps,
Brownian-bridge posterior), and the marginal of q_sample with a KS test.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from jaxdiff import diffusion as d
from jaxdiff.schedules import cosine_schedule, linear_schedule, ve_schedule

import reference as ref

T = 1000
SHAPE = (6, 4, 4, 3)  # NHWC
TS = np.array([0, 1, 17, 400, 998, 999], np.int32)


def _f64(x):
    return np.asarray(x, np.float64)


def _data(seed=0, shape=SHAPE):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, shape).astype(np.float32), rng.normal(size=shape).astype(np.float32))


def _schedules():
    return {
        "linear": (linear_schedule(T), ref.linear_betas(T)),
        "cosine": (cosine_schedule(T), ref.cosine_betas(T)),
    }


VP = _schedules()


def _ve(T_, sigma_q):
    return ve_schedule(T_, sigma_q=sigma_q), ref.ve_sigma2(T_, sigma_q)


# ------------------------------------------------------------------------------ forward process


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_sample_matches_eq4(name):
    sched, betas = VP[name]
    x0, eps = _data()
    abar = ref.schedule_fields(betas)["alphas_cumprod"]
    got = d.q_sample(sched, jnp.asarray(x0), jnp.asarray(TS), jnp.asarray(eps))
    assert got.shape == SHAPE and got.dtype == jnp.float32
    np.testing.assert_allclose(_f64(got), ref.q_sample(abar, _f64(x0), TS, _f64(eps)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T_", [1, 10, 1000])
@pytest.mark.parametrize("sigma_q", [1.0, 80.0])
def test_ve_q_sample_is_x0_plus_sigma_noise(T_, sigma_q):
    sched, sigma2 = _ve(T_, sigma_q)
    x0, eps = _data(1)
    t = np.array([0, T_ // 2, T_ - 1, T_ - 1, 0, T_ // 3], np.int32)
    got = d.q_sample(sched, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(eps))
    want = _f64(x0) + ref.bc(np.sqrt(sigma2[t]), x0) * _f64(eps)
    np.testing.assert_allclose(_f64(got), want, rtol=2e-5, atol=2e-5 * sigma_q)
    # Terminal variance sigma_q^2 for every T: the mean and variance of q(x_{T-1} | x0).
    mean, var = d.q_mean_variance(sched, jnp.asarray(x0), jnp.full((6,), T_ - 1, jnp.int32))
    np.testing.assert_allclose(mean, x0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, np.full((6, 1, 1, 1), sigma_q**2), rtol=1e-5)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_mean_variance(name):
    sched, betas = VP[name]
    x0, _ = _data()
    abar = ref.schedule_fields(betas)["alphas_cumprod"][TS]
    mean, var = d.q_mean_variance(sched, jnp.asarray(x0), jnp.asarray(TS))
    np.testing.assert_allclose(mean, ref.bc(np.sqrt(abar), x0) * x0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var, ref.bc(1 - abar, x0), rtol=1e-5)


def test_float_and_negative_timesteps():
    sched, betas = VP["linear"]
    f = ref.schedule_fields(betas)
    x0, eps = _data(2)
    x0, eps = jnp.asarray(x0), jnp.asarray(eps)
    # Integer-valued float t agrees with integer t.
    np.testing.assert_allclose(d.q_sample(sched, x0, jnp.asarray(TS, jnp.float32), eps),
                               d.q_sample(sched, x0, jnp.asarray(TS), eps), rtol=1e-5, atol=1e-5)
    # Fractional t interpolates the log-SNR linearly.
    t = np.array([0.5, 3.25, 100.5, 500.9, 998.5, 0.0], np.float32)
    lo = np.floor(t).astype(int)
    w = t - lo
    lam = (1 - w) * f["log_snr"][lo] + w * f["log_snr"][np.minimum(lo + 1, T - 1)]
    abar = 1 / (1 + np.exp(-lam))
    got = d.q_sample(sched, x0, jnp.asarray(t), eps)
    np.testing.assert_allclose(_f64(got), ref.bc(np.sqrt(abar), x0) * _f64(x0) + ref.bc(np.sqrt(1 - abar), x0)
                               * _f64(eps), rtol=1e-4, atol=1e-5)
    # t = -1 is the data itself.
    a, s = d.alpha_sigma(sched, jnp.array([-1, -1]))
    np.testing.assert_array_equal(a, [1.0, 1.0])
    np.testing.assert_array_equal(s, [0.0, 0.0])


def _mixture_cdf(x, abar_t, a=None):
    """CDF of a x0 + sqrt(1 - abar) eps (a = sqrt(abar)), x0 = +-1 w.p. 1/2, t uniform over the given abar."""
    a = (np.sqrt(abar_t) if a is None else a)[None]
    s = np.sqrt(1 - abar_t)[None]
    x = np.asarray(x)[:, None]
    return np.mean(0.5 * scipy.stats.norm.cdf((x - a) / s) + 0.5 * scipy.stats.norm.cdf((x + a) / s), axis=1)


@pytest.mark.parametrize("kind", ["vp", "ve"])
def test_q_sample_marginal_ks(kind):
    """x0 = +-1 (Rademacher): x_t is a two-component mixture with a known CDF; KS with a fixed key.

    Half the examples sit at one timestep (sharp test), half at uniform t (per-example gather).
    """
    T_ = 50
    sched = linear_schedule(T_, 1e-3, 0.2) if kind == "vp" else ve_schedule(T_, sigma_q=3.0)
    if kind == "vp":
        abar = ref.schedule_fields(ref.linear_betas(T_, 1e-3, 0.2))["alphas_cumprod"]
    else:
        abar = 1.0 / (1.0 + ref.ve_sigma2(T_, 3.0))
    n = 10000
    k_x, k_t, k_n = jax.random.split(jax.random.key(1234), 3)
    x0 = jnp.where(jax.random.bernoulli(k_x, 0.5, (2 * n, 1)), 1.0, -1.0)
    t = jnp.concatenate([jnp.full((n,), 25, jnp.int32), jax.random.randint(k_t, (n,), 0, T_)])
    x_t = np.asarray(d.q_sample(sched, x0, t, jax.random.normal(k_n, (2 * n, 1)))[:, 0], np.float64)
    if kind == "ve":  # back to VP coordinates, where x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        x_t = x_t * np.sqrt(abar[np.asarray(t)])
    fixed, uniform = x_t[:n], x_t[n:]
    assert scipy.stats.kstest(fixed, lambda x: _mixture_cdf(x, abar[25:26])).pvalue > 1e-3
    assert scipy.stats.kstest(uniform, lambda x: _mixture_cdf(x, abar)).pvalue > 1e-3
    # The test has power: a missing square root on the data coefficient (abar x0) is rejected.
    if kind == "vp":
        assert scipy.stats.kstest(fixed, lambda x: _mixture_cdf(x, abar[25:26], a=abar[25:26])).pvalue < 1e-6


# ------------------------------------------------------------------------------ posterior


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_q_posterior_matches_eqs_6_7(name):
    sched, betas = VP[name]
    x0, eps = _data(3)
    x_t = ref.q_sample(ref.schedule_fields(betas)["alphas_cumprod"], _f64(x0), TS, _f64(eps)).astype(np.float32)
    mean, var, logvar = d.q_posterior(sched, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(TS))
    want_mean, want_var = ref.q_posterior(betas, _f64(x0), _f64(x_t), TS)
    assert mean.shape == SHAPE and var.shape == (6, 1, 1, 1) and logvar.shape == (6, 1, 1, 1)
    np.testing.assert_allclose(_f64(mean), want_mean, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(_f64(var[:, 0, 0, 0]), want_var, rtol=1e-5, atol=0)
    assert float(var[0, 0, 0, 0]) == 0.0  # t = 0: the posterior is a point mass at x0
    # Clipped log-variance: log beta-tilde for t >= 1, log beta-tilde_1 at t = 0 (Ho et al.'s code).
    pv = ref.schedule_fields(betas)["posterior_variance"]
    want_log = np.log(np.where(TS == 0, pv[1], pv[TS]))
    np.testing.assert_allclose(_f64(logvar[:, 0, 0, 0]), want_log, rtol=1e-5)
    np.testing.assert_allclose(mean[0], x0[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T_, sigma_q", [(1000, 1.0), (10, 50.0), (3, 2.0)])
def test_ve_posterior_is_brownian_bridge(T_, sigma_q):
    sched, sigma2 = _ve(T_, sigma_q)
    x0, eps = _data(4)
    t = np.array([0, 1, T_ - 1, T_ // 2, T_ - 2, 1], np.int32)
    x_t = (_f64(x0) + ref.bc(np.sqrt(sigma2[t]), x0) * _f64(eps)).astype(np.float32)
    mean, var, logvar = d.q_posterior(sched, jnp.asarray(x0), jnp.asarray(x_t), jnp.asarray(t))
    want_mean, want_var = ref.ve_bridge(sigma2, _f64(x0), _f64(x_t), t)
    np.testing.assert_allclose(_f64(mean), want_mean, rtol=1e-5, atol=2e-5 * sigma_q)
    np.testing.assert_allclose(_f64(var[:, 0, 0, 0]), want_var, rtol=1e-4, atol=1e-12)
    pos = t > 0
    np.testing.assert_allclose(_f64(logvar[pos, 0, 0, 0]), np.log(want_var[pos]), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(logvar))


# ------------------------------------------------------------------------------ parameterizations


@pytest.mark.parametrize("name", ["linear", "cosine", "ve"])
def test_conversions_against_formulas_and_round_trips(name):
    if name == "ve":
        sched, sigma2 = _ve(T, 10.0)
        abar = 1.0 / (1.0 + sigma2)
    else:
        sched, betas = VP[name]
        abar = ref.schedule_fields(betas)["alphas_cumprod"]
    t = np.array([0, 5, 250, 500, 900, 990], np.int32)  # stay off the last step (abar ~ 0 for cosine)
    x0, eps = _data(5)
    x0_, eps_, t_ = _f64(x0), _f64(eps), jnp.asarray(t)
    ab = abar[t]
    x_vp = ref.q_sample(abar, x0_, t, eps_)
    # Coordinates the library uses for x_t: VP, or VE = VP / sqrt(abar).
    x_t = x_vp if name != "ve" else x_vp / ref.bc(np.sqrt(ab), x0_)
    x_t32 = jnp.asarray(x_t, jnp.float32)
    np.testing.assert_allclose(_f64(d.q_sample(sched, jnp.asarray(x0), t_, jnp.asarray(eps))), x_t,
                               rtol=1e-4, atol=1e-5)
    tol = dict(rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(d.x0_from_eps(sched, x_t32, t_, jnp.asarray(eps)), x0_, **tol)
    np.testing.assert_allclose(d.eps_from_x0(sched, x_t32, t_, jnp.asarray(x0)), eps_, **tol)
    v = ref.v_from(ab, x0_, eps_)
    np.testing.assert_allclose(d.v_from_x0_eps(sched, t_, jnp.asarray(x0), jnp.asarray(eps)), v, rtol=1e-5,
                               atol=1e-5)
    x0_v, eps_v = d.x0_eps_from_v(sched, x_t32, t_, jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(x0_v, x0_, **tol)
    np.testing.assert_allclose(eps_v, eps_, **tol)
    # Score of q(x_t | x0) in the schedule's own coordinates: -(x_t - m)/var, from the Gaussian.
    if name == "ve":
        score = -(x_t - x0_) / ref.bc(1 / ab - 1, x0_)
    else:
        score = -(x_t - ref.bc(np.sqrt(ab), x0_) * x0_) / ref.bc(1 - ab, x0_)
    got_score = d.score_from_eps(sched, t_, jnp.asarray(eps))
    np.testing.assert_allclose(_f64(got_score), score, rtol=1e-4, atol=1e-5 * np.abs(score).max())
    if name != "ve":
        np.testing.assert_allclose(_f64(got_score), ref.score_vp(ab, eps_), rtol=1e-5)
    np.testing.assert_allclose(d.eps_from_score(sched, t_, got_score), eps_, rtol=1e-5, atol=1e-5)
    # Round trips through every parameterization.
    targets = {"epsilon": eps_, "x0": x0_, "v": v, "score": score}
    for prediction, target in targets.items():
        np.testing.assert_allclose(
            _f64(d.prediction_target(sched, jnp.asarray(x0), t_, jnp.asarray(eps), prediction)), target,
            rtol=1e-4, atol=1e-5 * max(1.0, np.abs(target).max()), err_msg=prediction)
        x0_hat, eps_hat = d.x0_eps_from_prediction(sched, jnp.asarray(target, jnp.float32), x_t32, t_, prediction)
        np.testing.assert_allclose(x0_hat, x0_, **tol, err_msg=prediction)
        np.testing.assert_allclose(eps_hat, eps_, **tol, err_msg=prediction)
    np.testing.assert_allclose(
        d.eps_from_x0(sched, x_t32, t_, d.x0_from_eps(sched, x_t32, t_, jnp.asarray(eps))), eps_, **tol)


# ------------------------------------------------------------------------------ KL terms


def test_normal_kl_against_numerical_integration():
    cases = [(0.3, -1.0, -0.2, 0.5), (0.0, 0.0, 0.0, 0.0), (2.0, 1.0, -1.0, -2.0), (-0.5, -3.0, -0.4, -2.5)]
    for m1, lv1, m2, lv2 in cases:
        p = scipy.stats.norm(m1, np.exp(0.5 * lv1))
        q = scipy.stats.norm(m2, np.exp(0.5 * lv2))
        lo, hi = m1 - 12 * p.std(), m1 + 12 * p.std()
        integral, _ = scipy.integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi, limit=200)
        got = float(d.normal_kl(jnp.float32(m1), jnp.float32(lv1), jnp.float32(m2), jnp.float32(lv2)))
        assert got == pytest.approx(integral, rel=1e-5, abs=1e-6)
        assert got == pytest.approx(ref.normal_kl(m1, np.exp(lv1), m2, np.exp(lv2)), rel=1e-5, abs=1e-6)
    rng = np.random.default_rng(0)
    m1, lv1, m2, lv2 = rng.normal(size=(4, 3, 5))
    got = d.normal_kl(jnp.asarray(m1), jnp.asarray(lv1), jnp.asarray(m2), jnp.asarray(lv2))
    np.testing.assert_allclose(got, ref.normal_kl(m1, np.exp(lv1), m2, np.exp(lv2)), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got) >= 0)


@pytest.mark.parametrize("name", ["linear", "cosine", "ve"])
def test_prior_kl(name):
    x0, _ = _data(6)
    x0_ = _f64(x0)
    if name == "ve":
        sched, sigma2 = _ve(T, 5.0)
        # In VE coordinates: KL(N(x0, sigma_T^2) || N(0, 1 + sigma_T^2)), the library's prior.
        want = ref.normal_kl(x0_, sigma2[-1], 0.0, 1.0 + sigma2[-1])
    else:
        sched, betas = VP[name]
        ab = ref.schedule_fields(betas)["alphas_cumprod"][-1]
        want = ref.normal_kl(np.sqrt(ab) * x0_, 1 - ab, 0.0, 1.0)
    got = d.prior_kl(sched, jnp.asarray(x0))
    assert got.shape == (6,)
    np.testing.assert_allclose(_f64(got), want.reshape(6, -1).sum(-1), rtol=1e-3, atol=1e-6)
    # A short linear schedule leaves a large, accurately computed prior term.
    short = linear_schedule(10)
    ab = ref.schedule_fields(ref.linear_betas(10))["alphas_cumprod"][-1]
    want = ref.normal_kl(np.sqrt(ab) * x0_, 1 - ab, 0.0, 1.0).reshape(6, -1).sum(-1)
    np.testing.assert_allclose(d.prior_kl(short, jnp.asarray(x0)), want, rtol=1e-5)


# ------------------------------------------------------------------------------ transformations


class TransformationsTest(chex.TestCase):
    """q_sample and q_posterior under jit and eagerly (chex variants) equal the float64 formulas;
    vmap over single examples equals the batched call."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_forward_process_and_posterior_match_float64(self):
        sched, betas = VP["linear"]
        x0, eps = _data(7)
        abar = ref.schedule_fields(betas)["alphas_cumprod"]
        x_t = self.variant(d.q_sample)(sched, jnp.asarray(x0), jnp.asarray(TS), jnp.asarray(eps))
        chex.assert_trees_all_close(_f64(x_t), ref.q_sample(abar, _f64(x0), TS, _f64(eps)), rtol=1e-5, atol=1e-5)
        mean, var, _ = self.variant(d.q_posterior)(sched, jnp.asarray(x0), x_t, jnp.asarray(TS))
        want_mean, want_var = ref.q_posterior(betas, _f64(x0), _f64(x_t), TS)
        chex.assert_trees_all_close((_f64(mean), _f64(var[:, 0, 0, 0])), (want_mean, want_var), rtol=1e-4, atol=1e-5)

    def test_vmap_equals_batch(self):
        vsched, _ = _ve(T, 20.0)
        x0, eps = (jnp.asarray(a) for a in _data(7))
        t = jnp.asarray(TS)
        for s in (VP["linear"][0], vsched):
            batched = d.q_sample(s, x0, t, eps)
            one = lambda x, tt, n, s=s: d.q_sample(s, x[None], tt[None], n[None])[0]
            chex.assert_trees_all_close(jax.vmap(one)(x0, t, eps), batched, rtol=1e-6, atol=1e-6)
            post = d.q_posterior(s, x0, batched, t)

            def one_p(x, xt, tt, s=s):
                return jax.tree.map(lambda a: a[0], d.q_posterior(s, x[None], xt[None], tt[None]))

            chex.assert_trees_all_close(jax.vmap(one_p)(x0, batched, t), post, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ errors


def test_shape_errors():
    sched, _ = VP["linear"]
    x0, eps = (jnp.asarray(a) for a in _data())
    t = jnp.asarray(TS)
    with pytest.raises(ValueError, match=r"x0 and noise.*\(6, 4, 4, 3\).*\(6, 4, 4, 2\)"):
        d.q_sample(sched, x0, t, eps[..., :2])
    with pytest.raises(ValueError, match=r"t must have shape \[B\].*\(6, 1\)"):
        d.q_sample(sched, x0, t[:, None], eps)
    with pytest.raises(ValueError, match=r"t must have shape \[B\].*\(\)"):
        d.q_sample(sched, x0, jnp.int32(3), eps)
    with pytest.raises(ValueError, match=r"t has shape \(5,\).*x0 has shape \(6, 4, 4, 3\)"):
        d.q_sample(sched, x0, t[:5], eps)
    with pytest.raises(ValueError, match=r"t has shape \(5,\)"):
        d.q_mean_variance(sched, x0, t[:5])
    with pytest.raises(ValueError, match=r"x0 and x_t.*\(6, 4, 4, 3\).*\(6, 4, 3, 3\)"):
        d.q_posterior(sched, x0, eps[:, :, :3], t)
    with pytest.raises(ValueError, match=r"t must have shape \[B\]"):
        d.q_posterior(sched, x0, eps, t[None])
    with pytest.raises(ValueError, match=r"model_output has shape \(6, 4, 4, 6\) but x_t has shape \(6, 4, 4, 3\)"):
        d.x0_eps_from_prediction(sched, jnp.concatenate([eps, eps], -1), x0, t, "epsilon")


@pytest.mark.parametrize("bad", ["eps", "noise", "sample", ""])
def test_unknown_prediction(bad):
    sched, _ = VP["linear"]
    x0, eps = (jnp.asarray(a) for a in _data())
    t = jnp.asarray(TS)
    with pytest.raises(ValueError, match=r"prediction must be one of .*epsilon.*" + repr(bad)):
        d.x0_eps_from_prediction(sched, eps, x0, t, bad)
    with pytest.raises(ValueError, match="prediction must be one of"):
        d.prediction_target(sched, x0, t, eps, bad)

"""EDM preconditioning, loss and sampler against float64 NumPy formulas from Karras et al. (2022).

References written here from the paper: Table 1 (the VP / VE / EDM columns and the loss weight),
eq. 5 (the time steps), Algorithm 2 (the stochastic Heun sampler, Algorithm 1 when S_churn = 0).
For data ``N(m, s^2)`` per dimension the ideal denoiser is ``D*(x, sigma) = m + s^2 / (s^2 + sigma^2) (x - m)``,
so the optimal loss and the sampler's whole chain are known in closed form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff import edm
from jaxdiff.schedules import linear_schedule, ve_schedule

from reference import linear_betas

LIN = linear_schedule(1000)
SIGMAS = np.array([0.002, 0.01, 0.1, 0.5, 1.0, 3.0, 20.0, 80.0])

# --------------------------------------------------------------------------- references (NumPy, float64)


def ref_grid(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM eq. 5: ``t_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, ``t_N = 0``."""
    i = np.arange(n, dtype=np.float64)
    t = (sigma_max ** (1 / rho) + i / max(n - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(t, 0.0)


def ref_gauss_denoiser(m, s):
    return lambda x, sigma: m + s**2 / (s**2 + sigma**2) * (x - m)


def ref_algorithm_2(D, x, t, eps=None, s_churn=0.0, s_tmin=0.0, s_tmax=np.inf, s_noise=1.0):
    """EDM Algorithm 2, line by line; ``eps[i]`` are the unit normal draws of step i (already ``N(0, I)``)."""
    x = np.asarray(x, np.float64)
    n = len(t) - 1
    for i in range(n):
        gamma = min(s_churn / n, np.sqrt(2.0) - 1.0) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        e = np.zeros_like(x) if eps is None else s_noise * np.asarray(eps[i], np.float64)
        x_hat = x + np.sqrt(t_hat**2 - t[i] ** 2) * e
        d = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_prime = (x_next - D(x_next, t[i + 1])) / t[i + 1]
            x_next = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


def gauss_jax_denoiser(m, s):
    def fn(x, sigma):
        k = s**2 / (s**2 + sigma**2)
        return m + k.reshape(k.shape + (1,) * (x.ndim - 1)) * (x - m)

    return fn


def ref_lin_t(sigma):
    """Fractional timestep of ``sigma`` on the linear schedule: log-SNR interpolated linearly in t."""
    abar = np.cumprod(1.0 - linear_betas(1000))
    lam = np.log(abar / (1.0 - abar))
    return np.interp(-(-2.0 * np.log(sigma)), -lam, np.arange(1000.0))


# --------------------------------------------------------------------------- preconditioning


@pytest.mark.parametrize("sigma_data", [0.5, 0.7])
def test_edm_column_of_table_1(sigma_data):
    s, sd = SIGMAS, sigma_data
    ref = {
        "c_skip": sd**2 / (s**2 + sd**2),
        "c_out": s * sd / np.sqrt(sd**2 + s**2),
        "c_in": 1.0 / np.sqrt(s**2 + sd**2),
        "c_noise": 0.25 * np.log(s),
    }
    got = edm.edm_coefficients(jnp.asarray(s, jnp.float32), sd)
    for name, value in ref.items():
        np.testing.assert_allclose(np.asarray(getattr(got, name)), value, rtol=2e-6, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(np.asarray(edm.c_skip(jnp.asarray(s), sd)), ref["c_skip"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(edm.c_out(jnp.asarray(s), sd)), ref["c_out"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(edm.c_in(jnp.asarray(s), sd)), ref["c_in"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(edm.c_noise(jnp.asarray(s))), ref["c_noise"], rtol=2e-6, atol=1e-7)
    weight = (s**2 + sd**2) / (s * sd) ** 2
    np.testing.assert_allclose(np.asarray(edm.loss_weight(jnp.asarray(s, jnp.float32), sd)), weight, rtol=2e-6)
    np.testing.assert_allclose(weight, 1.0 / ref["c_out"] ** 2, rtol=1e-12)  # lambda = 1 / c_out^2 (sec. 5)


def test_vp_and_ve_columns_of_table_1():
    s = SIGMAS
    ve = edm.ve_coefficients(jnp.asarray(s, jnp.float32))
    for got, value in zip(ve, (np.ones_like(s), s, np.ones_like(s), np.log(0.5 * s)), strict=True):
        np.testing.assert_allclose(np.asarray(got), value, rtol=2e-6)
    beta_d, beta_min, m = 19.9, 0.1, 1000
    t_inv = (np.sqrt(beta_min**2 + 2 * beta_d * np.log(s**2 + 1)) - beta_min) / beta_d
    np.testing.assert_allclose(np.sqrt(np.exp(0.5 * beta_d * t_inv**2 + beta_min * t_inv) - 1), s, rtol=1e-10)
    vp = edm.vp_coefficients(jnp.asarray(s, jnp.float32))
    ref = (np.ones_like(s), -s, 1.0 / np.sqrt(s**2 + 1), (m - 1) * t_inv)
    for got, value in zip(vp, ref, strict=True):
        np.testing.assert_allclose(np.asarray(got), value, rtol=2e-5, atol=1e-6)
    # the discrete schedule: c_noise is the fractional timestep (sigma clamped to the table's range)
    vp_lin = edm.vp_coefficients(jnp.asarray(s, jnp.float32), LIN)
    np.testing.assert_allclose(np.asarray(vp_lin.c_noise), ref_lin_t(s), atol=2e-3)


def test_precondition_wraps_a_raw_network():
    """``D = c_skip x + c_out F(c_in x, c_noise, y)`` (EDM eq. 7), with labels passed through."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 4, 4, 2)) * 3
    sigma = np.exp(rng.normal(size=8))
    y = rng.integers(0, 5, size=8)

    def F_np(x_in, c_noise, y):
        return np.tanh(0.7 * x_in) + (c_noise + 0.1 * y).reshape(-1, 1, 1, 1)

    def F(x_in, c_noise, y):
        return jnp.tanh(0.7 * x_in) + (c_noise + 0.1 * y)[:, None, None, None]

    sd = 0.6
    cs, co, ci = sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2), 1 / np.sqrt(sigma**2 + sd**2)
    b = lambda c: c.reshape(-1, 1, 1, 1)
    ref = b(cs) * x + b(co) * F_np(b(ci) * x, np.log(sigma) / 4, y)
    D = jax.jit(edm.precondition(F, sigma_data=sd))
    got = D(jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)
    # the VE column: D = x + sigma F(x, ln(sigma / 2))
    D_ve = edm.precondition(F, coefficients=edm.ve_coefficients)
    got = D_ve(jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(np.asarray(got), x + b(sigma) * F_np(x, np.log(sigma / 2), y), rtol=1e-5, atol=1e-5)


def _gauss_network(schedule, prediction, m, s):
    """A network of the library's objectives for ``N(m, s^2)`` data: exact at every (fractional) t."""
    lam = jnp.asarray(np.asarray(schedule.log_snr, np.float64), jnp.float32)
    T = schedule.num_timesteps

    def net(x_t, t):
        sig = jnp.exp(-0.5 * jnp.interp(t, jnp.arange(T, dtype=jnp.float32), lam))[:, None]
        y = x_t * jnp.sqrt(1.0 + sig**2) if schedule.kind == "vp" else x_t  # EDM coordinates x0 + sigma n
        x0 = m + s**2 / (s**2 + sig**2) * (y - m)
        eps = (y - x0) / sig
        alpha = jax.lax.rsqrt(1.0 + sig**2)
        return {"epsilon": eps, "x0": x0, "v": alpha * eps - sig * alpha * x0}[prediction]

    return net


@pytest.mark.parametrize("kind,prediction", [("vp", "epsilon"), ("vp", "v"), ("vp", "x0"), ("ve", "epsilon")])
def test_denoiser_from_eps(kind, prediction):
    """A network trained on a discrete schedule, as a denoiser: equals the exact Gaussian denoiser inside
    the schedule's sigma range (rtol 1e-4), and for epsilon on VP the Table-1 VP column
    ``x - sigma eps(x / sqrt(1 + sigma^2), t(sigma))`` written here with the test's own t(sigma)."""
    m, s = 0.3, 0.5
    schedule = LIN if kind == "vp" else ve_schedule(1000, sigma_q=20.0)
    net = _gauss_network(schedule, prediction, m, s)
    lo, hi = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    sigma = np.geomspace(lo * 1.01, hi * 0.99, 16)
    rng = np.random.default_rng(1)
    x = m + s * rng.normal(size=(16, 3)) + sigma[:, None] * rng.normal(size=(16, 3))  # x0 + sigma n
    D = jax.jit(edm.denoiser_from_eps(schedule, net, prediction))
    got = np.asarray(D(jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, ref_gauss_denoiser(m, s)(x, sigma[:, None]), rtol=1e-4, atol=1e-4)
    if kind == "vp" and prediction == "epsilon":
        x_vp = x / np.sqrt(1 + sigma[:, None] ** 2)
        eps = np.asarray(net(jnp.asarray(x_vp, jnp.float32), jnp.asarray(ref_lin_t(sigma), jnp.float32)))
        np.testing.assert_allclose(got, x - sigma[:, None] * eps, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- loss


def ref_optimal_loss(sigma, sd, sigma_data):
    """``E lambda(sigma) (D*(x0 + sigma n) - x0)^2`` per element for x0 ~ N(0, sd^2):
    the error is ``N(0, sd^2 sigma^2 / (sd^2 + sigma^2))``, times ``(sigma^2 + s_d^2) / (sigma s_d)^2``."""
    return sd**2 * (sigma**2 + sigma_data**2) / (sigma_data**2 * (sd**2 + sigma**2))


@pytest.mark.parametrize("sd", [0.5, 0.8])
def test_loss_at_the_optimum(sd):
    """The ideal denoiser's Monte-Carlo loss equals its analytic expectation within 5 standard errors, at fixed
    sigma (``E = 1`` for every sigma when the data's std is sigma_data) and averaged over the log-normal sigma
    (Gauss-Hermite quadrature of ``E(sigma)``)."""
    b, dim, sigma_data = 4096, 8, 0.5
    x0 = sd * jax.random.normal(jax.random.key(0), (b, dim))
    D = gauss_jax_denoiser(0.0, sd)
    loss_fn = jax.jit(lambda x0, key, sigma: edm.edm_loss(D, x0, key, sigma_data=sigma_data, sigma=sigma))
    for j, sig in enumerate([0.01, 0.3, 2.0, 50.0]):
        loss, metrics = loss_fn(x0, jax.random.key(j + 1), jnp.full((b,), sig))
        expected = ref_optimal_loss(sig, sd, sigma_data)
        assert abs(float(loss) - expected) < 5 * expected * np.sqrt(2.0 / (b * dim)), (sig, float(loss), expected)
        assert float(metrics["mse"]) == float(loss)
        err = sd**2 * sig**2 / (sd**2 + sig**2)
        assert abs(float(metrics["x0_mse"]) - err) < 5 * err * np.sqrt(2.0 / (b * dim))
    loss, _ = jax.jit(lambda x0, key: edm.edm_loss(D, x0, key, sigma_data=sigma_data))(x0, jax.random.key(9))
    z, w = np.polynomial.hermite_e.hermegauss(80)
    e = ref_optimal_loss(np.exp(-1.2 + 1.2 * z), sd, sigma_data)
    mean = np.sum(w * e) / np.sum(w)
    var = np.sum(w * e**2 * (1 + 2.0 / dim)) / np.sum(w) - mean**2  # per example: E(sigma) chi2_dim / dim
    assert abs(float(loss) - mean) < 5 * np.sqrt(var / b), (float(loss), mean)


def test_log_normal_sigma():
    """``ln sigma ~ N(-1.2, 1.2^2)``: KS test, fixed key, p > 1e-3."""
    sig = edm.log_normal_sigma(jax.random.key(3), (20000,))
    assert stats.kstest(np.log(np.asarray(sig, np.float64)), stats.norm(-1.2, 1.2).cdf).pvalue > 1e-3


def test_loss_per_example_keys_and_grad():
    """Each example draws from its own key, so the loss of a batch is the mean over any split of it; one key
    means ``fold_in(key, b)``; the loss is differentiable (central difference, rtol 1e-3)."""
    x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 1))
    key = jax.random.key(5)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(8))

    @jax.jit
    def loss(w, x0, k):
        return edm.edm_loss(edm.precondition(lambda x, c: w * jnp.tanh(x) + c[:, None, None, None]), x0, k)[0]

    whole = loss(0.5, x0, keys)
    halves = 0.5 * (loss(0.5, x0[:4], keys[:4]) + loss(0.5, x0[4:], keys[4:]))
    np.testing.assert_allclose(float(whole), float(halves), rtol=1e-6)
    np.testing.assert_allclose(float(loss(0.5, x0, key)), float(whole), rtol=1e-6)
    g = jax.jit(jax.grad(loss))(0.5, x0, keys)
    h = 1e-2
    fd = (float(loss(0.5 + h, x0, keys)) - float(loss(0.5 - h, x0, keys))) / (2 * h)
    np.testing.assert_allclose(float(g), fd, rtol=1e-3)


def test_loss_bad_inputs():
    D = gauss_jax_denoiser(0.0, 0.5)
    x0 = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match="sigma must have shape"):
        edm.edm_loss(D, x0, jax.random.key(0), sigma=jnp.ones((3,)))
    with pytest.raises(ValueError, match="noise must have the shape"):
        edm.edm_loss(D, x0, jax.random.key(0), noise=jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="batch of 4 keys"):
        edm.edm_loss(D, x0, jax.random.split(jax.random.key(0), 3))


# --------------------------------------------------------------------------- the grid and the sampler


@pytest.mark.parametrize("n", [1, 2, 5, 18])
def test_karras_sigmas_is_eq_5(n):
    """rtol 1e-5: the float32 power ``(...)^rho`` multiplies the rounding error of its base by ``rho``."""
    np.testing.assert_allclose(np.asarray(edm.karras_sigmas(n)), ref_grid(n), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(edm.karras_sigmas(n, 0.01, 157.0, 3.0)), ref_grid(n, 0.01, 157.0, 3.0),
                               rtol=1e-5)
    padded = np.asarray(jax.jit(lambda k: edm.karras_sigmas(k, max_steps=20))(n))
    assert padded.shape == (21,)
    np.testing.assert_allclose(padded, np.pad(ref_grid(n), (0, 20 - n)), rtol=1e-5)


def test_karras_sigmas_bad_inputs():
    with pytest.raises(ValueError, match="max_steps"):
        jax.jit(lambda k: edm.karras_sigmas(k))(5)
    with pytest.raises(ValueError, match="num_steps must be in"):
        edm.karras_sigmas(30, max_steps=20)


M, S = 0.3, 0.5  # Gaussian data N(M, S^2) per dimension
D_JAX = gauss_jax_denoiser(M, S)
D_NP = ref_gauss_denoiser(M, S)


@pytest.mark.parametrize("n", [1, 2, 7, 18])
def test_deterministic_sampler_is_algorithm_1(n):
    """S_churn = 0: the chain equals the float64 transcription from the same latent (rtol/atol 1e-4),
    with NFE 2n - 1 counted on the host."""
    x = 80.0 * jax.random.normal(jax.random.key(n), (64, 3))
    calls = []

    def counted(x, sigma):
        jax.debug.callback(lambda: calls.append(1))
        return D_JAX(x, sigma)

    out, info = jax.jit(lambda x: edm.sample_with_info(counted, x, edm.karras_sigmas(n)))(x)
    jax.effects_barrier()
    ref = ref_algorithm_2(D_NP, np.asarray(x), ref_grid(n))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
    assert int(info["nfe"]) == len(calls) == edm.sample_nfe(n) == 2 * n - 1 and int(info["num_steps"]) == n


@pytest.mark.parametrize("churn,tmin,tmax,snoise", [(40.0, 0.05, 50.0, 1.003), (5.0, 0.0, np.inf, 1.0),
                                                     (100.0, 0.5, 10.0, 1.007)])
def test_stochastic_sampler_is_algorithm_2(churn, tmin, tmax, snoise):
    """With the per-step noise passed in, the churned chain equals the float64 transcription (rtol/atol 1e-4)."""
    n = 12
    x = 80.0 * jax.random.normal(jax.random.key(0), (32, 2))
    eps = jax.random.normal(jax.random.key(1), (n, 32, 2))
    out = edm.sample(D_JAX, x, edm.karras_sigmas(n), s_churn=churn, s_tmin=tmin, s_tmax=tmax, s_noise=snoise,
                     noise=eps)
    ref = ref_algorithm_2(D_NP, np.asarray(x), ref_grid(n), np.asarray(eps), churn, tmin, tmax, snoise)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)
    det = ref_algorithm_2(D_NP, np.asarray(x), ref_grid(n))
    assert np.abs(ref - det).max() > 0.05  # the churn matters at this tolerance


def _chain_law(t, s_churn, s_noise=1.0):
    """Exact law of Algorithm 2's output for ``N(M, S^2)`` data from ``x_0 ~ N(0, t_0^2)``: every step is
    affine in (x, eps) around M, so the mean and variance propagate in closed form (float64)."""
    mean, var = 0.0, t[0] ** 2
    n = len(t) - 1
    for i in range(n):
        gamma = min(s_churn / n, np.sqrt(2.0) - 1.0)
        t_hat = t[i] * (1 + gamma)
        var = var + (t_hat**2 - t[i] ** 2) * s_noise**2
        one_step = ref_algorithm_2(D_NP, np.array([M, M + 1.0]), np.array([t_hat, t[i + 1]]))
        c = one_step[1] - one_step[0]  # the step's slope around M (no churn inside: gamma of a 1-step grid)
        mean, var = M + c * (mean - M), c**2 * var
    return mean, var


def test_stochastic_sampler_distribution_with_key():
    """20,000 chains with churn (key-drawn noise) follow the exact law of the discretized chain: KS p > 1e-3."""
    n, churn = 8, 20.0
    x = 80.0 * jax.random.normal(jax.random.key(0), (20000, 1))
    out = jax.jit(lambda x, key: edm.sample(D_JAX, x, edm.karras_sigmas(n), key, s_churn=churn))(x, jax.random.key(7))
    mean, var = _chain_law(ref_grid(n), churn)
    det_mean, det_var = _chain_law(ref_grid(n), 0.0)
    assert abs(var - det_var) > 0.02 * det_var  # the churn changes the law at this step count
    assert stats.kstest(np.asarray(out[:, 0], np.float64), stats.norm(mean, np.sqrt(var)).cdf).pvalue > 1e-3


def test_one_program_for_every_step_count_and_churn():
    """Steps, churn settings and the grid's ends are runtime values: one compilation; a padded grid gives the
    same chain as the exact-length one; vmap over keys draws independent chains."""
    @jax.jit
    def run(x, n, churn, tmin, tmax, snoise, smax, key):
        return edm.sample_with_info(D_JAX, smax * x, edm.karras_sigmas(n, sigma_max=smax, max_steps=32), key,
                                    s_churn=churn, s_tmin=tmin, s_tmax=tmax, s_noise=snoise)

    z = jax.random.normal(jax.random.key(0), (16, 2))
    key = jax.random.key(1)
    for n, churn, tmin, tmax, snoise, smax in [(3, 0.0, 0.0, np.inf, 1.0, 80.0), (18, 40.0, 0.05, 50.0, 1.003, 80.0),
                                               (32, 10.0, 0.0, 1e3, 1.0, 20.0), (7, 0.0, 0.0, np.inf, 1.0, 80.0)]:
        out, info = run(z, n, churn, tmin, tmax, snoise, smax, key)
        assert int(info["nfe"]) == 2 * n - 1
    assert run._cache_size() == 1
    np.testing.assert_allclose(np.asarray(out), ref_algorithm_2(D_NP, np.asarray(80.0 * z), ref_grid(7)),
                               rtol=1e-4, atol=1e-4)
    exact = edm.sample(D_JAX, 80.0 * z, edm.karras_sigmas(7))
    np.testing.assert_allclose(np.asarray(out), np.asarray(exact), rtol=1e-5, atol=1e-5)
    chains = jax.vmap(lambda k: run(z, 10, 40.0, 0.0, np.inf, 1.0, 80.0, k)[0])(jax.random.split(key, 3))
    assert not np.allclose(chains[0], chains[1])


def test_sampler_bad_inputs():
    x = jnp.zeros((4, 2))
    edm.sample(denoiser=D_JAX, x=x, sigmas=edm.karras_sigmas(2), key=None, s_churn=0.0)  # the keyword names
    with pytest.raises(ValueError, match="pass `key` or `noise`"):
        edm.sample(D_JAX, x, edm.karras_sigmas(4), s_churn=1.0)
    with pytest.raises(ValueError, match="noise must have shape"):
        edm.sample(D_JAX, x, edm.karras_sigmas(4), noise=jnp.zeros((3, 4, 2)))
    with pytest.raises(ValueError, match="sigmas must be a 1-D grid"):
        edm.sample(D_JAX, x, jnp.ones((1,)))


# --------------------------------------------------------------------------- the Gaussian-mixture oracle


@functools.cache
def _oracle():
    """``(mixture, mmd2, run)``: ``run(x, n, sigma_max)`` is the EDM sampler on ``karras_sigmas(n, 0.002, sigma_max)``
    with the exact mixture model made a denoiser by :func:`denoiser_from_eps` on the linear schedule."""
    from test_samplers import MIX, mmd2_to_mixture

    D = edm.denoiser_from_eps(LIN, MIX.model_fn(LIN))
    run = jax.jit(lambda x, n, smax: edm.sample(D, x, edm.karras_sigmas(n, sigma_max=smax, max_steps=128)))
    return MIX, mmd2_to_mixture, run


@pytest.mark.slow
def test_edm_sampler_reproduces_the_mixture():
    """128 steps (255 NFE) from sigma_max = 80 are at the MMD noise floor (< 4 x 1.5e-4) and match the
    moments; 18 steps are further away."""
    from test_samplers import MMD_NOISE, assert_matches_mixture

    mix, mmd2, run = _oracle()
    z = 80.0 * jax.random.normal(jax.random.key(0), (3000, 2))
    x_ref, x18 = np.asarray(run(z, 128, 80.0)), np.asarray(run(z, 18, 80.0))
    d_ref, d18 = mmd2(x_ref, mix), mmd2(x18, mix)
    assert d_ref < 4 * MMD_NOISE and d18 > d_ref, (d18, d_ref)
    assert_matches_mixture(x_ref, mix)


@functools.cache
def _errors_at_35_nfe():
    """RMS distance of each sampler's output at 35 NFE from the probability-flow map of the *same* starting
    noise (128 Heun steps; 128 vs 256 steps differ by 0.0006-0.0017). The exact map carries the prior to the
    mixture, so each figure bounds the sampler's W2 distance to the mixture (through that coupling) and,
    unlike MMD^2 from a few thousand points, has little Monte-Carlo noise. EDM starts from ``80 z``; DDIM and
    DPM-Solver++ from the prior draw ``x_T = z`` at t = T-1, whose map starts at sigma = 157 from
    ``z sqrt(1 + 157^2)``."""
    from test_samplers import run as run_sampler

    _, _, run = _oracle()
    z = jax.random.normal(jax.random.key(0), (3000, 2))
    s_top = float(LIN.sigmas[-1])
    exact_80 = np.asarray(run(80.0 * z, 128, 80.0))
    exact_top = np.asarray(run(z * np.sqrt(1.0 + s_top**2), 128, s_top))
    rms = lambda a, b: float(np.sqrt(np.mean(np.sum((np.asarray(a) - b) ** 2, axis=1))))
    return {
        "edm": rms(run(80.0 * z, 18, 80.0), exact_80),
        "ddim": rms(run_sampler("ddim", 35, x_T=z, runtime={"eta": 0.0})[0], exact_top),
        "dpm_solver++": rms(run_sampler("dpm_solver++", 35, x_T=z)[0], exact_top),
    }


@pytest.mark.slow
def test_edm_is_closer_than_ddim_at_35_nfe():
    """18 EDM steps (35 NFE, sigma 0.002..80) land closer to the exact probability-flow map than DDIM's 35
    steps: RMS error 0.051-0.057 against 0.087-0.093 (seeds 0-1), asserted with a 0.75 ratio. By MMD^2 x 1e4
    against the mixture the order is the same on average but not resolved per run: 12 runs of 8,000 points
    give EDM 6.0 +- 0.4, DDIM 7.8 +- 0.4 (mean +- s.e.), a single run scattering by 1.3 (DDIM ahead in 2 of 12)."""
    d = _errors_at_35_nfe()
    assert d["edm"] < 0.75 * d["ddim"], d


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: at 35 NFE DPM-Solver++(2M) is closer to the mixture than EDM")
def test_edm_is_closer_than_dpm_solver_at_35_nfe():
    """Does not hold on this oracle: DPM-Solver++(2M) at 35 NFE has RMS error 0.026-0.032 (EDM 0.051-0.057) and
    MMD^2 x 1e4 at the noise floor (0.1-0.3, EDM ~6). EDM's error at 18 steps comes from sigma 0.3-8, where
    the modes separate: refining any single step there into 16 substeps lowers MMD^2 x 1e4 from 9.2 by up to
    3.3 (3,000 points), refining steps outside it changes nothing, and the exact continuous denoiser gives the
    same figure (9.2 vs 9.0), so it is not the schedule's clamping below sigma = 0.01. The rho = 7 grid puts 5
    of its 18 points in that range (step ratios 1.6-2.0), DDIM's 35 timesteps put 19 there, and the same Heun
    sampler on DDIM's sigmas reaches MMD^2 x 1e4 2.1 at 35 NFE (bench/edm_oracle.py)."""
    d = _errors_at_35_nfe()
    assert d["edm"] < d["dpm_solver++"], d

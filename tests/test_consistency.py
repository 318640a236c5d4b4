"""Consistency training (jaxdiff.consistency, objectives.Consistency, the consistency sampler).

References: the iCT paper's formulas written here in float64 Python (the curriculum, the level
weights, the pseudo-Huber distance); Gaussian data ``x0 ~ N(0, S^2)``, whose exact consistency
function is the PF-ODE map to ``sigma_min``, ``f*(x, sigma) = x sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma^2)``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from jaxdiff import consistency as ct
from jaxdiff import objectives, samplers
from jaxdiff.denoiser import Denoiser

S, SMIN, SMAX = 0.7, 0.002, 80.0


def test_the_boundary_condition_holds_exactly():
    obj = objectives.Consistency()
    net = lambda x, t: jnp.sin(3.0 * x) + 0.01 * t[:, None, None, None]
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1)) * 3.0
    f = obj.function(net)
    np.testing.assert_array_equal(np.asarray(f(x, jnp.full((4,), SMIN))), np.asarray(x))
    assert not np.allclose(np.asarray(f(x, jnp.full((4,), 1.0))), np.asarray(x))


@pytest.mark.parametrize("total", [3000, 100_000])
def test_the_curriculum_is_ict_s(total):
    k_prime = math.floor(total / (math.log2(1280 / 10) + 1))
    for k in (0, k_prime - 1, k_prime, 3 * k_prime + 5, 7 * k_prime, 9 * k_prime, total - 1):
        want = min(10 * 2 ** (k // k_prime), 1280) + 1
        assert int(ct.num_scales(k, total)) == want, k
        assert int(objectives.Consistency(curriculum_steps=total).at_step(jnp.int32(k)).num_scales()) == want


def _grid64(n):
    i = np.arange(n)
    lo, hi = SMIN ** (1 / 7), SMAX ** (1 / 7)
    return (lo + i / (n - 1) * (hi - lo)) ** 7


def test_levels_follow_the_log_normal_weights():
    n = 21
    sig = _grid64(n)
    np.testing.assert_allclose(np.asarray(ct.karras_grid(jnp.arange(n), n)), sig, rtol=2e-5)
    w = scipy.special.erf((np.log(sig[1:]) + 1.1) / (math.sqrt(2) * 2.0)) - scipy.special.erf(
        (np.log(sig[:-1]) + 1.1) / (math.sqrt(2) * 2.0))
    probs = np.asarray(ct.level_probs(n, 1281))
    np.testing.assert_allclose(probs[: n - 1], w / w.sum(), rtol=1e-4, atol=1e-7)
    assert np.all(probs[n - 1:] == 0)
    # the objective's draws at the step where N = 21 (k' = 375 for 3,000 steps)
    obj = objectives.Consistency(curriculum_steps=3000).at_step(jnp.int32(400))
    levels = np.asarray(jax.vmap(obj.noise_level)(jax.random.split(jax.random.key(1), 20000)), np.float64)
    idx = np.searchsorted(sig, levels[:, 0] * (1 - 1e-5))
    np.testing.assert_allclose(levels[:, 1], sig[idx + 1], rtol=1e-4)  # adjacent grid points
    counts = np.bincount(idx, minlength=n - 1)
    expected = w / w.sum() * len(idx)
    keep = expected > 5
    assert scipy.stats.chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue > 1e-3


def f_exact(x, sigma):
    return x * (math.sqrt(S**2 + SMIN**2) / jnp.sqrt(S**2 + sigma**2))[:, None]


def test_pseudo_huber_loss_matches_the_formula():
    k = jax.random.split(jax.random.key(2), 3)
    x0, z = jax.random.normal(k[0], (6, 3)), jax.random.normal(k[1], (6, 3))
    sigma, nxt = jnp.linspace(0.1, 2.0, 6), jnp.linspace(0.2, 2.5, 6)
    f = lambda x, s: x * 0.9 + 0.1 * s[:, None]
    loss, _ = ct.ct_loss(f, x0, sigma=sigma, sigma_next=nxt, noise=z)
    x0, z, sg, nx = (np.asarray(a, np.float64) for a in (x0, z, sigma, nxt))
    pred = (x0 + nx[:, None] * z) * 0.9 + 0.1 * nx[:, None]
    tgt = (x0 + sg[:, None] * z) * 0.9 + 0.1 * sg[:, None]
    c = 0.00054 * math.sqrt(3)
    want = np.mean((np.sqrt(np.sum((pred - tgt) ** 2, -1) + c**2) - c) / (nx - sg))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_the_exact_consistency_function_minimises_the_ct_loss():
    n, b = 1281, 40000
    keys = jax.random.split(jax.random.key(3), b)
    grid = jnp.asarray(_grid64(n), jnp.float32)
    i = jax.vmap(lambda k: jax.random.randint(k, (), 0, n - 1))(keys)
    sigma, nxt = grid[i], grid[i + 1]
    x0 = S * jax.random.normal(jax.random.key(4), (b, 2))
    z = jax.random.normal(jax.random.key(5), (b, 2))

    def per_example(eps):
        f = lambda x, s: f_exact(x, s) * (1.0 + eps * ((s - SMIN) / s)[:, None])
        c = 0.00054 * math.sqrt(2)
        pred, tgt = f(x0 + nxt[:, None] * z, nxt), f(x0 + sigma[:, None] * z, sigma)
        return np.asarray((ct.pseudo_huber(pred, tgt, c)) / (nxt - sigma), np.float64)

    base = per_example(0.0)
    for eps in (-0.1, 0.1):
        diff = per_example(eps) - base
        assert diff.mean() > 5 * diff.std() / math.sqrt(b), eps


@pytest.mark.parametrize("num_steps", [1, 2])
def test_multistep_sampling_of_the_exact_function_gives_the_data_law(num_steps):
    den = Denoiser(fn=f_exact, sigma_min=SMIN, consistency=True)
    x, info = samplers.sample_denoiser(den, jax.random.key(6), (5000, 2), sampler="consistency", num_steps=num_steps)
    assert int(info["nfe"]) == num_steps
    for d in range(2):
        assert scipy.stats.kstest(np.asarray(x)[:, d], "norm", args=(0.0, S)).pvalue > 1e-3
    assert den.views == ("consistency",)
    with pytest.raises(ValueError, match="does not sample consistency models"):
        objectives.Consistency().check_sampler("heun")


def test_config_errors_name_the_consistency_field():
    from training_utils import tiny_config

    config = tiny_config()
    config.diffusion.objective = "consistency"
    config.diffusion.consistency.s0 = 1
    with pytest.raises(ValueError, match=r"config.diffusion.consistency.s0=1"):
        objectives.from_config(config.diffusion)

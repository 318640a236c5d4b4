"""Power-function EMA and post-hoc reconstruction against float64 NumPy formulas from EDM2.

References written here from Karras et al. 2024 ("Analyzing and Improving the Training Dynamics
of Diffusion Models"): the profile ``p_t(tau) = (g + 1) tau^g / t^(g + 1)`` (eq. 2), its relative
standard deviation (eq. 123, inverted by root bracketing rather than the cubic), and the weights
the discrete update gives each step, ``(tau^(g+1) - (tau - 1)^(g+1)) / t^(g+1)``.

Tracking one-hot "parameters" ``theta_tau = e_tau`` makes the tracked EMA equal to its weight
vector over the steps, so a reconstructed EMA can be compared with a profile directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize

from jaxdiff import posthoc_ema as pe


def ref_sigma_rel(g):
    """EDM2 eq. 123: the standard deviation of ``p_t`` divided by ``t``."""
    return np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def ref_gamma(sigma_rel):
    """Inverse of :func:`ref_sigma_rel` on ``gamma >= 0`` by bracketing (independent of the cubic)."""
    return optimize.brentq(lambda g: ref_sigma_rel(g) - sigma_rel, 0.0, 1e4, xtol=1e-13, rtol=1e-14)


def ref_weights(gamma, t):
    """``[t]`` float64 weights of steps ``tau = 1..t`` in the EMA after step ``t`` (eq. 127 unrolled)."""
    tau = np.arange(1, t + 1, dtype=np.float64)
    return (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / float(t) ** (gamma + 1)


def test_sigma_rel_gamma_conversion():
    """The cubic's root equals bracketing to 1e-9; EDM2's quoted pairs (0.05 -> 16.97, 0.10 -> 6.94)."""
    srs = np.array([0.01, 0.05, 0.075, 0.10, 0.2, 0.28])
    gammas = pe.sigma_rel_to_gamma(srs)
    np.testing.assert_allclose(gammas, [ref_gamma(s) for s in srs], rtol=1e-9)
    np.testing.assert_allclose(pe.gamma_to_sigma_rel(gammas), srs, rtol=1e-12)
    np.testing.assert_allclose(pe.sigma_rel_to_gamma([0.05, 0.10]), [16.97, 6.94], atol=0.005)
    assert pe.sigma_rel_to_gamma(1.0 / np.sqrt(12.0)) == pytest.approx(0.0, abs=1e-9)  # the uniform average
    for bad in (0.0, -0.1, 0.5, float("nan")):
        with pytest.raises(ValueError, match="sigma_rel"):
            pe.sigma_rel_to_gamma(bad)


def test_inner_product_is_the_integral():
    """EDM2 eq. 151 equals numerical quadrature of ``p_a p_b`` (rtol 1e-8), both orders of ``t_a, t_b``."""
    def p(tau, t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    for t_a, g_a, t_b, g_b in [(100, 6.94, 250, 16.97), (250, 16.97, 100, 6.94), (80, 3.0, 80, 3.0), (10, 0.0, 7, 2.5)]:
        def integrand(x, a=(t_a, g_a), b=(t_b, g_b)):
            return p(x, *a) * p(x, *b)

        num, _ = integrate.quad(integrand, 0, min(t_a, t_b), epsabs=0, epsrel=1e-12)
        assert pe.profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(num, rel=1e-8)


def _track(params_seq, sigma_rels):
    """Runs :func:`update` over ``params_seq`` (leaves ``[T, ...]``); returns every state (leaves ``[T, K, ...]``)."""
    first = jax.tree_util.tree_map(lambda leaf: leaf[0], params_seq)
    state = pe.init(first, sigma_rels)

    @jax.jit
    def run(state, seq):
        def body(s, inp):
            step, params = inp
            s = pe.update(s, params, step)
            return s, s

        n = jax.tree_util.tree_leaves(seq)[0].shape[0]
        return jax.lax.scan(body, state, (jnp.arange(1, n + 1), seq))[1]

    return run(state, params_seq)


def test_update_gives_the_power_profile_weights():
    """After ``t`` steps each tracked EMA is ``sum_tau w_tau theta_tau`` with the profile's weights (rtol 1e-5)."""
    rng = np.random.default_rng(0)
    T = 60
    seq = {"w": rng.normal(size=(T, 3, 2)).astype(np.float32), "b": rng.normal(size=(T, 4)).astype(np.float32)}
    srs = (0.05, 0.10, 0.2)
    states = _track(jax.tree_util.tree_map(jnp.asarray, seq), srs)
    for k, sr in enumerate(srs):
        for t in (1, 2, 17, T):
            w = ref_weights(ref_gamma(sr), t)
            for name in seq:
                ref = np.tensordot(w, seq[name][:t].astype(np.float64), axes=1)
                np.testing.assert_allclose(np.asarray(states.ema[name][t - 1, k]), ref, rtol=1e-5, atol=1e-5)


def test_update_weight_is_accurate_late_in_training():
    """``beta_t`` against float64 (rtol 1e-5 on ``1 - beta``), ``beta_1 = 0``, and single updates at t = 1e6
    and 2e9, where ``1 - beta_t ~ 1e-5 .. 1e-8`` would lose its digits if formed as ``1 - beta`` in float32."""
    steps = np.array([1, 2, 10, 1e3, 1e6, 2e9])
    for sr in (0.05, 0.10):
        g = ref_gamma(sr)
        ref = 1.0 - (1.0 - 1.0 / steps) ** (g + 1)
        ref[3:] = -np.expm1((g + 1) * np.log1p(-1.0 / steps[3:]))  # the same, without float64 cancellation
        got = 1.0 - np.asarray(pe.power_beta(jnp.float32(g), jnp.asarray(steps, jnp.float32)), np.float64)
        np.testing.assert_allclose(got[:4], ref[:4], rtol=1e-5)
        state = pe.init({"w": jnp.zeros(3)}, (sr,))
        for t, r in ((1_000_000, ref[4]), (2_000_000_000, ref[5])):
            new = pe.update(state, {"w": jnp.ones(3)}, t)
            np.testing.assert_allclose(np.asarray(new.ema["w"][0]), r, rtol=1e-5)
    assert float(pe.power_beta(5.0, 1)) == 0.0


# --------------------------------------------------------------------------- reconstruction

T_RUN, EVERY = 1024, 128  # 8 snapshots of the two EDM2 profiles


@pytest.fixture(scope="module")
def one_hot_run():
    """EMAs of ``theta_tau = e_tau`` for sigma_rel 0.05 and 0.10: snapshot ``i`` is a pair of weight vectors."""
    states = _track({"w": jnp.eye(T_RUN, dtype=jnp.float32)}, (0.05, 0.10))
    steps = list(range(EVERY, T_RUN + 1, EVERY))
    snaps = [pe.PowerEMAState(gammas=states.gammas[s - 1], ema={"w": states.ema["w"][s - 1]}) for s in steps]
    return snaps, steps


def test_reconstructs_a_tracked_profile(one_hot_run):
    """The target is one of the inputs: its coefficient is 1 (others < 1e-6) and the snapshot comes back (atol 1e-6)."""
    snaps, steps = one_hot_run
    gammas = np.asarray(snaps[0].gammas, np.float64)
    coef = pe.solve_posthoc_coefficients(np.repeat(steps, 2), np.tile(gammas, len(steps)), steps[3], gammas[1])
    expected = np.zeros(2 * len(steps))
    expected[2 * 3 + 1] = 1.0
    np.testing.assert_allclose(coef[:, 0], expected, atol=1e-6)
    rec = pe.reconstruct(snaps, steps, 0.05)  # last snapshot, sigma_rel 0.05
    np.testing.assert_allclose(np.asarray(rec["w"]), np.asarray(snaps[-1].ema["w"][0]), atol=1e-6)


@pytest.mark.parametrize("sigma_rel,tol", [(0.075, 0.02), (0.12, 0.02), (0.15, 0.05)])
def test_reconstructs_an_untracked_profile(one_hot_run, sigma_rel, tol):
    """A profile that was not tracked (exact weights from eq. 127 unrolled) is reconstructed at the last
    snapshot to a relative L2 error ``tol`` over the step weights (measured: 0.075 -> 0.0125, 0.12 -> 0.0129,
    0.15, wider than both tracked profiles -> 0.033), against 0.18-1.3 for the nearest tracked profile;
    the weights sum to 1 (1e-5)."""
    snaps, steps = one_hot_run
    rec = np.asarray(pe.reconstruct(snaps, steps, sigma_rel)["w"], np.float64)
    target = ref_weights(ref_gamma(sigma_rel), T_RUN)
    rel = np.linalg.norm(rec - target) / np.linalg.norm(target)
    assert rel < tol, rel
    assert rec.sum() == pytest.approx(1.0, abs=1e-5)
    for k in (0, 1):  # either tracked profile is much further away
        assert np.linalg.norm(np.asarray(snaps[-1].ema["w"][k], np.float64) - target) / np.linalg.norm(target) > 5 * rel


def test_reconstruction_is_linear_in_the_snapshots():
    """``reconstruct(a S + b S') = a reconstruct(S) + b reconstruct(S')`` (1e-4); a constant trajectory comes back."""
    rng = np.random.default_rng(1)
    T = 96
    walks = [{"w": jnp.asarray(np.cumsum(rng.normal(size=(T, 5)), 0), jnp.float32)} for _ in range(2)]
    steps = [32, 64, 96]
    runs = [_track(w, (0.05, 0.10)) for w in walks]

    def snaps(states, scale=1.0):
        return [pe.PowerEMAState(gammas=states.gammas[s - 1], ema={"w": scale * states.ema["w"][s - 1]}) for s in steps]

    a, b = 0.7, -1.3
    mixed = [pe.PowerEMAState(gammas=s1.gammas, ema={"w": s1.ema["w"] + s2.ema["w"]})
             for s1, s2 in zip(snaps(runs[0], a), snaps(runs[1], b), strict=True)]
    lhs = pe.reconstruct(mixed, steps, 0.08)["w"]
    rhs = a * pe.reconstruct(snaps(runs[0]), steps, 0.08)["w"] + b * pe.reconstruct(snaps(runs[1]), steps, 0.08)["w"]
    np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), rtol=1e-4, atol=1e-4)
    const = _track({"w": jnp.full((T, 5), 2.5, jnp.float32)}, (0.05, 0.10))
    np.testing.assert_allclose(np.asarray(pe.reconstruct(snaps(const), steps, 0.08)["w"]), 2.5, rtol=1e-4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="in_steps"):
        pe.solve_posthoc_coefficients([0, 10], 5.0, 10, 5.0)
    with pytest.raises(ValueError, match="linearly dependent"):
        pe.solve_posthoc_coefficients([10, 10], [5.0, 5.0], 10, 5.0)
    with pytest.raises(ValueError, match="leading axis"):
        pe.combine({"w": jnp.ones((3, 2))}, [0.5, 0.5])
    with pytest.raises(ValueError, match="one step per snapshot"):
        pe.reconstruct([], [], 0.1)

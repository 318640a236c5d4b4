"""Tests for jaxdiff.schedules: every field against float64 references written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import schedules as S

import reference as ref

FIELDS = [
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "log_snr",
]

# Fields are computed in float64 and rounded once to float32, so a relative error of a few
# float32 ulps (6e-8 each) is all that may separate them from the float64 reference.
RTOL = 5e-7


def _assert_fields(sched, expected, T):
    assert sched.num_timesteps == T
    for name in FIELDS:
        got = getattr(sched, name)
        assert got.shape == (T,) and got.dtype == jnp.float32, name
        want = expected[name]
        if want is None:
            continue
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=RTOL, atol=0, err_msg=name)


# ------------------------------------------------------------------------------ constructors


@pytest.mark.parametrize("T", [1000, 10, 2])
def test_linear_schedule_fields(T):
    sched = S.linear_schedule(T)
    betas = ref.linear_betas(T)
    _assert_fields(sched, ref.schedule_fields(betas), T)
    assert sched.kind == "vp"
    np.testing.assert_allclose(np.asarray(sched.betas)[[0, -1]], [1e-4, 0.02] if T > 1 else [1e-4], rtol=1e-6)


def test_linear_schedule_custom_range():
    sched = S.linear_schedule(7, beta_start=0.01, beta_end=0.3)
    _assert_fields(sched, ref.schedule_fields(ref.linear_betas(7, 0.01, 0.3)), 7)


@pytest.mark.parametrize("T", [1000, 10, 2])
def test_cosine_schedule_fields(T):
    sched = S.cosine_schedule(T)
    betas = ref.cosine_betas(T)
    _assert_fields(sched, ref.schedule_fields(betas), T)
    # Away from the clipped last step, abar follows eq. 17 itself (not only the betas).
    np.testing.assert_allclose(sched.alphas_cumprod[: T - 1], ref.cosine_abar(np.arange(1, T), T),
                               rtol=2e-6)
    # The last beta is clipped at max_beta (eq. 17's abar(T) is 0).
    assert float(sched.betas[-1]) == pytest.approx(0.999, rel=1e-6)


def test_cosine_schedule_max_beta():
    sched = S.cosine_schedule(50, max_beta=0.5)
    betas = ref.cosine_betas(50, max_beta=0.5)
    assert np.sum(betas == 0.5) >= 2  # the clip is active on several steps
    _assert_fields(sched, ref.schedule_fields(betas), 50)


@pytest.mark.parametrize("T", [1000, 10, 2])
def test_sigmoid_schedule_fields(T):
    sched = S.sigmoid_schedule(T)
    _assert_fields(sched, ref.schedule_fields(ref.sigmoid_betas(T)), T)


def test_sigmoid_schedule_parameters():
    kwargs = dict(start=0.0, end=3.0, tau=0.7)
    sched = S.sigmoid_schedule(100, **kwargs)
    _assert_fields(sched, ref.schedule_fields(ref.sigmoid_betas(100, **kwargs)), 100)
    # abar is Jabri et al.'s gamma at t / T (steps 1..T-1; the last step hits clip_min).
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], ref.sigmoid_gamma(np.arange(1, 100) / 100, **kwargs),
                               rtol=1e-5)


@pytest.mark.parametrize("T", [1000, 10, 2])
@pytest.mark.parametrize("sigma_q", [1.0, 50.0])
def test_ve_schedule_fields(T, sigma_q):
    sched = S.ve_schedule(T, sigma_q=sigma_q)
    assert sched.kind == "ve"
    sigma2 = ref.ve_sigma2(T, sigma_q)
    # The equivalent VP process: abar_t = 1 / (1 + sigma_t^2), straight from the VE variances.
    abar = 1.0 / (1.0 + sigma2)
    fields = ref.schedule_fields(1.0 - abar / np.append(1.0, abar[:-1]))
    np.testing.assert_allclose(fields["alphas_cumprod"], abar, rtol=1e-12)
    _assert_fields(sched, fields, T)
    np.testing.assert_allclose(sched.sigmas, np.sqrt(sigma2), rtol=RTOL)
    # Terminal variance sigma_q^2 whatever T is.
    assert float(sched.sigmas[-1]) ** 2 == pytest.approx(sigma_q**2, rel=1e-6)


@pytest.mark.parametrize("make, betas", [
    (S.linear_schedule, ref.linear_betas(1)),
    (S.cosine_schedule, ref.cosine_betas(1)),
    (S.sigmoid_schedule, ref.sigmoid_betas(1)),
    (S.ve_schedule, ref.ve_betas(1, 1.0)),
])
def test_single_step_schedule(make, betas):
    """T = 1: no previous step; the clipped posterior log-variance falls back to log(beta_0), finite."""
    sched = make(1)
    _assert_fields(sched, ref.schedule_fields(betas), 1)
    assert float(sched.posterior_variance[0]) == 0.0
    np.testing.assert_allclose(sched.posterior_log_variance_clipped, np.log(betas), rtol=1e-6)


def test_schedule_from_betas_and_invariants():
    rng = np.random.default_rng(0)
    betas = np.sort(rng.uniform(1e-5, 0.5, size=37))
    sched = S.schedule_from_betas(betas)
    _assert_fields(sched, ref.schedule_fields(betas), 37)
    for make in (S.linear_schedule, S.cosine_schedule, S.sigmoid_schedule, S.ve_schedule):
        abar = np.asarray(make(200).alphas_cumprod, np.float64)
        assert np.all(np.diff(abar) < 0) and np.all((abar > 0) & (abar < 1))
        np.testing.assert_allclose(make(200).posterior_variance[0], 0.0)


# ------------------------------------------------------------------------------ pytree


def test_schedule_is_a_pytree_with_static_kind():
    sched = S.linear_schedule(10)
    leaves, treedef = jax.tree.flatten(sched)
    assert len(leaves) == len(FIELDS)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.kind == "vp"
    traces = []

    @jax.jit
    def total(s):
        traces.append(s.kind)
        return jnp.sum(s.alphas_cumprod)

    total(S.linear_schedule(10))
    total(S.cosine_schedule(10))  # same shapes and kind: no retrace
    assert traces == ["vp"]
    total(S.ve_schedule(10))  # kind is static metadata: a new trace
    assert traces == ["vp", "ve"]
    np.testing.assert_allclose(total(S.cosine_schedule(10)), np.sum(ref.schedule_fields(ref.cosine_betas(10))
                                                                   ["alphas_cumprod"]), rtol=1e-6)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, np.nan, np.inf])
def test_betas_outside_open_unit_interval(bad):
    betas = np.full(5, 0.01)
    betas[2] = bad
    with pytest.raises(ValueError, match="betas"):
        S.schedule_from_betas(betas)


def test_betas_error_messages():
    with pytest.raises(ValueError, match=r"open interval \(0, 1\).*0\.0"):
        S.schedule_from_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match=r"betas must be finite"):
        S.schedule_from_betas([0.1, np.nan])
    with pytest.raises(ValueError, match=r"betas.*1-D.*\(2, 2\)"):
        S.schedule_from_betas(np.full((2, 2), 0.1))
    with pytest.raises(ValueError, match=r"betas.*non-empty.*\(0,\)"):
        S.schedule_from_betas(np.zeros((0,)))
    with pytest.raises(ValueError, match="kind"):
        S.schedule_from_betas([0.1], kind="sub-vp")


@pytest.mark.parametrize("make", [S.linear_schedule, S.cosine_schedule, S.sigmoid_schedule, S.ve_schedule])
@pytest.mark.parametrize("T", [0, -3, 10.0, "10"])
def test_bad_num_timesteps(make, T):
    with pytest.raises(ValueError, match="num_timesteps"):
        make(T)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_beta"):
        S.cosine_schedule(10, max_beta=1.0)
    with pytest.raises(ValueError, match="start"):
        S.sigmoid_schedule(10, start=3.0, end=3.0)
    with pytest.raises(ValueError, match="tau"):
        S.sigmoid_schedule(10, tau=0.0)
    with pytest.raises(ValueError, match="sigma_q"):
        S.ve_schedule(10, sigma_q=0.0)
    with pytest.raises(ValueError, match="betas"):  # linear betas above 1
        S.linear_schedule(10, beta_start=0.5, beta_end=1.2)

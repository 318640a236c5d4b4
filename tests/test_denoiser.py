"""Samplers over one denoiser: every objective's Denoiser through the one Euler / Heun, and the NFE.

References: the network calls counted with ``jax.debug.callback`` (against the registry's NFE
rule, for every objective and every fixed-step sampler it serves); the probability-flow ODE of
Gaussian data ``x0 ~ N(0, s^2 I)``, whose solution is the linear map
``x(sigma) = x(sigma_max) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2)`` (float64 NumPy), reached by
the exact denoiser, the exact flow velocity and the exact epsilon network alike.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import objectives, samplers, schedules
from jaxdiff.denoiser import Denoiser, eps_denoiser, velocity_denoiser
from jaxdiff.samplers import registry

T = 40
OBJECTIVES = {
    "diffusion": objectives.Diffusion(schedule=schedules.linear_schedule(T)),
    "flow_matching": objectives.FlowMatching(),
    "edm": objectives.EDM(),
    "meanflow": objectives.MeanFlow(),
    "consistency": objectives.Consistency(),
}
CASES = [(o, s) for o, obj in OBJECTIVES.items() for s in obj.sampler_names()]


@pytest.mark.parametrize("objective, sampler", CASES)
def test_the_registry_s_nfe_is_the_network_calls_for_every_objective(objective, sampler):
    obj, calls, n = OBJECTIVES[objective], [], 3

    def net(x, time):
        jax.debug.callback(lambda: calls.append(1))
        return 0.1 * x

    spec = obj.check_sampler(sampler)
    x, info = samplers.sample_denoiser(obj.denoiser(net), jax.random.key(0), (4, 2), sampler=sampler,
                                       num_steps=None if spec.adaptive else n)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert len(calls) == int(info["nfe"]) > 0
    if not spec.adaptive:
        assert len(calls) == registry.nfe(sampler, n)
    assert np.all(np.isfinite(np.asarray(x)))


def test_objectives_without_a_schedule_are_offered_the_karras_samplers_only():
    karras = {"euler", "heun", "euler_ancestral", "edm"}
    assert set(OBJECTIVES["flow_matching"].sampler_names()) == set(OBJECTIVES["edm"].sampler_names()) == karras
    assert set(OBJECTIVES["meanflow"].sampler_names()) == karras | {"meanflow"}
    assert set(OBJECTIVES["diffusion"].sampler_names()) == set(registry.SAMPLERS) - {"meanflow", "consistency"}
    assert OBJECTIVES["consistency"].sampler_names() == ("consistency",)
    with pytest.raises(ValueError, match=r"config.sample.sampler 'ddim' does not sample flow_matching models"):
        OBJECTIVES["flow_matching"].check_sampler("ddim", prefix="config.sample.")


S = 0.6  # the data's standard deviation


def _exact(u, smax, prior_data_var):
    """float64 endpoint of the PF-ODE of N(0, S^2) data from sqrt(prior_data_var + smax^2) u at smax."""
    return np.asarray(u, np.float64) * np.sqrt(prior_data_var + smax**2) * S / np.sqrt(S**2 + smax**2)


def _gaussian_denoisers():
    edm = Denoiser(lambda x, sigma: x * (S**2 / (S**2 + sigma[:, None] ** 2)))

    def velocity(x_t, t):  # E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps
        t = t[:, None]
        return x_t * (t - (1 - t) * S**2) / ((1 - t) ** 2 * S**2 + t**2)

    lin = schedules.linear_schedule(1000)

    def eps_net(x_t, t):  # E[eps | x_t] on the VP schedule at fractional t, x_t = a x0 + s eps
        from jaxdiff import diffusion

        a, s = diffusion.alpha_sigma(lin, t)
        a, s = a[:, None], s[:, None]
        return x_t * s / (a**2 * S**2 + s**2)

    return {"edm": (edm, 0.0), "flow": (velocity_denoiser(velocity), 0.0), "eps": (eps_denoiser(lin, eps_net), 1.0)}


@pytest.mark.parametrize("kind", ["edm", "flow", "eps"])
def test_one_heun_solves_the_gaussian_ode_for_every_adapter(kind):
    den, prior = _gaussian_denoisers()[kind]
    u = jax.random.normal(jax.random.key(3), (256, 2))
    exact = _exact(u, 80.0, prior)
    run = jax.jit(lambda u, n: samplers.heun(den, u, num_steps=n)[0])
    err = {n: np.max(np.abs(np.asarray(run(u, n), np.float64) - exact)) for n in (16, 32, 64)}
    assert err[64] < 0.015 * S
    assert 3.0 < err[16] / err[32] < 5.5 and 3.0 < err[32] / err[64] < 5.5  # second order: 4x per doubling
    euler = {n: np.max(np.abs(np.asarray(samplers.euler(den, u, num_steps=n)[0], np.float64) - exact))
             for n in (32, 64)}
    assert 1.6 < euler[32] / euler[64] < 2.5 and euler[64] > err[64]  # first order: 2x
    assert run._cache_size() == 1  # one program for every step count


def test_a_learned_variance_model_samples_with_a_fixed_variance_too():
    """ddpm with variance="fixed_small" on a 2C-channel model uses the mean channels: the same samples
    as the C-channel model alone."""
    lin = schedules.linear_schedule(T)

    def mean(x, t):
        return 0.3 * x

    def both(x, t):
        return jnp.concatenate([mean(x, t), jnp.full_like(x, 7.0)], axis=-1)

    key, shape = jax.random.key(4), (3, 4, 4, 1)
    got, _ = samplers.sample_denoiser(eps_denoiser(lin, both, learned_variance=True), key, shape, sampler="ddpm",
                                      num_steps=5, variance="fixed_small")
    want, _ = samplers.sample_denoiser(eps_denoiser(lin, mean), key, shape, sampler="ddpm", num_steps=5,
                                       variance="fixed_small")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

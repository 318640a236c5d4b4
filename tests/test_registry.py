"""The sampler registry: the one place that knows each sampler's options, steps, NFE and model contract.

The expectations are written here from the samplers' papers and the library's documented
conventions (not read from the registry), and checked against what the samplers actually do.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxdiff.oracle import default_mixture
from jaxdiff.samplers import SAMPLERS, registry, sample, sample_with_info
from jaxdiff.schedules import linear_schedule

T = 40
LIN = linear_schedule(T)
MIX = default_mixture(2)

# name -> (options it takes, default num_steps on a T=40 schedule, NFE for n=6, needs a discrete schedule)
CHURN = {"s_churn", "s_tmin", "s_tmax", "s_noise"}
GRID = {"rho", "sigma_min", "sigma_max"}
EXPECTED = {
    "ddpm": ({"variance"}, T, 6, True),
    "ddim": ({"eta"}, min(50, T), 6, True),
    "dpm_solver++": ({"order", "spacing", "lower_order_final", "denoise_final", "sigma_max"}, 20, 6, True),
    "dpm++2m": ({"spacing", "lower_order_final", "denoise_final", "sigma_max"}, 20, 6, True),
    "euler": (GRID, 50, 6, False),
    "heun": (GRID | CHURN, 25, 11, False),
    "euler_ancestral": ({"eta"} | GRID, 50, 6, False),
    "pc": ({"num_corrector_steps", "snr", "variance"}, T, 12, True),
    "ode": ({"rtol", "atol", "solver", "max_steps"}, None, None, True),
    "edm": (GRID | CHURN, 18, 11, False),
    "meanflow": (set(), 1, 6, False),
    "consistency": ({"sigma_min", "sigma_max", "rho"}, 1, 6, False),
}


def test_registry_lists_every_sampler_with_its_options_steps_and_contract():
    assert set(SAMPLERS) == set(EXPECTED)
    for name, (options, steps, nfe6, discrete) in EXPECTED.items():
        spec = SAMPLERS[name]
        assert set(spec.options) == options, name
        assert registry.default_num_steps(name, T) == steps, name
        assert spec.discrete == discrete, name
        if nfe6 is None:
            assert spec.adaptive
            with pytest.raises(ValueError, match="adaptive"):
                registry.nfe(name, 6)
        else:
            assert registry.nfe(name, 6) == nfe6, name
    assert set(registry.names(("denoiser",))) == {"euler", "heun", "euler_ancestral", "edm"}
    assert set(registry.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", ["ddim", "heun", "pc", "dpm_solver++"])
def test_default_steps_and_nfe_are_what_the_sampler_runs(name):
    """The registry's default step count and NFE rule agree with the network calls the chain makes."""
    calls = []

    def model(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return MIX.model_fn(LIN)(x, t)

    x, info = sample_with_info(LIN, model, jax.random.key(0), (8, 2), sampler=name)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert int(info["nfe"]) == len(calls) == registry.nfe(name, registry.default_num_steps(name, T))
    assert np.all(np.isfinite(np.asarray(x)))


def test_check_names_the_argument_before_any_work():
    with pytest.raises(ValueError, match=r"--sampler must be one of .*'nope'"):
        registry.check("nope", prefix="--")
    with pytest.raises(ValueError, match=r"does not sample flow_matching models .*; use one of \('euler', 'heun', "):
        registry.check("ddim", views=("denoiser",), model="flow_matching")
    with pytest.raises(ValueError, match=r"does not take --eta"):
        registry.check("heun", options={"eta": 0.5}, prefix="--")
    with pytest.raises(ValueError, match=r"does not take --eta.*--rho"):
        registry.check("heun", views=("denoiser",), options={"eta": 0.0}, prefix="--")
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, T=40\]"):
        registry.check("ddpm", num_steps=41, num_timesteps=T)
    registry.check("heun", num_steps=41, num_timesteps=T)  # the Karras grid is not bounded by T
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1"):
        registry.check("euler", num_steps=0)
    with pytest.raises(ValueError, match=r"adaptive and takes no num_steps"):
        registry.check("ode", num_steps=10)
    with pytest.raises(ValueError, match=r"does not take variance"):
        sample(LIN, MIX.model_fn(LIN), jax.random.key(0), (4, 2), sampler="ddim", variance="fixed_large")


def test_eta_reaches_every_sampler_that_declares_it():
    """A sampler that takes eta gets it through sample(): eta changes a stochastic sampler's output."""
    model = MIX.model_fn(LIN)
    for name, spec in SAMPLERS.items():
        if "eta" not in spec.options:
            continue
        a = sample(LIN, model, jax.random.key(1), (16, 2), sampler=name, num_steps=5, eta=0.0)
        b = sample(LIN, model, jax.random.key(1), (16, 2), sampler=name, num_steps=5, eta=1.0)
        assert not np.allclose(np.asarray(a), np.asarray(b)), name

"""Bad input, everywhere: each mistake gives an error naming the argument before any work is done,
or, for traced values that cannot be checked, the documented visible result (NaN, NFE 0).

The table ``CASES`` holds the API cases (a call and the words its message must contain); the
tests after it check the rules for traced values against float64 NumPy formulas and the
scripts' messages through subprocesses on a tiny trained workdir.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import diffusion as d
from jaxdiff import edm, flow, guidance, likelihood, losses, objectives, samplers
from jaxdiff.denoiser import Denoiser, eps_denoiser
from jaxdiff.metrics import digits, fid, inception_input
from jaxdiff.models import UNet
from jaxdiff.samplers import registry
from jaxdiff.schedules import linear_schedule
from jaxdiff.training import checkpoint, sampling, setup
from jaxdiff.training.evaluate import check_eval_output, write_eval
from jaxdiff.training.generate import generate, sample_workdir

from training_utils import subprocess_env, tiny_config

T = 10
SCHED = linear_schedule(T, 1e-3, 0.2)
KEY = jax.random.key(0)
X = jnp.linspace(-1.0, 1.0, 2 * 4 * 4 * 1).reshape(2, 4, 4, 1)
NOISE = jnp.cos(jnp.arange(X.size, dtype=jnp.float32)).reshape(X.shape)
T_OK = jnp.array([0, T - 1])


def eps_model(x, t):
    return 0.1 * x


def cond_model(x, t, y):
    return 0.1 * x + 0.01 * y.astype(jnp.float32).reshape(-1, 1, 1, 1)


NUM_CLASSES = 3
NET = UNet(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_classes=NUM_CLASSES)
UNCOND_NET = NET.clone(num_classes=None)


@functools.cache
def net_params():
    """Random (not zero-output) parameters of the tiny conditional UNet."""
    shapes = jax.eval_shape(NET.init, KEY, jnp.zeros((1, 4, 4, 1)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1,), jnp.int32))["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    flat = 0.2 * np.random.default_rng(1).standard_normal(sum(a.size for a in leaves)).astype(np.float32)
    parts = np.split(flat, np.cumsum([a.size for a in leaves])[:-1])
    return jax.tree_util.tree_unflatten(tree, [p.reshape(a.shape) for p, a in zip(parts, leaves)])


def _generate(apply_fn, labels, **kw):
    kw = {"sampler": "ddim", "num_steps": 1, "num_classes": NUM_CLASSES, **kw}
    return generate(objectives.Diffusion(schedule=SCHED), apply_fn, None, KEY, jnp.asarray(labels), (8, 8, 1), **kw)


def _cfg(labels, batch=2, **kw):
    fn = guidance.classifier_free_guidance(cond_model, labels, NUM_CLASSES, 2.0, **kw)
    return fn(X[:batch] if batch <= 2 else jnp.concatenate([X] * 2)[:batch], jnp.zeros((batch,), jnp.int32))


PIXELS = (X + 1.0) * 127.5  # float images in [0, 255]: the pixels of image files, not data in [-1, 1]


def _edm_loss(x0):
    return edm.edm_loss(lambda x, sigma: x, x0, KEY)


def _digits_features(images):
    return digits.load_digits_features()(images)


def _config(**sample):
    config = tiny_config()
    for k, v in sample.items():
        config.sample[k] = v
    return config


# (id, call, exception type, words the message must contain)
CASES = [
    # traced-or-concrete step counts: concrete ones are checked up front
    ("sample num_steps=0", lambda: samplers.sample(SCHED, eps_model, KEY, X.shape, sampler="euler", num_steps=0),
     ValueError, ["num_steps", "0"]),
    ("ddim_loop num_steps=jnp 0", lambda: samplers.ddim_loop(SCHED, eps_model, X, KEY, num_steps=jnp.int32(0)),
     ValueError, ["num_steps", "0"]),
    ("heun num_steps=np -2", lambda: samplers.heun(eps_denoiser(SCHED, eps_model), X, num_steps=np.int64(-2)),
     ValueError, ["num_steps", "-2"]),
    ("flow.sample num_steps=0", lambda: flow.sample(eps_model, KEY, X.shape, num_steps=0), ValueError, ["num_steps"]),
    # timesteps outside [0, T-1]
    ("q_sample t=T", lambda: d.q_sample(SCHED, X, jnp.array([0, T]), NOISE), ValueError, ["t must lie in", "[0, 9]",
                                                                                           "10"]),
    ("q_sample t=-1", lambda: d.q_sample(SCHED, X, np.array([-1, 3]), NOISE), ValueError, ["t must lie in", "-1"]),
    ("q_posterior t=T+5", lambda: d.q_posterior(SCHED, X, X, jnp.array([T + 5, 0])), ValueError, ["t", "15"]),
    ("q_mean_variance t=-3", lambda: d.q_mean_variance(SCHED, X, jnp.array([-3, 0])), ValueError, ["t", "-3"]),
    ("ddpm_step t=T", lambda: samplers.ddpm_step(SCHED, X, X, jnp.array([T, 1]), KEY), ValueError, ["t", "10"]),
    ("diffusion_loss t=T", lambda: losses.diffusion_loss(SCHED, eps_model, X, KEY, t=jnp.array([T, 0])),
     ValueError, ["t", "10"]),
    # labels
    ("UNet y > num_classes", lambda: NET.apply({"params": {}}, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)),
                                               jnp.array([0, NUM_CLASSES + 1])), ValueError, ["y", "4"]),
    ("UNet y = -1", lambda: NET.apply({"params": {}}, jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,)),
                                      jnp.array([0, -1])), ValueError, ["y", "-1"]),
    ("generate labels >= num_classes", lambda: _generate(NET.apply, [0, NUM_CLASSES]), ValueError,
     ["labels", "[0, 2]", "3"]),
    ("generate labels -1", lambda: _generate(NET.apply, [-1, 0]), ValueError, ["labels", "-1"]),
    ("cfg labels -1", lambda: _cfg(jnp.array([-1, 0])), ValueError, ["labels", "-1"]),
    ("cfg labels of the wrong length", lambda: _cfg(jnp.array([0, 1, 2])), ValueError,
     ["labels has shape (3,)", "x_t has shape (2, 4, 4, 1)"]),
    ("cfg float labels", lambda: _cfg(jnp.array([0.5, 1.0])), ValueError, ["labels", "int"]),
    # conditionality and guidance
    ("generate conditional model, num_classes=None", lambda: _generate(NET.apply, [0, 1], num_classes=None),
     ValueError, ["num_classes=None", "num_classes=3"]),
    ("generate guidance on an unconditional model",
     lambda: _generate(UNCOND_NET.apply, [0, 0], num_classes=None, guidance_scale=3.0), ValueError,
     ["guidance_scale=3.0", "unconditional"]),
    # eta, min_snr_gamma, schedules
    ("ddim_step eta<0", lambda: samplers.ddim_step(SCHED, X, X, T_OK, jnp.array([-1, 5]), KEY, eta=-0.5),
     ValueError, ["eta", "-0.5"]),
    ("ddim_loop eta<0", lambda: samplers.ddim_loop(SCHED, eps_model, X, KEY, num_steps=2, eta=-1.0),
     ValueError, ["eta", "-1.0"]),
    ("sample ddim eta<0", lambda: samplers.sample(SCHED, eps_model, KEY, X.shape, sampler="ddim", eta=-0.1),
     ValueError, ["eta", "-0.1"]),
    ("euler_ancestral eta<0", lambda: samplers.euler_ancestral(eps_denoiser(SCHED, eps_model), X, KEY, num_steps=2,
                                                                        eta=-2.0),
     ValueError, ["eta", "-2.0"]),
    ("generate eta<0", lambda: _generate(NET.apply, [0, 1], eta=-1.0), ValueError, ["eta", "-1.0"]),
    ("loss_weight min_snr_gamma<0", lambda: losses.loss_weight(SCHED, T_OK, prediction="epsilon", weighting="min_snr",
                                                               min_snr_gamma=-1.0), ValueError, ["min_snr_gamma"]),
    ("diffusion_loss min_snr_gamma=0", lambda: losses.diffusion_loss(SCHED, eps_model, X, KEY, weighting="min_snr",
                                                                     min_snr_gamma=0.0),
     ValueError, ["min_snr_gamma", "> 0"]),
    ("linear_schedule decreasing", lambda: linear_schedule(10, 0.02, 1e-4), ValueError, ["beta_end", "beta_start"]),
    # raw tracebacks where a sentence belongs
    ("ode_nll NaN x", lambda: likelihood.ode_nll(SCHED, eps_model, X.at[0, 0, 0, 0].set(jnp.nan), KEY),
     ValueError, ["x must be finite", "1 non-finite"]),
    ("ode_bpd inf x", lambda: likelihood.ode_bpd(SCHED, eps_model, X.at[1].set(jnp.inf), KEY),
     ValueError, ["x must be finite"]),
    ("sample key=0", lambda: samplers.sample(SCHED, eps_model, 0, X.shape), ValueError, ["key", "PRNG key", "int"]),
    ("sample key=[2] keys", lambda: samplers.sample(SCHED, eps_model, jax.random.split(KEY), X.shape), ValueError,
     ["key", "single PRNG key", "(2,)"]),
    ("diffusion_loss key=0", lambda: losses.diffusion_loss(SCHED, eps_model, X, 0), ValueError, ["key"]),
    ("diffusion_loss key float", lambda: losses.diffusion_loss(SCHED, eps_model, X, jnp.zeros(2)), ValueError,
     ["key", "float32"]),
    ("variational_bound key=0", lambda: losses.variational_bound(SCHED, eps_model, X, 0), ValueError, ["key"]),
    ("variational_bound_bpd key=0", lambda: likelihood.variational_bound_bpd(SCHED, eps_model, X, 0), ValueError,
     ["key"]),
    ("flow.sample key=0", lambda: flow.sample(eps_model, 0, X.shape, num_steps=2), ValueError, ["key"]),
    ("flow_matching_loss key=0", lambda: flow.flow_matching_loss(eps_model, X, 0), ValueError, ["key"]),
    ("inpaint key=0", lambda: guidance.inpaint(SCHED, eps_model, X, jnp.ones_like(X), 0), ValueError, ["key"]),
    ("ode_nll key=0", lambda: likelihood.ode_nll(SCHED, eps_model, X, 0), ValueError, ["key"]),
    ("q_sample ragged list x0", lambda: d.q_sample(SCHED, [[1.0, 2.0], [3.0]], T_OK, NOISE), ValueError, ["x0"]),
    ("diffusion_loss int array x0", lambda: losses.diffusion_loss(SCHED, eps_model, np.ones((2, 4), np.int32), KEY),
     ValueError, ["x0", "floating", "int32"]),
    # the sampler's arguments: shape, model_fn, the model's output shape
    ("sample shape=(64,) for 2-D data", lambda: samplers.sample(SCHED, eps_model, KEY, (64,)), ValueError,
     ["shape", "batch axis", "(64,)"]),
    ("sample shape with a 0", lambda: samplers.sample(SCHED, eps_model, KEY, (2, 0)), ValueError,
     ["shape", "positive", "(2, 0)"]),
    ("sample shape an int", lambda: samplers.sample(SCHED, eps_model, KEY, 64, sampler="heun"), ValueError,
     ["shape", "tuple", "64"]),
    ("sample model_fn=None", lambda: samplers.sample(SCHED, None, KEY, X.shape), TypeError,
     ["model_fn", "callable", "NoneType"]),
    ("sample heun model_fn=None", lambda: samplers.sample(SCHED, None, KEY, X.shape, sampler="heun"), TypeError,
     ["model_fn", "callable"]),
    ("sample model output of another shape",
     lambda: samplers.sample(SCHED, lambda x, t: x[..., :1, :], KEY, X.shape, sampler="dpm_solver++"), ValueError,
     ["model_fn returned shape (2, 4, 1, 1)", "(2, 4, 4, 1)"]),
    ("sample_denoiser of a function", lambda: samplers.sample_denoiser(eps_model, KEY, X.shape, sampler="euler"),
     TypeError, ["denoiser", "Denoiser", "function"]),
    ("sample_denoiser shape=(8,)", lambda: samplers.sample_denoiser(Denoiser(lambda x, s: x), KEY, (8,),
                                                                    sampler="euler"), ValueError, ["shape", "(8,)"]),
    ("flow.sample model_fn=None", lambda: flow.sample(None, KEY, X.shape, num_steps=2), TypeError, ["model_fn"]),
    # guidance below 0
    ("cfg guidance_scale<0", lambda: guidance.classifier_free_guidance(cond_model, jnp.array([0, 1]), NUM_CLASSES,
                                                                       -1.0), ValueError, ["guidance_scale", "-1.0"]),
    ("network guidance_scale<0", lambda: sampling.network(NET.apply, {}, jnp.array([0, 1]), num_classes=NUM_CLASSES,
                                                          guidance_scale=-2.0), ValueError, ["guidance_scale", "-2.0"]),
    ("generate guidance_scale<0", lambda: _generate(NET.apply, [0, 1], guidance_scale=-0.5), ValueError,
     ["guidance_scale", "-0.5"]),
    ("config sample.guidance<0", lambda: setup.validate_config(_config(guidance=-1.0)), ValueError,
     ["sample.guidance", "-1.0", ">= 0"]),
    # data on the wrong scale or of the wrong type
    ("diffusion_loss x0 in [0, 255]", lambda: losses.diffusion_loss(SCHED, eps_model, PIXELS, KEY), ValueError,
     ["x0", "[0, 255]", "x / 127.5 - 1"]),
    ("flow_matching_loss x0 in [0, 255]", lambda: flow.flow_matching_loss(eps_model, PIXELS, KEY), ValueError,
     ["x0", "[0, 255]"]),
    ("edm_loss x0 in [0, 255]", lambda: _edm_loss(PIXELS), ValueError, ["x0", "[0, 255]"]),
    ("diffusion_loss uint8 images", lambda: losses.diffusion_loss(SCHED, eps_model, np.zeros((2, 4, 4, 1), np.uint8),
                                                                   KEY), ValueError, ["x0", "uint8", "127.5"]),
    ("edm_loss int images", lambda: _edm_loss(np.zeros((2, 4, 4, 1), np.int32)), ValueError, ["x0", "int32"]),
    ("digits features on floats in [0, 1]", lambda: _digits_features(np.full((4, 8, 8, 1), 0.5, np.float32)),
     ValueError, ["float in [-1, 1] or uint8", "[0, 1]", "2 x - 1"]),
    ("digits features on NCHW", lambda: _digits_features(np.zeros((4, 1, 8, 8), np.float32)), ValueError,
     ["[N, 8, 8, 1]", "NHWC", "NCHW"]),
    ("inception on float images", lambda: inception_input.check_images(np.zeros((2, 8, 8, 3), np.float32)),
     ValueError, ["uint8 in [0, 255]", "float32", "to_uint8"]),
    ("inception on NCHW", lambda: inception_input.check_images(np.zeros((2, 3, 32, 32), np.uint8)), ValueError,
     ["1 or 3 channels", "NHWC [B, H, W, C]", "looks like NCHW"]),
    ("UNet on NCHW", lambda: jax.eval_shape(NET.clone(ch_mult=(1, 2)).init, KEY, jnp.zeros((2, 1, 28, 28)),
                                            jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)), ValueError,
     ["image_size=1", "NHWC [B, H, W, C]", "(2, 1, 28, 28) looks like NCHW"]),
    # outputs that would be lost: checked before the workdir is even read
    ("sample_workdir eta<0", lambda: sample_workdir("/nonexistent", "/tmp/x.npz", num_samples=1, eta=-1.0),
     ValueError, ["--eta", "-1.0"]),
]


@pytest.mark.parametrize("call, exc, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {str(info.value)!r}"


def test_list_x0_is_converted():
    """A nested list of numbers is data: q_sample and diffusion_loss take it like an array."""
    x0 = np.asarray(X, np.float64)
    abar = np.cumprod(1.0 - np.linspace(1e-3, 0.2, T))
    t = np.array([2, 7])
    want = np.sqrt(abar[t])[:, None, None, None] * x0 + np.sqrt(1 - abar[t])[:, None, None, None] * np.asarray(NOISE)
    np.testing.assert_allclose(d.q_sample(SCHED, x0.tolist(), t.tolist(), NOISE), want, rtol=1e-5, atol=1e-6)
    loss, _ = losses.diffusion_loss(SCHED, lambda x, t: jnp.zeros_like(x), x0.tolist(), KEY, noise=NOISE)
    np.testing.assert_allclose(float(loss), np.mean(np.asarray(NOISE, np.float64) ** 2), rtol=1e-5)


def test_frechet_distance_warns_when_there_are_no_more_samples_than_dimensions():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((10, 64)), rng.standard_normal((200, 64))
    with pytest.warns(UserWarning, match=r"N=10 features in D=64 dimensions is rank-deficient"):
        fid.frechet_distance(a, b)
    with pytest.warns(UserWarning, match=r"N=64 features in D=64"):
        fid.feature_statistics(rng.standard_normal((64, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.feature_statistics(rng.standard_normal((65, 64)))  # N > D: no warning


def _affine_eps(dtype):
    """``eps(x, t) = 0.2 x + 0.05 sin(t / 7)``, computed in ``dtype`` (float64 needs jax_enable_x64)."""

    def fn(x, t):
        out = 0.2 * x.astype(dtype) + 0.05 * jnp.sin(t.astype(dtype) / 7.0).reshape(-1, 1, 1, 1)
        assert out.dtype == dtype  # the model really returns dtype
        return out

    return fn


@pytest.mark.parametrize("sampler, steps", [("ddim", 4), ("heun", 3), ("dpm_solver++", 4), ("ddpm", None),
                                            ("pc", 3), ("ode", None)])
def test_a_float64_model_samples_as_its_float32_version(sampler, steps):
    """Each step's result is cast to the float32 carry (the samplers' documented conversion)."""
    kw = {} if steps is None else {"num_steps": steps}
    want = samplers.sample(SCHED, _affine_eps(jnp.float32), KEY, X.shape, sampler=sampler, **kw)
    with jax.enable_x64(True):
        got = samplers.sample(SCHED, _affine_eps(jnp.float64), KEY, X.shape, sampler=sampler, **kw)
    assert got.dtype == jnp.float32 and want.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_flow_and_edm_samplers_take_a_float64_model():
    velocity = lambda x, t: (0.5 * x).astype(x.dtype)
    want = flow.sample(velocity, KEY, X.shape, method="heun", num_steps=3)
    with jax.enable_x64(True):
        got = flow.sample(lambda x, t: (0.5 * x).astype(jnp.float64), KEY, X.shape, method="heun", num_steps=3)
        sigmas = jnp.array([2.0, 0.5, 0.0])
        x64 = edm.sample(Denoiser(lambda x, s: (0.5 * x).astype(jnp.float64)), jnp.asarray(X), sigmas)
    x32 = edm.sample(Denoiser(lambda x, s: 0.5 * x), jnp.asarray(X), jnp.array([2.0, 0.5, 0.0]))
    assert got.dtype == x64.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x64), np.asarray(x32), rtol=1e-5, atol=1e-5)


def test_orphaned_reads_of_a_failed_restore_are_quiet_and_nothing_else(monkeypatch, caplog):
    """What a restore leaves behind when one of its concurrent reads fails (checkpoint's module docstring)."""
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    checkpoint.quiet_orphaned_reads()
    checkpoint.quiet_orphaned_reads()  # idempotent: one wrapper

    class Raises:
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    Raises("Event loop is closed")
    Raises("something else")
    assert seen == ["something else"]
    log = logging.getLogger("asyncio")
    caplog.set_level(logging.ERROR, logger="asyncio")
    for text in ('OUT_OF_RANGE: Error reading "x" [tensorstore_spec=...]', "a bug elsewhere"):
        try:
            raise ValueError(text)
        except ValueError:
            log.error("Future exception was never retrieved", exc_info=True)
    assert [r.exc_info[1].args[0] for r in caplog.records] == ["a bug elsewhere"]


# --------------------------------------------------------------------------- traced values: the documented rules

# the fixed-step samplers a schedule model runs (the few-step ones need their own models: below)
FIXED_STEP = [name for name, spec in registry.SAMPLERS.items()
              if not spec.adaptive and spec.needs in ("discrete", "denoiser")]
# NFE for n = 2 steps, from the registry's table (pc with its default M = 1 corrector step).
NFE_AT_2 = {"ddpm": 2, "ddim": 2, "dpm_solver++": 2, "dpm++2m": 2, "euler": 2, "heun": 3, "euler_ancestral": 2,
            "pc": 4, "edm": 3}


def test_every_fixed_step_sampler_is_in_the_table():
    assert sorted(FIXED_STEP) == sorted(NFE_AT_2)


@pytest.mark.parametrize("name", FIXED_STEP)
def test_traced_num_steps_below_one_gives_nan_and_zero_nfe(name):
    run = jax.jit(lambda n: samplers.sample_with_info(SCHED, eps_model, KEY, X.shape, sampler=name, num_steps=n))
    for n in (0, -3):
        x, info = run(n)
        assert np.all(np.isnan(np.asarray(x))), f"{name} n={n}"
        assert int(info["nfe"]) == 0
    x, info = run(2)  # a valid traced count is untouched
    assert np.all(np.isfinite(np.asarray(x))) and int(info["nfe"]) == NFE_AT_2[name]


@pytest.mark.parametrize("name", ["meanflow", "consistency"])
def test_traced_num_steps_below_one_gives_nan_and_zero_nfe_for_few_step_models(name):
    obj = {"meanflow": objectives.MeanFlow(), "consistency": objectives.Consistency()}[name]
    den = obj.denoiser(lambda x, t: 0.1 * x)
    run = jax.jit(lambda n: samplers.sample_denoiser(den, KEY, X.shape, sampler=name, num_steps=n))
    x, info = run(0)
    assert np.all(np.isnan(np.asarray(x))) and int(info["nfe"]) == 0
    x, info = run(2)
    assert np.all(np.isfinite(np.asarray(x))) and int(info["nfe"]) == 2


def test_traced_num_steps_below_one_gives_nan_and_zero_nfe_for_edm():
    """The EDM sampler on a denoiser without a schedule follows the same rule; NFE 2n - 1 otherwise."""
    run_edm = registry.SAMPLERS["edm"].run
    denoiser = Denoiser(lambda x, sigma: x * (0.25 / (0.25 + sigma.reshape(-1, *([1] * (x.ndim - 1))) ** 2)))
    run = jax.jit(lambda n: run_edm(denoiser, X, KEY, num_steps=n))
    for n in (0, -3):
        x, nfe = run(n)
        assert np.all(np.isnan(np.asarray(x))) and int(nfe) == 0
    x, nfe = run(2)
    assert np.all(np.isfinite(np.asarray(x))) and int(nfe) == 3


@pytest.mark.parametrize("method, nfe_at_2", [("euler", 2), ("heun", 3)])
def test_flow_traced_num_steps_below_one_gives_nan_and_zero_nfe(method, nfe_at_2):
    run = jax.jit(lambda n: flow.sample_with_info(eps_model, KEY, X.shape, method=method, num_steps=n))
    x, info = run(0)
    assert np.all(np.isnan(np.asarray(x))) and int(info["nfe"]) == 0
    x, info = run(2)
    assert np.all(np.isfinite(np.asarray(x))) and int(info["nfe"]) == nfe_at_2


def test_traced_integer_t_out_of_range_gives_nan_for_those_examples():
    x0 = jnp.concatenate([X, X])
    noise = jnp.concatenate([NOISE, NOISE])
    t = jnp.array([-1, T, 3, T - 1])
    x_t = np.asarray(jax.jit(functools.partial(d.q_sample, SCHED))(x0, t, noise))
    assert np.all(np.isnan(x_t[:2]))
    abar = np.cumprod(1.0 - np.linspace(1e-3, 0.2, T))
    want = (np.sqrt(abar[[3, T - 1]])[:, None, None, None] * np.asarray(X, np.float64)
            + np.sqrt(1 - abar[[3, T - 1]])[:, None, None, None] * np.asarray(NOISE, np.float64))
    np.testing.assert_allclose(x_t[2:], want, rtol=1e-5, atol=1e-6)
    mean, var = jax.jit(functools.partial(d.q_mean_variance, SCHED))(x0, t)
    assert np.all(np.isnan(np.asarray(mean)[:2])) and np.all(np.isfinite(np.asarray(mean)[2:]))
    post = jax.jit(functools.partial(d.q_posterior, SCHED))(x0, x0, t)[0]
    assert np.all(np.isnan(np.asarray(post)[:2])) and np.all(np.isfinite(np.asarray(post)[2:]))


def test_t_minus_one_still_means_no_noise_where_samplers_use_it():
    """DDIM's last step goes to t_prev = -1 (x0): abar = 1, so x_prev is the x0 estimate."""
    t, t_prev = jnp.array([3, 3]), jnp.array([-1, -1])
    out = samplers.ddim_step(SCHED, NOISE, X, t, t_prev)
    abar = np.cumprod(1.0 - np.linspace(1e-3, 0.2, T))[3]
    want = (np.asarray(X, np.float64) - np.sqrt(1 - abar) * np.asarray(NOISE, np.float64)) / np.sqrt(abar)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(d.alpha_sigma(SCHED, jnp.array([-1]))[0], [1.0])


def test_unet_labels_under_jit_follow_the_documented_rule():
    """Traced labels cannot be checked: above num_classes -> NaN, -1 -> the null label (num_classes)."""
    apply = jax.jit(lambda p, y: NET.apply({"params": p}, jnp.broadcast_to(X[:1], (3, 4, 4, 1)), jnp.full((3,), 5), y))
    out = np.asarray(apply(net_params(), jnp.array([NUM_CLASSES + 1, -1, NUM_CLASSES])))
    assert np.all(np.isnan(out[0]))
    assert np.all(np.isfinite(out[1])) and np.abs(out[1]).max() > 0
    np.testing.assert_array_equal(out[1], out[2])


# --------------------------------------------------------------------------- outputs: checked before any work


def test_sample_workdir_checks_the_output_before_reading_the_workdir(tmp_path):
    existing = tmp_path / "old.npz"
    existing.write_bytes(b"keep me")
    cases = [(str(existing), FileExistsError, ["old.npz", "exists", "overwrite"]),
             (str(tmp_path / "dir.npz"), IsADirectoryError, ["dir.npz", "is a directory"]),
             (str(tmp_path / "file" / "x.npz"), PermissionError, ["output", "cannot write"]),
             (str(tmp_path / "x.png"), ValueError, ["output must be a .npz path"])]
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "file").write_text("a file where a folder is needed")
    (tmp_path / "grid.png").write_bytes(b"an earlier grid")
    cases.append((str(tmp_path / "grid.npz"), FileExistsError, ["grid.png", "exists"]))
    for output, exc, words in cases:
        with pytest.raises(exc) as info:  # the workdir does not exist: only the output was looked at
            sample_workdir(str(tmp_path / "no-workdir"), output, num_samples=1)
        for w in words:
            assert w in str(info.value), (output, str(info.value))
    assert existing.read_bytes() == b"keep me"


def test_eval_output_is_checked_first_and_never_overwritten(tmp_path):
    with pytest.raises(FileNotFoundError, match="--workdir"):
        check_eval_output(str(tmp_path / "missing"))
    (tmp_path / "a" / "eval.json").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="eval.json is a directory"):
        check_eval_output(str(tmp_path / "a"))
    wd = tmp_path / "b"
    wd.mkdir()
    assert write_eval(str(wd), {"vlb_bpd": 1.0}) == (str(wd / "eval.json"), None)
    os.utime(wd / "eval.json", (0, 0))
    out, backup = write_eval(str(wd), {"vlb_bpd": 2.0})
    assert os.path.basename(backup) == f"eval.{time.strftime('%Y%m%d-%H%M%S', time.localtime(0))}.json"
    assert json.load(open(backup)) == {"vlb_bpd": 1.0} and json.load(open(out)) == {"vlb_bpd": 2.0}
    os.utime(out, (0, 0))
    _, backup2 = write_eval(str(wd), {"vlb_bpd": 3.0})  # same timestamp: a new name, nothing lost
    assert backup2 != backup and json.load(open(backup2)) == {"vlb_bpd": 2.0}
    assert sorted(p for p in os.listdir(wd) if p.endswith(".tmp")) == []


# --------------------------------------------------------------------------- the scripts


def _script(name, *args):
    cmd = [sys.executable, "-m", f"jaxdiff.scripts.{name.removesuffix('.py')}", *args]
    return subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sample_script_refuses_to_overwrite_and_names_the_flag(tmp_path):
    """The output is checked before the workdir is read (so before any sampling): no trained run needed."""
    out = tmp_path / "s.npz"
    out.write_bytes(b"earlier samples")
    workdir = tmp_path / "never-read"
    proc = _script("sample.py", f"--workdir={workdir}", f"--output={out}", "--num_samples=2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: output {out} exists; pass overwrite (--overwrite)" in proc.stderr
    assert out.read_bytes() == b"earlier samples"
    proc = _script("sample.py", f"--workdir={workdir}", f"--output={out}", "--num_samples=2", "--eta=-1")
    assert proc.returncode == 1 and "error: --eta must be >= 0, got -1.0" in proc.stderr
    proc = _script("sample.py", f"--workdir={workdir}", f"--output={tmp_path / 'new.npz'}", "--guidance=-1")
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --guidance must be >= 0, got -1.0"


@pytest.mark.slow
def test_a_damaged_workdir_is_one_error_line(tiny_workdir, tmp_path):
    """Every checkpoint's data truncated: one warning per step, then one error: line, no traceback."""
    workdir = shutil.copytree(tiny_workdir, tmp_path / "w")
    for folder, _, files in os.walk(workdir / "checkpoints"):
        for name in files:
            path = os.path.join(folder, name)
            if os.sep + "d" + os.sep in path:  # the array data, not the metadata
                os.truncate(path, os.path.getsize(path) // 2)
    proc = _script("sample.py", f"--workdir={workdir}", f"--output={tmp_path / 's.npz'}", "--num_samples=2")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "restores completely" in errors[0]


@pytest.mark.slow
def test_eval_script_checks_its_output_first_and_keeps_the_previous_result(tiny_workdir, tmp_path):
    blocked = tmp_path / "blocked"
    (blocked / "eval.json").mkdir(parents=True)  # not a workdir either: the output is checked first
    proc = _script("eval.py", f"--workdir={blocked}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {blocked / 'eval.json'} is a directory" in proc.stderr
    previous = {"vlb_bpd": 123.0}
    with open(os.path.join(tiny_workdir, "eval.json"), "w") as f:
        json.dump(previous, f)
    proc = _script("eval.py", f"--workdir={tiny_workdir}", "--num_examples=4", "--batch_size=4", "--ode_examples=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    backups = [p for p in os.listdir(tiny_workdir) if p.startswith("eval.") and p != "eval.json"]
    assert len(backups) == 1 and f"the previous result is now {os.path.join(tiny_workdir, backups[0])}" in proc.stdout
    assert json.load(open(os.path.join(tiny_workdir, backups[0]))) == previous
    assert np.isfinite(json.load(open(os.path.join(tiny_workdir, "eval.json")))["vlb_bpd"])

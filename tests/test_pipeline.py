"""jaxdiff.Pipeline: a model, its parameters and sampling defaults as one object with ``.sample``.

References: for a model of one's own, the chain run directly through ``jaxdiff.samplers.sample``
with the classifier-free guidance formula written out here; for a workdir, the images
``sample_workdir`` writes; for a diffusers folder, the images of ``sample_pipeline`` and of the
chain run directly on the folder's UNet and schedule.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff.models import from_diffusers_pipeline, get_model
from jaxdiff.objectives import Diffusion, FlowMatching
from jaxdiff.pipeline import Pipeline
from jaxdiff.samplers import sample
from jaxdiff.training.generate import expand_labels, sample_pipeline, sample_workdir
from jaxdiff.training.workdir import load_workdir

from training_utils import subprocess_env

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
SCHEDULE = jaxdiff.linear_schedule(100)


@pytest.fixture(scope="module")
def own_model():
    """A class-conditional tiny UNet with random (non-zero) weights: a model of one's own."""
    unet = get_model("tiny", norm_groups=8, attn_resolutions=(), num_classes=3)
    params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)
    return unet, params


def guided_for(unet, params, labels, w):
    """``out_null + w (out_cond - out_null)``, the null label being ``num_classes``."""

    def fn(x, t):
        cond = unet.apply({"params": params}, x, t, labels, train=False)
        null = unet.apply({"params": params}, x, t, jnp.full_like(labels, unet.num_classes), train=False)
        return null + w * (cond - null)

    return fn


def test_pipeline_of_ones_own_model_runs_the_guided_chain(own_model):
    unet, params = own_model
    pipe = jaxdiff.Pipeline(Diffusion(schedule=SCHEDULE), unet.apply, params, (8, 8, 1), num_classes=3,
                            sampler="ddim", num_steps=3)
    labels = jnp.array([0, 2, 1, 2])
    w = 2.5
    key = jax.random.key(7)
    want = sample(SCHEDULE, guided_for(unet, params, labels, w), jax.random.fold_in(key, 0), (4, 8, 8, 1), sampler="ddim", num_steps=3,
                  clip_x0=True)
    got = pipe.sample(key, 4, labels=labels, guidance=w)
    assert got.shape == (4, 8, 8, 1) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_array_equal(pipe.sample_uint8(key, 4, labels=labels, guidance=w), jaxdiff.to_uint8(got))
    # Batch i from fold_in(key, i): two batches of 2 are the first two images of each batch's own chain.
    halves = pipe.sample(key, 4, labels=labels, guidance=w, batch_size=2)
    second = sample(SCHEDULE, guided_for(unet, params, labels[2:], w), jax.random.fold_in(key, 1), (2, 8, 8, 1),
                    sampler="ddim", num_steps=3, clip_x0=True)
    np.testing.assert_allclose(halves[2:], second, atol=2e-5)
    # One int labels every image; eta reaches ddim as an option.
    one = pipe.sample(key, 2, labels=1, eta=1.0)
    want_one = sample(SCHEDULE, guided_for(unet, params, jnp.array([1, 1]), 1.0), jax.random.fold_in(key, 0),
                      (2, 8, 8, 1), sampler="ddim", num_steps=3, clip_x0=True, eta=1.0)
    np.testing.assert_allclose(one, want_one, atol=2e-5)


@pytest.mark.parametrize("build, match", [
    (dict(sampler="nope"), r"sampler must be one of"),
    (dict(num_steps=0), r"num_steps"),
    (dict(eta=-1.0), r"eta must be >= 0"),
    (dict(image_shape=(8, 8)), r"image_shape must be \(H, W, C\)"),
    (dict(num_classes=None), r"num_classes=None but the model of apply_fn has num_classes=3"),
    (dict(options={"s_churn": 1.0}), r"s_churn"),
])
def test_pipeline_checks_its_defaults_when_built(own_model, build, match):
    unet, params = own_model
    kwargs = {"image_shape": (8, 8, 1), "num_classes": 3, **build}
    with pytest.raises(ValueError, match=match):
        pipe = Pipeline(Diffusion(schedule=SCHEDULE), unet.apply, params, **kwargs)
        pipe.sample(jax.random.key(0), 2)


@pytest.mark.parametrize("call, match", [
    (lambda p: p.sample(jax.random.key(0), 0), r"n must be a positive int"),
    (lambda p: p.sample(jax.random.key(0), 2, batch_size=0), r"batch_size must be a positive int"),
    (lambda p: p.sample(0, 2), r"key must be a PRNG key"),
    (lambda p: p.sample(jax.random.key(0), 2, labels=[0, 3]), r"labels must lie in \[0, 2\] \(num_classes=3\)"),
    (lambda p: p.sample(jax.random.key(0), 2, labels=[0, 1, 2]), r"labels must have shape \[n\]=\(2,\)"),
    (lambda p: p.sample(jax.random.key(0), 2, labels=0.5), r"labels must be one int or \[n\] ints"),
    (lambda p: p.sample(jax.random.key(0), 2, sampler="euler", eta=0.3), r"does not take .*eta"),
    (lambda p: p.sample(jax.random.key(0), 2, order=2), r"order"),
    (lambda p: p.sample(jax.random.key(0), 2, num_steps=0), r"num_steps"),
])
def test_pipeline_sample_checks_before_any_work(own_model, call, match):
    unet, params = own_model
    pipe = Pipeline(Diffusion(schedule=SCHEDULE), unet.apply, params, (8, 8, 1), num_classes=3, num_steps=2)
    with pytest.raises(ValueError, match=match):
        call(pipe)


def test_unconditional_pipeline_refuses_labels_and_guidance():
    unet = get_model("tiny", norm_groups=8, attn_resolutions=())
    params = unet.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    pipe = Pipeline(FlowMatching(), unet.apply, params, (8, 8, 1), sampler="euler", num_steps=2)
    with pytest.raises(ValueError, match=r"labels: the model is unconditional"):
        pipe.sample(jax.random.key(0), 2, labels=1)
    with pytest.raises(ValueError, match=r"guidance: the model is unconditional"):
        pipe.sample(jax.random.key(0), 2, guidance=2.0)
    with pytest.raises(ValueError, match=r"guidance=2.0: the model is unconditional"):
        Pipeline(FlowMatching(), unet.apply, params, (8, 8, 1), sampler="euler", guidance=2.0)
    with pytest.raises(ValueError, match=r"ddim"):
        Pipeline(FlowMatching(), unet.apply, params, (8, 8, 1))  # the default ddim needs a schedule
    assert np.all(np.isfinite(pipe.sample(jax.random.key(0), 2)))


# --------------------------------------------------------------------------- a trained workdir


def test_workdir_pipeline_draws_the_images_of_sample_workdir(tiny_workdir, tmp_path):
    wd = load_workdir(tiny_workdir)
    pipe = wd.pipeline
    sm = wd.config.sample
    assert (pipe.sampler, pipe.num_steps, pipe.guidance, pipe.num_classes) == (sm.sampler, sm.num_steps, sm.guidance,
                                                                                10)
    jax.tree.map(np.testing.assert_array_equal, pipe.params, wd.ema_params)
    out = np.load(sample_workdir(tiny_workdir, str(tmp_path / "s.npz"), num_samples=12, seed=3, num_steps=3,
                                 batch_size=8))
    got = pipe.sample_uint8(jax.random.key(3), 12, num_steps=3, batch_size=8)
    np.testing.assert_array_equal(got, out["images"])
    np.testing.assert_array_equal(pipe.labels(12), out["labels"])
    # --labels: ids repeated over the samples, or "cycle".
    out = np.load(sample_workdir(tiny_workdir, str(tmp_path / "l.npz"), num_samples=5, seed=3, num_steps=3,
                                 labels=(7, 2)))
    np.testing.assert_array_equal(out["labels"], [7, 2, 7, 2, 7])
    np.testing.assert_array_equal(out["images"], pipe.sample_uint8(jax.random.key(3), 5, num_steps=3,
                                                                   labels=[7, 2, 7, 2, 7]))


def test_expand_labels():
    np.testing.assert_array_equal(expand_labels("cycle", 12, 10), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(expand_labels([3], 4, 10), [3, 3, 3, 3])
    np.testing.assert_array_equal(expand_labels((0, 1, 2), 4, 3), [0, 1, 2, 0])
    for labels, match in (([10], r"--labels: class 10 is out of range: the model has num_classes=10 \(ids 0..9\)"),
                          ([-1], r"--labels: class -1 is out of range"), ([], r"--labels must be"),
                          ("odd", r"--labels must be 'cycle' or class ids")):
        with pytest.raises(ValueError, match=match):
            expand_labels(labels, 4, 10)
    with pytest.raises(ValueError, match=r"--labels: the model is unconditional"):
        expand_labels("cycle", 4, None)


@pytest.mark.slow
def test_sample_script_labels_flag(tiny_workdir, tmp_path):
    def script(*args):
        cmd = [sys.executable, "-m", "jaxdiff.scripts.sample", f"--workdir={tiny_workdir}", "--num_samples=3",
               "--steps=2", *args]
        return subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=300)

    proc = script(f"--output={tmp_path / 'a.npz'}", "--labels=4,11")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: --labels: class 11 is out of range: the model has num_classes=10 (ids 0..9)" in proc.stderr
    proc = script(f"--output={tmp_path / 'b.npz'}", "--labels=4,x")
    assert proc.returncode == 1 and "error: --labels must be 'cycle' or comma-separated class ids" in proc.stderr
    proc = script(f"--output={tmp_path / 'c.npz'}", "--labels=cycle")
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "c.npz")["labels"], [0, 1, 2])
    assert not (tmp_path / "a.npz").exists() and not (tmp_path / "b.npz").exists()


# --------------------------------------------------------------------------- a diffusers folder


@pytest.mark.parametrize("sampler, steps", [(None, 4), ("ddim", 3)])
def test_diffusers_pipeline_draws_the_images_of_sample_pipeline(tmp_path, sampler, steps):
    folder = os.path.join(FIXTURES, "pipe_ddpm")  # DDPMScheduler, fixed_large variance, 8x8x1
    loaded = from_diffusers_pipeline(folder)
    assert loaded.image_shape == (8, 8, 1)
    model, params, schedule, defaults = loaded[:4]  # the four fields of before, in their order
    pipe = loaded.pipeline
    assert (pipe.sampler, pipe.num_steps, pipe.options) == ("ddpm", 1000, {"variance": "fixed_large"})
    out = np.load(sample_pipeline(folder, str(tmp_path / "s.npz"), num_samples=3, seed=5, sampler=sampler,
                                  num_steps=steps, batch_size=3))["images"]
    got = pipe.sample(jax.random.key(5), 3, sampler=sampler, num_steps=steps, batch_size=3)
    np.testing.assert_array_equal(jaxdiff.to_uint8(got), out)
    # The chain run directly on the folder's UNet and schedule with the scheduler's settings.
    net = lambda x, t: model.apply({"params": params}, x, t)
    opts = {"variance": defaults.variance} if sampler is None else {}
    want = sample(schedule, net, jax.random.fold_in(jax.random.key(5), 0), (3, 8, 8, 1),
                  sampler=sampler or defaults.sampler, num_steps=steps, prediction=defaults.prediction,
                  clip_x0=defaults.clip_x0, **opts)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_diffusers_pipeline_without_sample_size_names_it():
    loaded = from_diffusers_pipeline(os.path.join(FIXTURES, "pipe_ddpm"))._replace(image_shape=None)
    with pytest.raises(ValueError, match=r"sample_size"):
        _ = loaded.pipeline

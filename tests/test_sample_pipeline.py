"""Sampling a diffusers pipeline folder with jaxdiff's samplers (``jaxdiff-sample --diffusers``).

The expected images are computed independently of ``sample_pipeline``: the folder's UNet and
schedule are loaded and the same chain is run directly through ``jaxdiff.samplers.sample``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import SamplingDefaults, from_diffusers_pipeline, get_model, to_diffusers_pipeline
from jaxdiff.samplers import sample
from jaxdiff.schedules import linear_schedule
from jaxdiff.training.generate import sample_pipeline
from jaxdiff.training.images import to_uint8


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pipe") / "ddim-tiny")
    model = get_model("tiny", norm_groups=8, attn_resolutions=())
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))["params"]
    # A non-zero output layer, so the samples depend on the network.
    params = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), params)
    sampling = SamplingDefaults(sampler="ddim", prediction="epsilon", clip_x0=True, variance=None, eta=0.0,
                                num_steps=None)
    to_diffusers_pipeline(model, params, linear_schedule(100), path, sampling=sampling, sample_size=8)
    return path


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_sample_pipeline_runs_the_chain_of_the_folder(pipeline_folder, tmp_path, sampler):
    out = sample_pipeline(pipeline_folder, str(tmp_path / "s.npz"), num_samples=3, seed=5, sampler=sampler,
                          num_steps=4, batch_size=4)
    images = np.load(out)["images"]
    assert images.shape == (3, 8, 8, 1) and images.dtype == np.uint8
    assert (tmp_path / "s.png").exists()
    pipe = from_diffusers_pipeline(pipeline_folder)
    net = lambda x, t: pipe.model.apply({"params": pipe.params}, x, t)
    want = sample(pipe.schedule, net, jax.random.fold_in(jax.random.key(5), 0), (4, 8, 8, 1), sampler=sampler,
                  num_steps=4, clip_x0=True)
    np.testing.assert_array_equal(images, to_uint8(want)[:3])


def test_sample_pipeline_checks_before_any_work(pipeline_folder, tmp_path):
    with pytest.raises(ValueError, match=r"--sampler must be one of"):
        sample_pipeline(pipeline_folder, str(tmp_path / "a.npz"), num_samples=2, sampler="nope")
    with pytest.raises(ValueError, match=r"does not take --eta"):
        sample_pipeline(pipeline_folder, str(tmp_path / "b.npz"), num_samples=2, sampler="heun", eta=0.5)
    assert not list(tmp_path.glob("*.npz"))

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
from jaxdiff.training.setup import resolve

from training_utils import tiny_config


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
    # Options are named as the command line sets them: --option NAME=..., while eta stays the flag --eta.
    with pytest.raises(ValueError, match=r"'dpm_solver\+\+' does not take --eta; it takes --option order=\.\.\., "):
        sample_pipeline(pipeline_folder, str(tmp_path / "c.npz"), num_samples=2, sampler="dpm_solver++", eta=0.5)
    with pytest.raises(ValueError, match=r"'ddim' does not take --option order=\.\.\.; it takes --eta$"):
        sample_pipeline(pipeline_folder, str(tmp_path / "d.npz"), num_samples=2, sampler="ddim",
                        options={"order": 3})
    assert not list(tmp_path.glob("*.npz"))


def test_a_workdir_sampling_names_options_as_the_command_line_sets_them():
    """``jaxdiff-sample --workdir`` checks through ``Run.sampling(prefix="--")``: an option is ``--option NAME=...``
    (there is no ``--order`` flag), ``eta`` is the flag ``--eta``; the library spelling has no dashes."""
    run = resolve(tiny_config())
    with pytest.raises(ValueError) as info:
        run.sampling(sampler="dpm_solver++", eta=0.5, prefix="--")
    assert str(info.value) == ("sampler 'dpm_solver++' does not take --eta; it takes --option order=..., "
                               "--option spacing=..., --option lower_order_final=..., --option denoise_final=..., "
                               "--option sigma_max=...")
    with pytest.raises(ValueError, match=r"^sampler 'ddim' does not take --option rho=\.\.\.; it takes --eta$"):
        run.sampling(sampler="ddim", options={"rho": 7.0}, prefix="--")
    with pytest.raises(ValueError, match=r"^sampler 'ddim' does not take rho; it takes eta$"):
        run.sampling(sampler="ddim", options={"rho": 7.0}, prefix="")
    assert run.sampling(sampler="dpm_solver++", options={"order": 3}, prefix="--").options == {"order": 3}

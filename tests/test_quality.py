"""Sample quality of a workdir (jaxdiff.training.quality): device-count independence, determinism,
the training job's digits-FD hook, eval.py --fid, and errors that name the bad input.

References: each sample regenerated one by one with ``generate`` from its own key
``fold_in(key(seed), i)`` (no vmap, no sharding, no streaming) and scored by
:func:`jaxdiff.metrics.digits.digits_fd` (batch NumPy statistics and its own floor).
"""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.metrics import digits, fid
from jaxdiff.training import images as imgs
from jaxdiff.training import loop, quality
from jaxdiff.training.generate import generate
from jaxdiff.training.setup import validate_config
from jaxdiff.training.workdir import load_workdir

from training_utils import ROOT, subprocess_env, tiny_config

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
NUM_FINAL = 24


def write_random_inception(path: str) -> str:
    """A random-weight FID Inception safetensors file (the test fixture's weights and BN statistics)."""
    from safetensors.numpy import load_file, save_file

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fixtures import inception_weights

    state = {**inception_weights.make_weights(), **load_file(os.path.join(FIXTURES, "inception_bn_stats.safetensors"))}
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny digits run whose job evaluates the digits FD at step 4 (every=4) and after its last step."""
    path = str(tmp_path_factory.mktemp("quality"))
    config = tiny_config()
    config.eval.every = 4
    config.eval.num_samples = 12
    config.eval.final_samples = NUM_FINAL
    config.eval.batch_size = 10
    loop.train_and_evaluate(config, path)
    return path


def _one_by_one(wd, seed, num_samples):
    """Samples ``[N, 8, 8, 1]`` in [-1, 1] generated one at a time (the reference of the sharded path)."""
    run, config = wd.run, wd.config
    fn = jax.jit(functools.partial(
        generate, run.objective, run.model.apply, image_shape=run.image_shape, sampler=config.sample.sampler,
        num_steps=config.sample.num_steps, eta=config.sample.eta, guidance_scale=config.sample.guidance,
        num_classes=run.num_classes, clip_x0=config.sample.clip_x0))
    labels = imgs.grid_labels(num_samples, run.num_classes)
    out = [fn(wd.ema_params, key=jax.random.fold_in(jax.random.key(seed), i), labels=jnp.asarray(labels[i:i + 1]))
           for i in range(num_samples)]
    return imgs.to_uint8(np.concatenate(out)).astype(np.float32) / 127.5 - 1.0


def test_job_logs_digits_fd_equal_to_digits_fd_of_its_samples(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/digits_fd" in r]
    assert [r["step"] for r in evals] == [4, 6]  # every=4, then the final evaluation
    final = json.load(open(os.path.join(workdir, "eval_final.json")))
    assert final["step"] == 6 and final["num_samples"] == NUM_FINAL
    assert final["eval/digits_fd"] == evals[-1]["eval/digits_fd"]
    for key in ("eval/kid", "eval/precision", "eval/recall", "eval/floor"):
        assert np.isfinite(final[key])
    wd = load_workdir(workdir)
    ref = digits.digits_fd(_one_by_one(wd, seed=0, num_samples=NUM_FINAL))
    np.testing.assert_allclose(final["eval/digits_fd"], ref["fd"], rtol=1e-3)
    np.testing.assert_allclose(final["eval/floor"], ref["floor"], rtol=1e-9)


def _features(wd, network, devices, *, seed=0, num_samples=13, batch_size=8):
    return quality.generated_features(wd.run.sampling(), wd.ema_params, network, num_samples=num_samples, seed=seed,
                                      batch_size=batch_size, keep=10, devices=devices, progress=False)


def test_one_and_eight_devices_agree_and_seed_determines_the_result(workdir):
    wd = load_workdir(workdir)
    network = quality.load_feature_network("digits")
    devices = jax.devices()
    assert len(devices) == 8, "conftest sets 8 fake CPU devices"
    one = _features(wd, network, devices[:1], batch_size=5)  # 3 batches of 5 (the last padded)
    eight = _features(wd, network, devices)  # 1 batch of 8 + 1 of 8 (padded: 16 rows for 13 samples)
    again = _features(wd, network, devices)
    other = _features(wd, network, devices, seed=1)
    assert one.count == eight.count == 13 and one.features.shape == (10, 64)
    np.testing.assert_allclose(one.features, eight.features, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one.sigma, eight.sigma, rtol=1e-4, atol=1e-4)
    for a, b in ((eight.mu, again.mu), (eight.sigma, again.sigma), (eight.features, again.features)):
        np.testing.assert_array_equal(a, b)
    assert np.abs(other.mu - eight.mu).max() > 1e-3
    ref = network.fn(_one_by_one(wd, seed=0, num_samples=13))
    np.testing.assert_allclose(eight.mu, ref.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(eight.sigma, np.cov(ref.astype(np.float64), rowvar=False), rtol=1e-3, atol=1e-4)


def test_bad_inputs_name_the_file_before_sampling(workdir, tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        quality.evaluate_quality(workdir, features="inception", inception_path=missing, num_samples=8)
    bad_dim = str(tmp_path / "dim5.npz")
    fid.save_stats(bad_dim, np.zeros(5), np.eye(5), count=10, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="dim5.npz has feature dimension 5, expected dim=64"):
        quality.evaluate_quality(workdir, ref_stats=bad_dim, num_samples=8)
    other_net = str(tmp_path / "other.npz")
    fid.save_stats(other_net, np.zeros(64), np.eye(64), count=10, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="other.npz was computed with other digits weights"):
        quality.evaluate_quality(workdir, ref_stats=other_net, num_samples=8)
    own_net = str(tmp_path / "own.npz")  # statistics of a network of one's own: nothing to check them against
    fid.save_stats(own_net, np.zeros(64), np.eye(64), count=10, network="my-resnet")
    with pytest.raises(ValueError, match="own.npz records no weights hash .*'my-resnet'.*digits network"):
        quality.evaluate_quality(workdir, ref_stats=own_net, num_samples=8)
    not_weights = str(tmp_path / "garbage.safetensors")
    open(not_weights, "wb").write(b"not a safetensors file")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        quality.evaluate_quality(workdir, features="inception", inception_path=not_weights, num_samples=8)


def test_validate_config_checks_eval_settings(tmp_path):
    config = tiny_config()
    config.eval.every = 10
    config.eval.features = "inception"
    with pytest.raises(ValueError, match="config.eval.inception=''"):
        validate_config(config, num_devices=1)
    config.eval.inception = str(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="missing.safetensors.*no such file"):
        validate_config(config, num_devices=1)
    validate_config(config)  # not a training run (a restored workdir): its files may be elsewhere
    config.eval.features = "digits"
    config.eval.inception = ""
    config.eval.ref_stats = str(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match="config.eval.ref_stats=.*ref.npz.*no such file"):
        validate_config(config, num_devices=1)
    config.eval.ref_stats = ""
    config.eval.steps = 5000  # more steps than the 100 timesteps of the tiny config
    with pytest.raises(ValueError, match="config.eval."):
        validate_config(config, num_devices=1)
    config.eval.every = 0  # off: the settings are not used
    validate_config(config, num_devices=1)


@pytest.mark.slow
def test_eval_script_fid_digits_and_missing_inception(workdir, tmp_path):
    """eval.py --fid end to end with the digits network, and its error line for a missing Inception file.

    The random-weight Inception smoke test of eval.py's docstring (``write_random_inception``) takes
    minutes on a CPU (299x299 inputs), so it is not run here."""
    env = subprocess_env(1)
    script = [sys.executable, "-m", "jaxdiff.scripts.eval", f"--workdir={workdir}", "--fid", "--nobpd"]
    proc = subprocess.run([*script, "--num_samples=20", "--seeds=0,1"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = json.load(open(os.path.join(workdir, "eval.json")))["quality"]
    assert q["features"] == "digits" and [r["seed"] for r in q["per_seed"]] == [0, 1]
    assert q["min"]["digits_fd"] == min(r["digits_fd"] for r in q["per_seed"])
    proc = subprocess.run([*script, "--features=inception", f"--inception={tmp_path / 'missing.safetensors'}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "error: Inception weights file" in proc.stderr and "missing.safetensors" in proc.stderr


def _edm_heun_reference(apply_fn, params, label, x_T, key_unused, *, sigma_data, num_steps, sigma_min=0.002,
                        sigma_max=80.0, rho=7.0):
    """EDM Algorithm 1 (Heun, no churn) written from the paper for one labelled example, float64 on the host:
    eq. 5's grid, Table 1's preconditioning with ``sigma_data``, ``c_noise = ln(sigma) / 4`` fed to the UNet as
    ``t = 1000 (c_noise + 1.6) / 3`` (jaxdiff.edm.unet_time's documented map)."""
    del key_unused
    i = np.arange(num_steps, dtype=np.float64)
    sig = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    sig = np.append(sig, 0.0)

    def D(x, s):
        c_skip = sigma_data**2 / (s**2 + sigma_data**2)
        c_out = s * sigma_data / np.sqrt(s**2 + sigma_data**2)
        c_in = 1.0 / np.sqrt(s**2 + sigma_data**2)
        t = 1000.0 * (np.log(s) / 4.0 + 1.6) / 3.0
        F = apply_fn({"params": params}, jnp.asarray(c_in * x, jnp.float32), jnp.full((1,), t, jnp.float32),
                     jnp.asarray([label]), train=False)
        return c_skip * x + c_out * np.asarray(F, np.float64)

    x = sigma_max * np.asarray(x_T, np.float64)
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - D(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (d + (x_next - D(x_next, s_next)) / s_next)
        x = x_next
    return x


@pytest.mark.slow
def test_fid_path_and_grid_path_draw_the_same_samples_with_the_runs_sigma_data(tmp_path):
    """An EDM run with sigma_data = 0.7: the training job's sample grid, ``sample_workdir`` and the FID
    evaluation all draw through ``Run.sampling``, and with the same key they draw the same sample, which
    is EDM's Heun with sigma_data = 0.7 written out here (and not the one of sigma_data = 0.5)."""
    from jaxdiff.training.generate import sample_images

    config = tiny_config(num_steps=2, checkpoint_every=2)
    config.diffusion.objective = "edm"
    config.diffusion.sigma_data = 0.7
    config.sample.sampler = "edm"
    config.sample.num_steps = 3
    config.model.dropout = 0.0
    loop.train_and_evaluate(config, str(tmp_path))
    wd = load_workdir(str(tmp_path))
    run, params = wd.run, wd.ema_params
    params = jax.tree_util.tree_map(lambda p: p + 0.02, params)  # a network whose output moves the samples
    sampling = run.sampling()
    seed, n = 3, 2
    labels = imgs.grid_labels(n, run.num_classes)
    grid = jax.jit(sampling)
    per_key = [np.asarray(grid(params, jax.random.fold_in(jax.random.key(seed), i), jnp.asarray(labels[i:i + 1])))
               for i in range(n)]
    network = quality.FeatureNetwork("identity", lambda x: np.asarray(x).reshape(len(x), -1), 64, "")
    gen = quality.generated_features(sampling, params, network, num_samples=n, seed=seed, keep=n,
                                     devices=jax.devices()[:2], progress=False)
    want = imgs.to_uint8(np.concatenate(per_key)).astype(np.float32) / 127.5 - 1.0
    np.testing.assert_allclose(gen.features, want.reshape(n, -1), atol=1.01 / 127.5)  # sharded: a rounding apart
    # sample_images (sample_workdir's path) draws batch i from fold_in(key(seed), i): one sample a batch
    got, _ = sample_images(dataclasses.replace(wd, ema_params=params), n, seed=seed, batch_size=1)
    assert np.abs(got.astype(int) - imgs.to_uint8(np.concatenate(per_key)).astype(int)).max() <= 1
    # The sample is EDM's Heun with the run's sigma_data (the sampler draws x_T from the first half of the key).
    for i in range(n):
        k_init = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))[0]
        x_T = jax.random.normal(k_init, (1, *run.image_shape), jnp.float32)
        for sigma_data, close in ((0.7, True), (0.5, False)):
            ref = _edm_heun_reference(run.model.apply, params, labels[i], x_T, None, sigma_data=sigma_data,
                                      num_steps=3)
            assert np.allclose(per_key[i], ref, atol=2e-3) == close, (sigma_data, np.abs(per_key[i] - ref).max())

"""The latent pipeline: jaxdiff-encode's shards against the autoencoder applied to the images, the data path
(model-space scaling, the posterior-sample policy, flips), resumable and refusing encodes, and a latent run end
to end (train -> sample -> decode -> FID) on the digits upsampled to 32x32 with a tiny random AutoencoderKL
saved as a diffusers folder."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import sklearn.datasets
from PIL import Image

from jaxdiff import data, latents
from jaxdiff.models import to_diffusers
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.training.encode import encode_dataset

from training_utils import ROOT, subprocess_env

SCALE, SHIFT = 0.7, 0.1  # the tiny autoencoder's scaling_factor / shift_factor (SD's shift is 0: test both terms)
# f = 4: 32x32x1 digits -> 8x8x4 latents, the size the dit_digits preset (patch 2) takes.
VAE = dict(block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4, in_channels=1,
           out_channels=1, scaling_factor=SCALE, shift_factor=SHIFT)
SHARD = 700  # 1,797 digits: shards of 700, 700, 397


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """(folder, module, params) of a random-weight AutoencoderKL written as a diffusers folder."""
    module = AutoencoderKL(**VAE)
    params = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"]
    folder = str(tmp_path_factory.mktemp("vae") / "tiny_vae")
    to_diffusers(module, params, folder)
    return folder, module, params


@pytest.fixture(scope="module")
def encoded(vae, tmp_path_factory):
    """An uninterrupted encoding of the digits at 32x32, with flips."""
    out = str(tmp_path_factory.mktemp("latents") / "digits32")
    encode_dataset(out, vae=vae[0], image_size=32, shard_size=SHARD, batch_size=64, flip=True, log=lambda s: None)
    return out


def _digits_32():
    """The digits as the encoder should see them, from scikit-learn and PIL alone: [N, 32, 32, 1] in [-1, 1]."""
    d = sklearn.datasets.load_digits()
    u8 = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BICUBIC)) for im in u8])
    return big[..., None].astype(np.float64) / 127.5 - 1.0, d.target


def _shards(folder):
    """Every array of every shard, read with NumPy's own reader (no pickle), concatenated."""
    m = latents.read_manifest(folder)
    parts = [np.load(latents.shard_path(folder, k), allow_pickle=False) for k in range(m.num_shards)]
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0].files}


def test_shards_hold_the_posterior_of_each_image_in_order(vae, encoded):
    folder, module, params = vae
    m = latents.read_manifest(encoded)
    assert m.complete and (m.num_shards, m.num_examples, m.num_classes) == (3, 1797, 10)
    assert (m.image_shape, m.latent_shape, m.flips) == ((32, 32, 1), (8, 8, 4), True)
    assert (m.scaling_factor, m.shift_factor) == (SCALE, SHIFT)
    assert m.autoencoder["path"] == os.path.abspath(folder) and len(m.autoencoder["sha256"]) == 64
    with open(os.path.join(encoded, latents.MANIFEST)) as f:
        assert json.load(f)["dataset"] == {"name": "digits", "split": "train", "data_dir": "", "image_size": 32}
    arrays = _shards(encoded)
    assert sorted(arrays) == ["label", "mean", "mean_flip", "std", "std_flip"]
    images, labels = _digits_32()
    np.testing.assert_array_equal(arrays["label"], labels)
    pick = np.array([0, 1, 699, 700, 1400, 1796])  # shard edges and the padded last batch
    x = jnp.asarray(images[pick], jnp.float32)
    for suffix, view in (("", x), ("_flip", x[:, :, ::-1])):
        mean, logvar = module.apply({"params": params}, view, method=module.encode)
        np.testing.assert_allclose(arrays["mean" + suffix][pick], mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(arrays["std" + suffix][pick], np.exp(0.5 * np.asarray(logvar, np.float64)),
                                   rtol=1e-5, atol=1e-6)
    assert arrays["mean"].dtype == np.float32 and arrays["label"].dtype == np.int32


def test_the_mean_policy_feeds_the_scaled_posterior_mean(encoded):
    source = latents.LatentSource(encoded, draw="mean")
    arrays = _shards(encoded)
    batch = data.get_batch(source, 5, global_batch_size=24, seed=3)
    idx = data.stream_indices(5 * 24 + np.arange(24), 1797, 3)
    expected = (arrays["mean"][idx].astype(np.float64) - SHIFT) * SCALE
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(batch["label"], arrays["label"][idx])
    np.testing.assert_array_equal(batch["index"], np.arange(24))
    assert batch["image"].shape == (24, 8, 8, 4) and batch["image"].dtype == np.float32


def test_the_sample_policy_draws_the_posterior_afresh_each_step_independent_of_processes(encoded):
    source = latents.LatentSource(encoded, draw="sample")
    arrays = _shards(encoded)
    step, b = 2, 64
    batch = data.get_batch(source, step, global_batch_size=b, seed=1)
    idx = data.stream_indices(step * b + np.arange(b), 1797, 1)
    eps = ((batch["image"] / SCALE + SHIFT) - arrays["mean"][idx]) / arrays["std"][idx]
    assert scipy.stats.kstest(eps.ravel(), "norm").pvalue > 1e-3  # z = mean + std * eps, eps ~ N(0, 1)
    halves = [data.get_batch(source, step, global_batch_size=b, seed=1, process_index=p, process_count=2)["image"]
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), batch["image"])  # a pure function of (seed, step)
    again = data.get_batch(source, step, global_batch_size=b, seed=1)["image"]
    np.testing.assert_array_equal(again, batch["image"])
    other = data.get_batch(latents.LatentSource(encoded), step + len(source), global_batch_size=b, seed=1)
    assert not np.allclose(other["image"], batch["image"])  # the same examples an epoch later: a new draw


def test_a_random_flip_picks_the_flipped_images_posterior(encoded):
    source = latents.LatentSource(encoded, draw="mean")
    arrays = _shards(encoded)
    batch = data.get_batch(source, 0, global_batch_size=64, seed=0, random_flip=True)
    idx = data.stream_indices(np.arange(64), 1797, 0)
    plain = (arrays["mean"][idx] - SHIFT) * SCALE
    flipped = (arrays["mean_flip"][idx] - SHIFT) * SCALE
    is_plain = np.all(np.isclose(batch["image"], plain, atol=1e-6), axis=(1, 2, 3))
    is_flipped = np.all(np.isclose(batch["image"], flipped, atol=1e-6), axis=(1, 2, 3))
    assert np.all(is_plain ^ is_flipped) and 10 < is_flipped.sum() < 54


def test_a_resumed_encoding_equals_an_uninterrupted_one_bit_for_bit(vae, encoded, tmp_path):
    out = str(tmp_path / "resumed")
    lines = []
    kwargs = dict(vae=vae[0], image_size=32, shard_size=SHARD, batch_size=64, flip=True, log=lines.append)
    m = encode_dataset(out, max_shards=1, **kwargs)
    assert (m.complete_shards, m.complete) == (1, False)
    with pytest.raises(ValueError, match="incomplete|1 of 3 shards"):
        latents.LatentSource(out)
    # What a run killed while writing shard 1 leaves: a partial temporary file and a shard the manifest does not count.
    with open(latents.shard_path(out, 1) + ".tmp", "wb") as f:
        f.write(b"PK\x03\x04 cut short")
    with open(latents.shard_path(out, 2), "wb") as f:
        f.write(b"not a shard")
    with pytest.raises(ValueError, match="--shard_size"):
        encode_dataset(out, **{**kwargs, "shard_size": 500})
    lines.clear()
    m = encode_dataset(out, **kwargs)
    assert m.complete and lines[0].startswith(f"resuming {out}: 1 of 3 shards")
    assert any(line.startswith("shard 3/3: examples 1400..1796") for line in lines)
    a, b = _shards(out), _shards(encoded)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8))
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        encode_dataset(out, **kwargs)


def test_the_encode_script_refuses_a_complete_output_and_names_a_bad_vae(vae, encoded, tmp_path):
    env = subprocess_env(2)
    cmd = [sys.executable, "-m", "jaxdiff.scripts.encode", "--image_size=32"]
    proc = subprocess.run(cmd + [f"--vae={tmp_path / 'missing'}", f"--output={tmp_path / 'x'}"], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --vae=") and "no such folder" in proc.stderr
    assert not os.path.exists(tmp_path / "x")
    proc = subprocess.run(cmd + [f"--vae={vae[0]}", f"--output={encoded}"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: --output {encoded} holds a complete encoding")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_folder_that_is_not_an_autoencoder_is_refused_naming_the_flag(tmp_path):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match=r"^--vae='.*unet': "):
        latents.load_autoencoder(str(folder))
    with pytest.raises(ValueError, match=r"^config\.data\.vae='.*nowhere': no such folder"):
        latents.load_autoencoder(str(tmp_path / "nowhere"), name="config.data.vae")


def _latent_config(folder, **train):
    from jaxdiff.configs import digits_dit

    config = digits_dit.get_config()
    config.data.image_size = 32
    config.data.latents = folder
    config.diffusion.num_timesteps = 100
    config.train.global_batch_size = 32
    config.train.num_steps = 8
    config.train.warmup_steps = 2
    config.train.checkpoint_every = 8
    config.train.log_every = 4
    config.train.sample_every = 0
    config.sample.num_steps = 4
    config.sample.num_samples = 10
    config.sample.clip_x0 = False
    config.eval.final_samples = 16
    config.eval.batch_size = 16
    for k, v in train.items():
        config.train[k] = v
    return config


def test_latent_settings_are_checked_at_start(encoded, tmp_path):
    from jaxdiff.training.setup import resolve

    config = _latent_config(str(tmp_path / "nothing"))
    with pytest.raises(ValueError, match=r"config\.data\.latents='.*nothing': no manifest\.json"):
        resolve(config)
    config = _latent_config(encoded)
    config.data.image_size = 16
    with pytest.raises(ValueError, match=r"config\.data\.image_size=16: the latents were encoded from 32x32"):
        resolve(config)
    config = _latent_config(encoded)
    config.data.name = "mnist"
    with pytest.raises(ValueError, match=r"config\.data\.latents=.*encodes digits/train"):
        resolve(config)
    run = resolve(_latent_config(encoded))
    assert (run.image_shape, run.output_shape, run.image_size) == ((8, 8, 4), (32, 32, 1), 32)


@pytest.mark.slow
def test_a_latent_run_trains_samples_decodes_and_scores_end_to_end(vae, encoded, tmp_path):
    from jaxdiff.training import loop
    from jaxdiff.training.generate import sample_workdir
    from jaxdiff.training.quality import evaluate_quality
    from jaxdiff.training.workdir import load_workdir

    _, module, params = vae
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(_latent_config(encoded), workdir)
    with open(os.path.join(workdir, "eval_final.json")) as f:
        final = json.load(f)
    assert np.isfinite(final["eval/digits_fd"]) and final["num_samples"] == 16  # decoded 32x32 -> pooled 8x8
    grid = np.asarray(Image.open(os.path.join(workdir, "samples", "final.png")))
    assert grid.shape[0] > 32 * 1 and grid.shape[1] >= 32 * 10  # 32x32 decoded digits, ten a row

    out = sample_workdir(workdir, str(tmp_path / "s.npz"), num_samples=6, seed=2, num_steps=3)
    images = np.load(out)["images"]
    assert images.shape == (6, 32, 32, 1) and images.dtype == np.uint8
    # The decode, written out: z = x / scaling + shift -> vae.decode -> uint8.
    wd = load_workdir(workdir)
    sampling = wd.run.sampling(num_steps=3)
    labels = np.asarray(np.load(out)["labels"])
    x = jax.jit(sampling)(wd.ema_params, jax.random.fold_in(jax.random.key(2), 0), jnp.asarray(labels))
    assert x.shape == (6, 8, 8, 4)
    decoded = module.apply({"params": params}, np.asarray(x, np.float64) / SCALE + SHIFT, method=module.decode)
    expected = np.clip(np.rint((np.asarray(decoded, np.float64) + 1.0) * 127.5), 0, 255)
    assert np.max(np.abs(images.astype(np.int64) - expected)) <= 1

    result = evaluate_quality(workdir, num_samples=16, num_steps=3, batch_size=16, progress=False)
    assert result["features"] == "digits" and np.isfinite(result["min"]["digits_fd"])


def test_the_digits_network_pools_8k_images_to_8x8():
    from jaxdiff.metrics.digits import check_digits_shape
    from jaxdiff.training.quality import load_feature_network

    net = load_feature_network("digits")
    small = data.from_uint8(data.load_digits().images[:20])
    big = np.repeat(np.repeat(small, 4, axis=1), 4, axis=2)  # each pixel a 4x4 block: pooling gives it back
    np.testing.assert_allclose(net.fn(big), net.fn(small), rtol=1e-6, atol=1e-6)
    assert (check_digits_shape((8, 8, 1)), check_digits_shape((32, 32, 1))) == (1, 4)
    for shape in ((32, 32, 3), (12, 12, 1), (16, 8, 1)):
        with pytest.raises(ValueError, match="8x8x1"):
            check_digits_shape(shape)

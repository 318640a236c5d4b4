"""Tests for jaxdiff.metrics.digits (the shipped classifier) and jaxdiff.metrics.stats (reference stats)."""

import hashlib

import jax
import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from jaxdiff.metrics import digits, fid, stats


@pytest.fixture(scope="module")
def split():
    """The documented split, rebuilt from scikit-learn: order rng(0).permutation(1797), first 360 held out."""
    raw = sklearn.datasets.load_digits()
    images = (np.rint(raw.images.astype(np.float64) * 255 / 16) / 127.5 - 1)[..., None]
    order = np.random.default_rng(0).permutation(1797)
    return {"train": images[order[360:]], "heldout": images[order[:360]],
            "train_labels": raw.target[order[360:]], "heldout_labels": raw.target[order[:360]]}


@pytest.fixture(scope="module")
def features():
    return digits.load_digits_features()


def test_split_is_the_documented_one(split):
    got = digits.digits_split()
    np.testing.assert_allclose(got["heldout_images"], split["heldout"], atol=1e-6)
    np.testing.assert_allclose(got["train_images"], split["train"], atol=1e-6)
    np.testing.assert_array_equal(got["heldout_labels"], split["heldout_labels"])


def test_shipped_classifier_is_accurate_on_heldout_digits(split):
    params = digits.load_params()
    logits = np.asarray(digits.DigitsClassifier().apply({"params": params}, split["heldout"].astype(np.float32)))
    accuracy = np.mean(logits.argmax(-1) == split["heldout_labels"])
    assert accuracy >= 0.97
    assert sum(np.size(v) for v in jax.tree_util.tree_leaves(params)) < 100_000


def test_features_shape_and_batch_independence(features, split):
    x = split["heldout"].astype(np.float32)
    all_features = features(x)
    assert all_features.shape == (360, digits.FEATURE_DIM) and all_features.dtype == np.float32
    np.testing.assert_allclose(features(x[:5]), all_features[:5], rtol=1e-5, atol=1e-6)
    assert np.isfinite(all_features).all() and (all_features >= 0).all()  # post-ReLU


@pytest.mark.parametrize("images, match", [
    (np.zeros((4, 8, 8, 1), np.int32), "float in \\[-1, 1\\] or uint8"),
    (np.full((4, 8, 8, 1), 0.5, np.float32), "looks like \\[0, 1\\]"),
    (np.zeros((4, 1, 8, 8), np.float32), "looks like NCHW"),
    (np.zeros((4, 8, 8), np.float32), r"\[N, 8, 8, 1\]"),
    (np.full((4, 8, 8, 1), 255.0, np.float32), r"\[-1, 1\]"),
    (np.full((4, 8, 8, 1), np.nan, np.float32), "non-finite"),
])
def test_features_reject_other_inputs(features, images, match):
    with pytest.raises(ValueError, match=match):
        features(images)


def test_uint8_images_are_the_float_ones_scaled(features, split):
    """uint8 pixels p are the float images p / 127.5 - 1 (the data's scaling), so the features agree."""
    pixels = np.rint((split["heldout"][:20].astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    np.testing.assert_allclose(features(pixels), features((pixels / 127.5 - 1.0).astype(np.float32)),
                               rtol=1e-6, atol=1e-6)


def test_digits_fd_floor_is_far_below_noise(split):
    noise = np.random.default_rng(0).uniform(-1, 1, (500, 8, 8, 1)).astype(np.float32)
    res = digits.digits_fd(noise)
    assert res["floor_count"] == 500 and res["num_images"] == 500 and res["reference"] == "heldout"
    assert 0 < res["floor"] < 20 and res["fd"] > 20 * res["floor"]
    same = digits.digits_fd(split["heldout"].astype(np.float32))  # the reference itself
    assert abs(same["fd"]) < 1e-6 * same["floor"] + 1e-8
    real = digits.digits_fd(split["train"][:300].astype(np.float32), reference="heldout", seed=1)
    assert real["fd"] < 3 * real["floor"]  # other real digits score like the floor
    with pytest.raises(ValueError, match="reference"):
        digits.digits_fd(noise, reference="test")


def test_load_params_errors(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        digits.load_params(tmp_path / "nothing.safetensors")
    save_file({"Dense_0/kernel": np.zeros((3, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors"):
        digits.load_params(tmp_path / "other.safetensors")


# ------------------------------------------------------------------------------ stats CLI


@pytest.mark.parametrize("extra, count", [([], 1797), (["--max_images", "500", "--batch_size", "128"], 500)])
def test_stats_cli_on_digits(tmp_path, features, extra, count):
    out = tmp_path / "digits.npz"
    stats.main(["--dataset", "digits", "--features", "digits", "--out", str(out), *extra])
    loaded = fid.load_stats(out, dim=digits.FEATURE_DIM)
    assert loaded.count == count
    with open(digits.WEIGHTS_PATH, "rb") as f:
        assert loaded.weights_sha256 == hashlib.sha256(f.read()).hexdigest()
    raw = sklearn.datasets.load_digits()
    images = (np.rint(raw.images * 255 / 16) / 127.5 - 1)[..., None].astype(np.float32)
    if count < 1797:  # the documented subset: the first positions of epoch 0's order
        images = images[np.random.default_rng([0, 0]).permutation(1797)[:count]]
    f = features(images).astype(np.float64)
    np.testing.assert_allclose(loaded.mu, f.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(loaded.sigma, np.cov(f, rowvar=False), rtol=1e-5, atol=1e-6)


def test_stats_cli_errors(tmp_path, capsys):
    out = tmp_path / "s.npz"
    out.write_bytes(b"")
    cases = [
        (["--dataset", "digits", "--features", "digits", "--out", str(out)], "exists"),
        (["--dataset", "digits", "--out", str(tmp_path / "a.npz")], "--inception"),
        (["--dataset", "digits", "--inception", str(tmp_path / "w"), "--out", str(tmp_path / "a.npz")], "w do not"),
        (["--dataset", "nosuch", "--features", "digits", "--out", str(tmp_path / "a.npz")], "nosuch"),
    ]
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        cases.append((["--dataset", "cifar10", "--features", "digits", "--data_dir", str(tmp_path),
                       "--out", str(tmp_path / "a.npz")], "8x8x1"))
        for argv, match in cases:
            with pytest.raises(SystemExit) as exit_info:
                stats.main(argv)
            assert exit_info.value.code == 1
            err = capsys.readouterr().err
            assert err.startswith("error: ") and match in err, err


def test_stats_cli_feeds_inception_the_dataset_uint8_pixels(tmp_path, monkeypatch):
    """The Inception path with a stand-in network whose features are the raw uint8 pixels."""
    import sys
    import types

    import jaxdiff.metrics

    def load_inception(path):
        def network(images):
            assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
            return images.reshape(len(images), 64).astype(np.float32)

        return network

    fake = types.ModuleType("jaxdiff.metrics.inception")
    fake.load_inception = load_inception
    monkeypatch.setitem(sys.modules, "jaxdiff.metrics.inception", fake)
    monkeypatch.setattr(jaxdiff.metrics, "inception", fake, raising=False)
    weights = tmp_path / "inception.safetensors"
    weights.write_bytes(b"weights")
    out = tmp_path / "s.npz"
    stats.main(["--dataset", "digits", "--inception", str(weights), "--out", str(out), "--batch_size", "400"])
    loaded = fid.load_stats(out, dim=64)
    pixels = np.rint(sklearn.datasets.load_digits().images * 255 / 16).reshape(1797, 64)
    np.testing.assert_allclose(loaded.mu, pixels.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(loaded.sigma, np.cov(pixels, rowvar=False), rtol=1e-10, atol=1e-10)
    assert (loaded.count, loaded.weights_sha256) == (1797, hashlib.sha256(b"weights").hexdigest())

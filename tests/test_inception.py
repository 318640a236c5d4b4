"""FID Inception: parity with pytorch-fid's ``InceptionV3([3])`` and its input pipeline.

References: ``fixtures/inception_reference.npz`` and ``fixtures/inception_bn_stats.safetensors``,
made by ``fixtures/make_inception_fixture.py`` from pytorch-fid's own network with the seeded
NumPy weights of ``fixtures/inception_weights.py`` (regenerated here); and a float64 NumPy
transcription of torch's bilinear ``align_corners=False`` formula.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures import inception_weights as W
from safetensors.numpy import load_file, save_file

from jaxdiff.metrics import (
    compute_fid,
    expected_state_dict_shapes,
    frechet_distance,
    inception_from_state_dict,
    load_inception,
    resize_bilinear,
)
from jaxdiff.metrics import convert_inception as conv
from jaxdiff.metrics.inception import preprocess

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
BLOCK_STRIDES = {"block0": 4, "block1": 4, "Mixed_5d": 2, "Mixed_6e": 2, "Mixed_7c": 1}  # as in the script
RESIZE_ROWS, RESIZE_COLS = 8, 2


def max_rel(a, b) -> float:
    """``max |a - b| / max |b|``."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(os.path.join(FIXTURES, "inception_reference.npz"), allow_pickle=False))


@pytest.fixture(scope="module")
def images():
    return W.make_test_images()


@pytest.fixture(scope="module")
def state_dict(reference, images):
    weights = W.make_weights()
    got = W.fingerprint({**weights, **{f"image/{k}": v for k, v in images.items()}})
    if got != str(reference["fingerprint"][0]):
        pytest.fail("NumPy's random streams differ from the fixture's: rerun tests/fixtures/make_inception_fixture.py")
    return {**weights, **load_file(os.path.join(FIXTURES, "inception_bn_stats.safetensors"))}


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("inception") / "inception.safetensors")
    save_file(state_dict, path)
    return path


@pytest.fixture(scope="module")
def net(weights_file):
    return load_inception(weights_file, batch_size=1)  # no padding: the fewest 299x299 forwards


# --------------------------------------------------------------------------- resize
def torch_bilinear_f64(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch ``F.interpolate(mode="bilinear", align_corners=False)`` (aten ``UpSample.h``) in float64,
    NHWC: ``src = max((dst + 0.5) * in / out - 0.5, 0)``, ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``,
    ``lambda = src - i0``; the 2-D value is the bilinear blend of the four taps."""
    n, in_h, in_w, c = x.shape
    out = np.empty((n, out_h, out_w, c))
    for oy in range(out_h):
        sy = max((oy + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = min(int(np.floor(sy)), in_h - 1)
        y1, ly = min(y0 + 1, in_h - 1), sy - y0
        for ox in range(out_w):
            sx = max((ox + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = min(int(np.floor(sx)), in_w - 1)
            x1, lx = min(x0 + 1, in_w - 1), sx - x0
            out[:, oy, ox] = ((1 - ly) * ((1 - lx) * x[:, y0, x0] + lx * x[:, y0, x1])
                              + ly * ((1 - lx) * x[:, y1, x0] + lx * x[:, y1, x1]))
    return out


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (13, 11)), ((32, 32), (61, 61)), ((23, 19), (7, 9)),
                                          ((40, 33), (29, 31)), ((6, 6), (6, 6)), ((1, 4), (3, 2))])
def test_resize_matches_float64_formula(in_hw, out_hw):
    x = np.random.default_rng(sum(in_hw) + 7 * sum(out_hw)).uniform(size=(2, *in_hw, 3))
    got = jax.jit(resize_bilinear, static_argnums=1)(jnp.asarray(x, jnp.float32), out_hw)
    assert got.shape == (2, *out_hw, 3) and got.dtype == jnp.float32
    # torch (and jaxdiff) compute the source coordinate in float32: off by up to ~in_size ulps of 1.
    np.testing.assert_allclose(got, torch_bilinear_f64(x, *out_hw), rtol=0, atol=max(in_hw) * 2.0**-22 + 1e-6)


def test_resize_downscaling_does_not_antialias():
    """torch samples two taps per axis when downscaling; jax.image.resize would average more."""
    x = np.zeros((1, 12, 12, 1), np.float32)
    x[:, ::2] = 1.0  # alternating rows: an antialiased 3x downscale gives ~0.5 everywhere
    got = np.asarray(resize_bilinear(jnp.asarray(x), (4, 4)))[0, :, 0, 0]
    np.testing.assert_allclose(got, torch_bilinear_f64(x, 4, 4)[0, :, 0, 0], atol=1e-6)
    np.testing.assert_allclose(got, [0.0, 1.0, 0.0, 1.0], atol=1e-6)  # exactly source rows 1, 4, 7, 10
    antialiased = np.asarray(jax.image.resize(jnp.asarray(x), (1, 4, 4, 1), "linear"))[0, :, 0, 0]
    assert np.all(np.abs(antialiased - 0.5) < 0.25)  # what torch does not do


@pytest.mark.parametrize("name", list(W.TEST_IMAGES))
def test_preprocess_matches_pytorch_fid(name, images, reference):
    got = np.asarray(jax.jit(preprocess)(images[name]))
    assert got.shape == (images[name].shape[0], 299, 299, 3)
    torch_01 = reference[f"resize/{name}"]
    np.testing.assert_allclose((got[:, ::RESIZE_ROWS, ::RESIZE_COLS] + 1) / 2, torch_01, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- network
def test_expected_keys_match_pytorch_fid_layer_table():
    table = {k: v for k, v in W.state_dict_shapes().items() if not k.startswith("fc.")}
    assert expected_state_dict_shapes() == table


@pytest.mark.parametrize("name", list(W.TEST_IMAGES))
def test_pool3_matches_pytorch_fid(name, net, images, reference):
    feats = net(images[name])
    assert feats.shape == (images[name].shape[0], 2048) and feats.dtype == np.float32
    err = max_rel(feats, reference[f"pool3/{name}"])
    assert err <= 1e-4, err


@pytest.mark.slow
def test_blocks_match_pytorch_fid(net, images, reference):
    blocks = net.blocks(images["rgb32"][:1])
    for block, s in BLOCK_STRIDES.items():
        ref = reference[f"blocks/{block}"]
        got = blocks[block][:, ::s, ::s]
        assert got.shape == ref.shape, block
        err = max_rel(got, ref)
        assert err <= 1e-4, (block, err)
    np.testing.assert_allclose(blocks["pool3"], reference["pool3/rgb32"][:1], rtol=0,
                               atol=1e-4 * np.abs(reference["pool3/rgb32"]).max())


@pytest.mark.slow
def test_batching_and_empty_input(state_dict, images, reference):
    """Three images through batches of two (one padded) equal each image's own features."""
    net = inception_from_state_dict(state_dict, batch_size=2)
    three = np.concatenate([images["rgb32"], images["rgb32"][:1]])
    feats = net(three)
    ref = reference["pool3/rgb32"]
    assert max_rel(feats[:2], ref) <= 1e-4 and max_rel(feats[2:], ref[:1]) <= 1e-4
    assert net(three[:0]).shape == (0, 2048)


# --------------------------------------------------------------------------- FID end to end
def test_compute_fid_is_the_frechet_distance_of_pytorch_fids_features(net, weights_file, images, reference):
    """``a = [x0, x1]``, ``b = [x1, x1]``: b's covariance is zero, so FID = ``|mu_a - f1|^2 + tr(S_a)``
    with pytorch-fid's own pool3 features ``f`` (the committed reference), in float64."""
    a, b = images["rgb32"], images["rgb32"][[1, 1]]
    f = reference["pool3/rgb32"].astype(np.float64)
    mu_a, cov_a = f.mean(axis=0), np.cov(f, rowvar=False)
    want = np.sum((mu_a - f[1]) ** 2) + np.trace(cov_a)
    got = compute_fid(a, b, inception=weights_file, batch_size=1)
    np.testing.assert_allclose(got, want, rtol=2e-4)
    # The features computed the existing way (load_inception, then frechet_distance).
    np.testing.assert_allclose(got, frechet_distance(net(a), net(b)), rtol=1e-6)
    np.testing.assert_allclose(compute_fid(a, b, inception=net), got, rtol=1e-6)


@pytest.mark.parametrize("args, match", [
    ((np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8, 3), np.uint8)),
     r"images_a must be uint8 .*got dtype float32: jaxdiff.to_uint8 converts samples in \[-1, 1\]"),
    ((np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3), np.uint8)), r"images_b needs at least 2 images"),
    ((np.zeros((2, 3, 8, 8), np.uint8), np.zeros((2, 8, 8, 3), np.uint8)), r"images_a must have 1 or 3 channels"),
])
def test_compute_fid_checks_the_images_before_loading_weights(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        compute_fid(*args, inception=str(tmp_path / "never-read.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"never-read\.safetensors.*convert_inception"):
        compute_fid(np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8),
                    inception=str(tmp_path / "never-read.safetensors"))


# --------------------------------------------------------------------------- bad input
def test_missing_or_unreadable_file(tmp_path):
    missing = str(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_inception(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="garbage.safetensors.*not a readable safetensors"):
        load_inception(str(garbage))


def test_wrong_keys_name_file_and_keys(tmp_path, state_dict):
    path = str(tmp_path / "wrong.safetensors")
    save_file({"Conv2d_1a_3x3.conv.weight": state_dict["Conv2d_1a_3x3.conv.weight"],
               "AuxLogits.fc.weight": np.zeros((3, 4), np.float32)}, path)
    with pytest.raises(ValueError, match=r"wrong\.safetensors.*missing keys: Conv2d_1a_3x3\.bn\.bias.*"
                                         r"unexpected keys: AuxLogits\.fc\.weight"):
        load_inception(path)


def test_wrong_shape_and_dtype(state_dict):
    bad = dict(state_dict)
    bad["Mixed_6e.branch7x7_2.conv.weight"] = np.zeros((192, 192, 7, 1), np.float32)
    with pytest.raises(ValueError, match=r"my weights.*Mixed_6e\.branch7x7_2\.conv\.weight \(192, 192, 7, 1\) "
                                         r"\(expected \(192, 192, 1, 7\)\)"):
        inception_from_state_dict(bad, source="my weights")
    bad = dict(state_dict)
    bad["Mixed_5b.branch1x1.bn.running_var"] = np.ones(64, np.int64)
    with pytest.raises(ValueError, match=r"non-float tensors: Mixed_5b\.branch1x1\.bn\.running_var int64"):
        inception_from_state_dict(bad)
    extra_ok = {**state_dict, "Conv2d_1a_3x3.bn.num_batches_tracked": np.array(7, np.int64)}
    inception_from_state_dict(extra_ok, batch_size=1)  # the optional keys of torch files are accepted


@pytest.mark.parametrize("bad,match", [
    (np.zeros((1, 32, 32, 3), np.float32), "images must be uint8.*float32"),
    (np.zeros((32, 32, 3), np.uint8), r"images must be uint8 \[N, H, W, C\], got rank 3"),
    (np.zeros((1, 32, 32, 4), np.uint8), r"1 or 3 channels.*\(1, 32, 32, 4\)"),
    (np.zeros((1, 3, 32, 32), np.uint8), r"1 or 3 channels.*\(1, 3, 32, 32\)"),
])
def test_bad_images(net, bad, match):
    with pytest.raises(ValueError, match=match):
        net(bad)


def test_bad_batch_size_and_precision(state_dict):
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        inception_from_state_dict(state_dict, batch_size=0)
    with pytest.raises(ValueError, match="precision must be one of.*'fast'"):
        inception_from_state_dict(state_dict, precision="fast")


# --------------------------------------------------------------------------- converter (checks before torch)
def test_converter_refuses_bad_paths_and_hash(tmp_path, capsys):
    src = tmp_path / "weights.pth"
    src.write_bytes(b"not the pytorch-fid file")
    out = tmp_path / "out.safetensors"
    assert conv.main([str(tmp_path / "missing.pth"), str(out)]) == 1
    assert "error: input file" in capsys.readouterr().err
    assert conv.main([str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "sha256" in err and conv.FID_WEIGHTS_SHA256 in err
    out.write_bytes(b"keep me")
    assert conv.main([str(src), str(out)]) == 1
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert conv.FID_WEIGHTS_URL.endswith("pt_inception-2015-12-05-6726825d.pth")
    assert conv.FID_WEIGHTS_SHA256.startswith("6726825d")

"""The Stable Diffusion autoencoder (jaxdiff.models.autoencoder) and its diffusers interop (models.diffusers_vae).

References: diffusers' AutoencoderKL outputs (float32) on random-weight folders made by
tests/fixtures/make_vae_fixtures.py (2 and 4 levels, quant convs or none, mid attention or none,
both attention namings, an odd image size); the tensor names diffusers itself wrote in those
folders; diffusers' parameter count of the sd-vae-ft-ema / SDXL layout (83,653,863, counted with
``sum(p.numel())`` on ``AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2)``);
the posterior's analytic moments for the sampler.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from scipy import stats

from jaxdiff.models import AutoencoderKL, from_diffusers, sample_latents, sd_vae, to_diffusers
from jaxdiff.models.autoencoder import LOGVAR_RANGE
from jaxdiff.models.diffusers_vae import param_shapes, vae_from_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "vae")
NAMES = ("sd_2level", "sdxl_4level_legacy", "plain_2level")
SD_VAE_PARAMS = 83_653_863  # diffusers' count for the 128-256-512-512 layout
_LEVELS4 = ["DownEncoderBlock2D"] * 4
SDXL_CONFIG = {  # stabilityai/sdxl-vae's config.json
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "_name_or_path": "", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": _LEVELS4, "force_upcast": True,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_CONFIG = {k: v for k, v in SDXL_CONFIG.items() if k != "scaling_factor"} | {"sample_size": 256}  # sd-vae-ft-ema


def rel_err(got, want) -> float:
    """max |got - want| / max |want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def load(name):
    model, params = from_diffusers(os.path.join(FIXTURES, name))
    return model, params, dict(np.load(os.path.join(FIXTURES, name, "io.npz")))


def encode(model, params, x):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)


def decode(model, params, z):
    return jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)


@pytest.mark.parametrize("name", NAMES)
def test_imported_autoencoder_reproduces_diffusers(name):
    model, params, io = load(name)
    mean, logvar = encode(model, params, io["x"])
    assert mean.dtype == logvar.dtype == jnp.float32
    assert rel_err(mean, io["mean"]) <= 1e-4
    assert rel_err(logvar, io["logvar"]) <= 1e-4
    out = decode(model, params, io["z"])
    assert out.shape == io["x"].shape
    assert rel_err(out, io["out"]) <= 1e-4


def test_odd_image_sizes_pad_as_diffusers():
    model, params, _ = load("sd_2level")
    io = np.load(os.path.join(FIXTURES, "sd_2level", "io_odd.npz"))
    mean, logvar = encode(model, params, io["x"])  # 17x17 -> 8x8: one row and column padded at the end
    assert mean.shape == io["mean"].shape == (2, 8, 8, 4)
    assert rel_err(mean, io["mean"]) <= 1e-4 and rel_err(logvar, io["logvar"]) <= 1e-4


def test_folder_metadata_is_kept_and_not_applied():
    expected = {"sd_2level": (0.18215, None), "sdxl_4level_legacy": (0.13025, None), "plain_2level": (1.5, 0.25)}
    for name, (scale, shift) in expected.items():
        model, params, io = load(name)
        assert (model.scaling_factor, model.shift_factor) == (scale, shift)
    # Another scaling factor on the same weights changes nothing the module computes.
    model, params, io = load("plain_2level")
    other = model.clone(scaling_factor=7.0, shift_factor=None)
    np.testing.assert_array_equal(encode(model, params, io["x"])[0], encode(other, params, io["x"])[0])


def test_published_layouts_build_with_diffusers_parameter_count():
    for config, scale in ((SD_CONFIG, 0.18215), (SDXL_CONFIG, 0.13025)):
        model, info = vae_from_config(config)
        shapes = param_shapes(model)
        assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == SD_VAE_PARAMS
        assert model.scaling_factor == scale and model.downsample_factor == 8
        assert info["sample_size"] == config["sample_size"]
    assert sd_vae() == vae_from_config(SD_CONFIG)[0]
    x = jax.ShapeDtypeStruct((2, 64, 48, 3), jnp.float32)
    mean, logvar = jax.eval_shape(lambda s, x: sd_vae().apply({"params": s}, x, method=AutoencoderKL.encode),
                                  param_shapes(sd_vae()), x)
    assert mean.shape == logvar.shape == (2, 8, 6, 4)
    out = jax.eval_shape(lambda s, z: sd_vae().apply({"params": s}, z, method=AutoencoderKL.decode),
                         param_shapes(sd_vae()), jax.ShapeDtypeStruct((2, 8, 6, 4), jnp.float32))
    assert out.shape == (2, 64, 48, 3)


def test_logvar_is_clipped_as_diffusers():
    model, params, io = load("sd_2level")
    c = model.latent_channels
    for shift, bound in ((1e4, LOGVAR_RANGE[1]), (-1e4, LOGVAR_RANGE[0])):
        bias = params["quant_conv"]["bias"].at[c:].add(shift)  # moves the logvar half only
        moved = {**params, "quant_conv": {**params["quant_conv"], "bias": bias}}
        mean, logvar = encode(model, moved, io["x"])
        np.testing.assert_array_equal(logvar, np.full(logvar.shape, bound, np.float32))
        assert rel_err(mean, io["mean"]) <= 1e-4
    assert LOGVAR_RANGE == (-30.0, 20.0)


def test_sample_latents_draws_the_posterior():
    mean = jnp.full((4, 8, 8, 4), 1.5)
    logvar = jnp.full((4, 8, 8, 4), np.log(0.25))  # std 0.5
    z = np.asarray(sample_latents(mean, logvar, jax.random.key(3)), np.float64).ravel()
    assert stats.kstest((z - 1.5) / 0.5, "norm").pvalue > 1e-3
    with pytest.raises(ValueError, match="logvar"):
        sample_latents(mean, logvar[..., :2], jax.random.key(0))


def test_inputs_are_checked_naming_the_argument():
    model, params, io = load("sd_2level")
    with pytest.raises(ValueError, match=r"encode: x must be \[B, H, W, 3\]"):
        model.apply({"params": params}, io["x"][..., :2], method=model.encode)
    with pytest.raises(ValueError, match=r"decode: z must be \[B, H, W, 4\]"):
        model.apply({"params": params}, io["z"][0], method=model.decode)
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderKL(block_out_channels=(8, 12), norm_num_groups=8).init(jax.random.key(0), io["x"])


def test_bfloat16_compute_stays_close():
    model, params, io = load("sd_2level")
    half = model.clone(dtype=jnp.bfloat16)
    mean, _ = encode(half, params, io["x"])
    assert mean.dtype == jnp.float32 and rel_err(mean, io["mean"]) < 0.05
    assert rel_err(decode(half, params, io["z"]), io["out"]) < 0.05


def _copy(name, tmp_path):
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    return folder


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("setting, value", [
    ("act_fn", "gelu"), ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    ("up_block_types", ["UpDecoderBlock2D"]), ("latents_mean", [0.0] * 4), ("latents_std", [1.0] * 4),
    ("norm_num_groups", 3), ("use_quant_conv", "yes"), ("block_out_channels", []), ("scaling_factor", None),
    ("spatial_norm", True),
])
def test_unsupported_settings_are_refused_naming_them(setting, value, tmp_path):
    folder = _copy("sd_2level", tmp_path)
    _edit_config(folder, **{setting: value})
    with pytest.raises(ValueError, match=setting):
        from_diffusers(folder)


def test_bad_tensors_are_refused(tmp_path):
    folder = _copy("sd_2level", tmp_path)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    name = "encoder.mid_block.attentions.0.to_q.weight"
    both = {**tensors, name.replace("to_q", "query"): tensors[name]}
    save_file(both, path)
    with pytest.raises(ValueError, match="both"):
        from_diffusers(folder)
    save_file({**tensors, "encoder.extra.weight": tensors[name]}, path)
    with pytest.raises(ValueError, match="encoder.extra.weight"):
        from_diffusers(folder)
    save_file({k: v for k, v in tensors.items() if k != name}, path)
    with pytest.raises(ValueError, match="to_q.weight or .*query.weight"):
        from_diffusers(folder)
    save_file({**tensors, "decoder.conv_in.weight": tensors["decoder.conv_in.weight"][:, :2]}, path)
    with pytest.raises(ValueError, match="decoder.conv_in.weight: shape"):
        from_diffusers(folder)


def test_attention_projections_stored_as_1x1_convs_load(tmp_path):
    folder = _copy("sd_2level", tmp_path)
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    conv = {k: (v[:, :, None, None] if ".attentions.0.to_" in k and v.ndim == 2 else v) for k, v in tensors.items()}
    save_file(conv, path)
    model, params = from_diffusers(folder)
    io = np.load(os.path.join(FIXTURES, "sd_2level", "io.npz"))
    assert rel_err(encode(model, params, io["x"])[0], io["mean"]) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_export_then_import_is_exact_with_diffusers_names(name, tmp_path):
    model, params, _ = load(name)
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        sample_size = json.load(f)["sample_size"]
    out = to_diffusers(model, params, str(tmp_path / "out"), sample_size=sample_size)
    again, params2 = from_diffusers(out)
    assert again == model
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    written = set(load_file(os.path.join(out, "diffusion_pytorch_model.safetensors")))
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
    original = set()
    for k in load_file(os.path.join(FIXTURES, name, "diffusion_pytorch_model.safetensors")):
        for old, new in legacy.items():
            k = k.replace(old, new)
        original.add(k)
    assert written == original  # the current names, as diffusers' save_pretrained writes them
    with open(os.path.join(out, "config.json")) as f:
        exported = json.load(f)
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        fixture = json.load(f)
    drop = ("_diffusers_version",)
    assert {k: v for k, v in exported.items() if k not in drop} == {k: v for k, v in fixture.items() if k not in drop}


def test_export_refuses_foreign_params(tmp_path):
    model, params, _ = load("sd_2level")
    wrong = {**params, "quant_conv": {"kernel": params["quant_conv"]["kernel"][..., :2]}}
    with pytest.raises(ValueError, match="parameter tree"):
        to_diffusers(model, wrong, str(tmp_path / "out"))


def test_a_cached_hub_id_loads_the_cached_folder_and_nothing_downloads(tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache with local_files_only (a stand-in module records
    the call); an uncached id and a missing huggingface_hub each say what is missing."""
    import sys
    import types

    from jaxdiff.latents import load_autoencoder

    snapshot = tmp_path / "snapshot"
    shutil.copytree(os.path.join(FIXTURES, "sd_2level"), snapshot / "vae")
    calls = []

    def snapshot_download(repo_id, *, local_files_only=False):
        calls.append((repo_id, local_files_only))
        if repo_id != "org/cached":
            raise OSError("LocalEntryNotFoundError")
        return str(snapshot)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))
    _, want = from_diffusers(os.path.join(FIXTURES, "sd_2level"))
    _, got = from_diffusers("org/cached/vae")
    assert calls == [("org/cached", True)]
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
    assert load_autoencoder("org/cached/vae").path == str(snapshot / "vae")
    with pytest.raises(FileNotFoundError, match="org/other is not in the huggingface_hub cache"):
        from_diffusers("org/other")
    with pytest.raises(FileNotFoundError, match="has no folder 'unet'"):
        from_diffusers("org/cached/unet")
    with pytest.raises(ValueError, match=r"--vae='org/other'.*not in the huggingface_hub cache"):
        load_autoencoder("org/other")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match="without huggingface_hub installed"):
        from_diffusers("org/cached/vae")

"""Tests for jaxdiff.models.diffusers(_pipeline): diffusers UNet2DModel / DDPMPipeline folders in and out.

References: diffusers' own outputs and configs, saved by tests/fixtures/make_diffusers_fixtures.py;
the google/ddpm-cifar10-32 config with a tensor-name/shape table written here from diffusers'
UNet2DModel layout; float64 NumPy formulas of diffusers' beta schedules. No torch, no network.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fixtures.make_export_fixture import native_model_and_params
from safetensors.numpy import load_file, save_file

from jaxdiff.models import (
    SamplingDefaults,
    count_params,
    ddpm_cifar10,
    digits,
    from_diffusers,
    from_diffusers_pipeline,
    tiny,
    to_diffusers,
    to_diffusers_pipeline,
)
from jaxdiff.models.diffusers_pipeline import schedule_from_diffusers
from jaxdiff.schedules import cosine_schedule, ve_schedule

import reference as ref

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "diffusers")
UNETS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(FIXTURES, "unet_*")))
WEIGHTS = "diffusion_pytorch_model.safetensors"
LEGACY = ("query", "key", "value", "proj_attn")

# google/ddpm-cifar10-32's unet/config.json (2022, diffusers 0.1 era: later keys are absent).
DDPM_CIFAR10_CONFIG = {
    "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _apply(model, params, x, t, y=None):
    return jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, x, t, y)


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return str(dst)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


# ------------------------------------------------------------------ parity with diffusers


@pytest.mark.parametrize("name", UNETS)
def test_fixture_matches_diffusers(name):
    folder = os.path.join(FIXTURES, name)
    if name.endswith("_legacy"):  # the fixture carries the google/ddpm-* attention names
        assert any(k.endswith(".query.weight") for k in load_file(os.path.join(folder, WEIGHTS)))
    io = np.load(os.path.join(folder, "io.npz"), allow_pickle=False)
    model, params = from_diffusers(folder)
    out = _apply(model, params, io["x"], io["t"], io.get("y", None))
    assert out.shape == io["out"].shape
    rel = float(jnp.max(jnp.abs(out - io["out"])) / np.max(np.abs(io["out"])))
    assert rel <= 1e-5, f"{name}: max relative error {rel:.2e}"


@pytest.mark.parametrize("name", UNETS)
def test_export_round_trip_matches_diffusers_layout(name, tmp_path):
    folder = os.path.join(FIXTURES, name)
    model, params = from_diffusers(folder)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    out = to_diffusers(model, params, str(tmp_path / "out"), sample_size=config["sample_size"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f) == config  # what diffusers' save_pretrained wrote
    names = set(load_file(os.path.join(folder, WEIGHTS)))
    current = {k.replace(".query.", ".to_q.").replace(".key.", ".to_k.").replace(".value.", ".to_v.")
               .replace(".proj_attn.", ".to_out.0.") for k in names}
    written = load_file(os.path.join(out, WEIGHTS))
    assert set(written) == current
    assert all(v.dtype == np.float32 for v in written.values())
    model2, params2 = from_diffusers(out)
    assert model2 == model
    jax.tree.map(np.testing.assert_array_equal, params2, params)


# ------------------------------------------------------------------ the DDPM CIFAR-10 checkpoint layout


def _ddpm_key_shapes(cfg):
    """diffusers' UNet2DModel state-dict names and shapes (legacy attention names), from its layout."""
    ch = cfg["block_out_channels"]
    c0, temb, L, n = ch[0], 4 * ch[0], len(ch), cfg["layers_per_block"]
    shapes = {}

    def conv(name, cout, cin, k=3):
        shapes[name + ".weight"], shapes[name + ".bias"] = (cout, cin, k, k), (cout,)

    def lin(name, cout, cin):
        shapes[name + ".weight"], shapes[name + ".bias"] = (cout, cin), (cout,)

    def norm(name, c):
        shapes[name + ".weight"], shapes[name + ".bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(name + ".norm1", cin), conv(name + ".conv1", cout, cin), lin(name + ".time_emb_proj", cout, temb)
        norm(name + ".norm2", cout), conv(name + ".conv2", cout, cout)
        if cin != cout:
            conv(name + ".conv_shortcut", cout, cin, 1)

    def attention(name, c):
        norm(name + ".group_norm", c)
        for part in LEGACY:
            lin(f"{name}.{part}", c, c)

    conv("conv_in", c0, cfg["in_channels"])
    lin("time_embedding.linear_1", temb, c0), lin("time_embedding.linear_2", temb, temb)
    skips, cin = [c0], c0
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(n):
            resnet(f"down_blocks.{i}.resnets.{j}", cin, ch[i])
            if kind.startswith("Attn"):
                attention(f"down_blocks.{i}.attentions.{j}", ch[i])
            cin = ch[i]
            skips.append(cin)
        if i < L - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", cin, cin)
            skips.append(cin)
    resnet("mid_block.resnets.0", cin, cin), attention("mid_block.attentions.0", cin)
    resnet("mid_block.resnets.1", cin, cin)
    for k, kind in enumerate(cfg["up_block_types"]):
        cout = ch[L - 1 - k]
        for j in range(n + 1):
            resnet(f"up_blocks.{k}.resnets.{j}", cin + skips.pop(), cout)
            if kind.startswith("Attn"):
                attention(f"up_blocks.{k}.attentions.{j}", cout)
            cin = cout
        if k < L - 1:
            conv(f"up_blocks.{k}.upsamplers.0.conv", cout, cout)
    norm("conv_norm_out", c0), conv("conv_out", cfg["out_channels"], c0)
    return shapes


@pytest.fixture(scope="module")
def ddpm_cifar10_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-cifar10-32")
    rng = np.random.default_rng(0)
    tensors = {k: rng.standard_normal(s, dtype=np.float32) for k, s in _ddpm_key_shapes(DDPM_CIFAR10_CONFIG).items()}
    save_file(tensors, str(folder / WEIGHTS))
    with open(folder / "config.json", "w") as f:
        json.dump(DDPM_CIFAR10_CONFIG, f)
    return str(folder), tensors


@pytest.mark.slow  # 35.7M parameters written and read (about 10 s)
def test_ddpm_cifar10_checkpoint_layout(ddpm_cifar10_folder):
    folder, tensors = ddpm_cifar10_folder
    assert sum(v.size for v in tensors.values()) == 35_746_307
    model, params = from_diffusers(folder)
    assert count_params(params) == 35_746_307
    # The same parameter tree as jaxdiff's own DDPM preset.
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    preset = jax.eval_shape(ddpm_cifar10().init, jax.random.key(0), x, t)["params"]
    assert jax.tree.map(lambda s: s.shape, preset) == jax.tree.map(jnp.shape, params)
    # A few tensors by hand: layouts and the level order of the up blocks.
    np.testing.assert_array_equal(params["conv_in"]["kernel"], tensors["conv_in.weight"].transpose(2, 3, 1, 0))
    eq = np.testing.assert_array_equal
    eq(params["down_1_attn_1"]["q"]["kernel"], tensors["down_blocks.1.attentions.1.query.weight"].T)
    eq(params["up_1_attn_2"]["proj_out"]["bias"], tensors["up_blocks.2.attentions.2.proj_attn.bias"])
    np.testing.assert_array_equal(params["up_3_block_0"]["nin_shortcut"]["kernel"][0, 0],
                                  tensors["up_blocks.0.resnets.0.conv_shortcut.weight"][:, :, 0, 0].T)
    eq(params["mid_attn_1"]["norm"]["scale"], tensors["mid_block.attentions.0.group_norm.weight"])
    np.testing.assert_array_equal(params["temb_dense1"]["kernel"], tensors["time_embedding.linear_2.weight"].T)
    assert model.attn_levels == (1,) and model.norm_groups == 32 and model.freq_shift == 1 and not model.flip_sin_to_cos


@pytest.mark.slow  # 35.7M parameters written and read (about 10 s)
def test_ddpm_cifar10_export_round_trip(ddpm_cifar10_folder, tmp_path):
    folder, tensors = ddpm_cifar10_folder
    model, params = from_diffusers(folder)
    out = to_diffusers(model, params, str(tmp_path / "out"), sample_size=32)
    written = load_file(os.path.join(out, WEIGHTS))
    renamed = {k.replace(".query.", ".to_q.").replace(".key.", ".to_k.").replace(".value.", ".to_v.")
               .replace(".proj_attn.", ".to_out.0."): v for k, v in tensors.items()}
    assert written.keys() == renamed.keys()
    for k, v in renamed.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    _, params2 = from_diffusers(out)
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_matches_diffusers(tmp_path):
    """A jaxdiff-native model exported, and diffusers' outputs on that folder (make_export_fixture.py)."""
    model, params, x, t, y = native_model_and_params()
    out = to_diffusers(model, params, str(tmp_path / "out"), sample_size=8)
    committed = os.path.join(FIXTURES, "export_native")
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(committed, "config.json")) as g:
        assert json.load(f) == json.load(g)
    written, saved = load_file(os.path.join(out, WEIGHTS)), load_file(os.path.join(committed, WEIGHTS))
    assert written.keys() == saved.keys()
    for k in saved:
        np.testing.assert_array_equal(written[k], saved[k], err_msg=k)
    want = np.load(os.path.join(committed, "io.npz"))["out"]
    got = _apply(model, params, x, t, y)
    assert got.shape == want.shape == (2, 8, 8, 4)
    rel = float(jnp.max(jnp.abs(got - want)) / np.max(np.abs(want)))
    assert rel <= 1e-5, f"max relative error {rel:.2e}"


def test_export_of_a_jaxdiff_model_by_resolution(tmp_path):
    model = tiny(norm_groups=8, attn_resolutions=(4,), num_classes=3, num_heads=2)
    x, t, y = jnp.ones((2, 8, 8, 1)), jnp.array([5, 700]), jnp.array([0, 2])
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, dtype=np.float32), shapes)
    out = to_diffusers(model, params, str(tmp_path / "out"), sample_size=8)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    assert config["num_class_embeds"] == 4 and config["attention_head_dim"] == 16 and config["norm_num_groups"] == 8
    model2, params2 = from_diffusers(out)
    np.testing.assert_allclose(_apply(model2, params2, x, t, y), _apply(model, params, x, t, y), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="norm_groups"):  # tiny's own rule: 8 groups at 16 channels, 16 at 32
        to_diffusers(tiny(), params, str(tmp_path / "other"))
    with pytest.raises(FileExistsError, match="out"):
        to_diffusers(model, params, out, sample_size=8)


def test_export_of_the_class_conditional_digits_preset(tmp_path):
    """The README's default job (preset digits, 10 classes) exports: one GroupNorm count, 16 groups, in every layer."""
    model = digits(num_classes=10)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    t, y = jnp.array([3, 400, 999]), jnp.array([0, 9, 10])  # 10: the null label
    params = model.init(jax.random.key(1), x, t, y)["params"]
    # Nudge every parameter so that the zero-initialised output layers do not hide a mismatch.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree.unflatten(treedef, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    out = to_diffusers(model, params, str(tmp_path / "digits"), sample_size=8)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["norm_num_groups"] == 16 and config["num_class_embeds"] == 11
    assert config["block_out_channels"] == [32, 32] and config["down_block_types"] == ["DownBlock2D", "AttnDownBlock2D"]
    model2, params2 = from_diffusers(out)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    want = _apply(model, params, x, t, y)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(_apply(model2, params2, x, t, y), want, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ schedulers and pipelines


def _scaled_linear_betas(T, b0, b1):
    i = np.arange(T, dtype=np.float64)
    return (np.sqrt(b0) + (np.sqrt(b1) - np.sqrt(b0)) * i / (T - 1)) ** 2


SCHEDULES = {
    "ddpm_linear": (lambda: ref.linear_betas(1000), ("ddpm", "epsilon", True, "fixed_large", None, 1000)),
    "ddpm_cosine_learned": (lambda: ref.cosine_betas(1000), ("ddpm", "epsilon", True, "learned_range", None, 1000)),
    "ddpm_scaled_linear_v": (lambda: _scaled_linear_betas(500, 0.00085, 0.012), ("ddpm", "v", False, "fixed_small",
                                                                                 None, 500)),
    "ddim_cosine_sample": (lambda: ref.cosine_betas(1000), ("ddim", "x0", True, None, 0.0, None)),
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_scheduler_schedule_and_defaults(name):
    folder = os.path.join(FIXTURES, f"sched_{name}")
    with open(os.path.join(folder, "scheduler_config.json")) as f:
        schedule, sampling = schedule_from_diffusers(json.load(f))
    betas, defaults = SCHEDULES[name]
    np.testing.assert_allclose(schedule.betas, betas(), rtol=1e-6)
    np.testing.assert_allclose(schedule.betas, np.load(os.path.join(folder, "betas.npy")), rtol=1e-6)
    np.testing.assert_allclose(schedule.alphas_cumprod, np.cumprod(1 - betas()), rtol=1e-5)
    assert tuple(sampling) == defaults


def _sched_config(name):
    with open(os.path.join(FIXTURES, f"sched_{name}", "scheduler_config.json")) as f:
        return json.load(f)


def test_scheduler_refuses():
    offset = _sched_config("ddim_linear_offset")  # steps_offset=1, set_alpha_to_one=False
    with pytest.raises(ValueError, match="steps_offset=1"):
        schedule_from_diffusers(offset)
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        schedule_from_diffusers({**offset, "steps_offset": 0})
    with pytest.raises(ValueError, match="thresholding=True"):
        schedule_from_diffusers(_sched_config("ddpm_thresholding"))
    linear = _sched_config("ddpm_linear")
    # 2022 configs (google/ddpm-*) carry tensor_format and predict_epsilon.
    old = {k: v for k, v in linear.items() if k != "prediction_type"}
    _, sampling = schedule_from_diffusers({**old, "tensor_format": "pt", "predict_epsilon": False})
    assert sampling.prediction == "x0"
    with pytest.raises(ValueError, match="predict_epsilon"):
        schedule_from_diffusers({**linear, "predict_epsilon": False})
    for setting, value in [("beta_schedule", "sigmoid"), ("variance_type", "learned"), ("_class_name", "PNDMScheduler"),
                           ("rescale_betas_zero_snr", True), ("clip_sample_range", 2.0), ("timestep_spacing", "odd"),
                           ("prediction_type", "sample_and_eps"), ("shift", 3.0)]:
        with pytest.raises(ValueError, match=setting):
            schedule_from_diffusers({**linear, setting: value})


def test_pipeline_folder():
    pipe = from_diffusers_pipeline(os.path.join(FIXTURES, "pipe_ddpm"))
    np.testing.assert_allclose(pipe.schedule.betas, ref.linear_betas(1000), rtol=1e-6)
    assert pipe.sampling.kwargs() == {
        "sampler": "ddpm", "prediction": "epsilon", "clip_x0": True, "variance": "fixed_large", "num_steps": 1000
    }
    assert count_params(pipe.params) == sum(v.size for v in load_file(os.path.join(FIXTURES, "pipe_ddpm", "unet",
                                                                                     WEIGHTS)).values())


def test_pipeline_export_round_trip(tmp_path):
    pipe = from_diffusers_pipeline(os.path.join(FIXTURES, "pipe_ddpm"))
    out = to_diffusers_pipeline(pipe.model, pipe.params, pipe.schedule, str(tmp_path / "p"), sampling=pipe.sampling,
                                sample_size=8)
    back = from_diffusers_pipeline(out)
    assert back.sampling == pipe.sampling and back.model == pipe.model
    np.testing.assert_array_equal(back.schedule.betas, pipe.schedule.betas)
    np.testing.assert_allclose(back.schedule.alphas_cumprod, pipe.schedule.alphas_cumprod, rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, back.params, pipe.params)
    index = os.path.join(FIXTURES, "pipe_ddpm", "model_index.json")
    with open(os.path.join(out, "model_index.json")) as f, open(index) as g:
        assert json.load(f) == json.load(g)
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f).keys() == _sched_config("ddpm_linear").keys()
    ddim = SamplingDefaults("ddim", "v", False, None, 0.0, None)
    cos = cosine_schedule(100)
    back = from_diffusers_pipeline(to_diffusers_pipeline(pipe.model, pipe.params, cos, str(tmp_path / "q"),
                                                         sampling=ddim))
    assert back.sampling == ddim
    np.testing.assert_array_equal(back.schedule.betas, cos.betas)
    with pytest.raises(ValueError, match="schedule.kind"):
        to_diffusers_pipeline(pipe.model, pipe.params, ve_schedule(10), str(tmp_path / "r"), sampling=ddim)
    with pytest.raises(ValueError, match="learn_sigma"):
        to_diffusers_pipeline(pipe.model, pipe.params, cos, str(tmp_path / "r"), sampling=pipe.sampling._replace(
            variance="learned_range"))


def test_pipeline_learned_variance(tmp_path):
    shutil.copytree(os.path.join(FIXTURES, "unet_scale_shift_class"), tmp_path / "p" / "unet")
    shutil.copytree(os.path.join(FIXTURES, "sched_ddpm_cosine_learned"), tmp_path / "p" / "scheduler")
    pipe = from_diffusers_pipeline(str(tmp_path / "p"))
    assert pipe.model.learn_sigma and pipe.sampling.variance == "learned_range"
    io = np.load(os.path.join(FIXTURES, "unet_scale_shift_class", "io.npz"))
    np.testing.assert_allclose(_apply(pipe.model, pipe.params, io["x"], io["t"], io["y"]), io["out"], atol=1e-5)
    shutil.rmtree(tmp_path / "p" / "unet")
    shutil.copytree(os.path.join(FIXTURES, "unet_ddpm_legacy"), tmp_path / "p" / "unet")
    with pytest.raises(ValueError, match="out_channels"):
        from_diffusers_pipeline(str(tmp_path / "p"))


# ------------------------------------------------------------------ bad input


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_diffusers(str(tmp_path / "nowhere"))
    folder = _copy("unet_ddpm_legacy", tmp_path)
    os.remove(os.path.join(folder, WEIGHTS))
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        from_diffusers(folder)
    open(os.path.join(folder, "diffusion_pytorch_model.bin"), "wb").close()
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.bin[\s\S]*safe_serialization=True"):
        from_diffusers(folder)
    os.remove(os.path.join(folder, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_diffusers(folder)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        from_diffusers_pipeline(str(tmp_path))


@pytest.mark.parametrize("setting, value", [
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D"]), ("time_embedding_type", "fourier"),
    ("class_embed_type", "timestep"), ("resnet_time_scale_shift", "spatial"), ("center_input_sample", True),
    ("mid_block_scale_factor", 2), ("up_block_types", ["UpBlock2D", "UpBlock2D"]), ("attn_norm_num_groups", 2),
    ("cross_attention_dim", 8),
])
def test_unsupported_settings(setting, value, tmp_path):
    folder = _copy("unet_ddpm_legacy", tmp_path)
    _edit_config(folder, **{setting: value})
    with pytest.raises(ValueError, match=setting):
        from_diffusers(folder)


def test_bad_tensors(tmp_path):
    folder = _copy("unet_ddpm_legacy", tmp_path)
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    good = dict(tensors)
    tensors["mid_block.resnets.0.conv1.weight"] = tensors["mid_block.resnets.0.conv1.weight"][:, :8]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"safetensors.*mid_block\.resnets\.0\.conv1\.weight: shape \(16, 8, 3, 3\)"):
        from_diffusers(folder)
    save_file({**good, "extra.weight": np.zeros(3, np.float32)}, path)
    with pytest.raises(ValueError, match=r"not used.*extra\.weight"):
        from_diffusers(folder)
    save_file({k: v for k, v in good.items() if k != "conv_out.bias"}, path)
    with pytest.raises(ValueError, match=r"missing.*conv_out\.bias"):
        from_diffusers(folder)
    save_file(good, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS}: not a readable safetensors file"):
        from_diffusers(folder)

"""DiT (jaxdiff.models.dit) and its diffusers interop (jaxdiff.models.diffusers_dit).

References: the paper's parameter counts, recomputed here from its architecture in float64 Python
arithmetic (Peebles & Xie 2023, Table 4: DiT-S/2 33M, B/2 130M, L/2 458M, XL/2 675M); the
reference code's 2-D sin-cos table written out in NumPy; adaLN-Zero's consequences of the
paper's initialisation (output 0, identity blocks, only the final linear moves on the first
step); diffusers' DiTTransformer2DModel outputs on random-weight folders made by
tests/fixtures/make_dit_fixtures.py.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

from jaxdiff import objectives, schedules
from jaxdiff.models import (
    PRESETS,
    DiT,
    DiTLayout,
    check_model_image_size,
    count_params,
    from_diffusers,
    get_model,
    to_diffusers,
)
from jaxdiff.models.dit import DiTBlock, sincos_2d
from jaxdiff.training.sampling import generate
from jaxdiff.training.state import create_train_state
from jaxdiff.training.step import train_step

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "dit")
SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}


def tiny(**kw):
    return DiT(**{"patch_size": 2, "hidden_size": 16, "depth": 2, "num_heads": 2, **kw})


def perturbed(params, scale=0.3, seed=0):
    """Every parameter moved off its (partly zero) initialisation, so that every one matters."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def paper_count(hidden: int, depth: int, patch: int, *, image=32, c_in=4, classes=1000, learn_sigma=True,
                pos_table=True) -> int:
    """The reference DiT's parameters (``sum(p.numel())``), its fixed positional table included."""
    d, c_out, n = float(hidden), float(c_in * (2 if learn_sigma else 1)), float((image // patch) ** 2)
    patch_embed = patch * patch * c_in * d + d
    t_mlp = 256 * d + d + d * d + d
    labels = (classes + 1) * d  # one extra row: the null label (class dropout > 0)
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + (d * 6 * d + 6 * d)
    final = (d * 2 * d + 2 * d) + (d * patch * patch * c_out + patch * patch * c_out)
    total = patch_embed + t_mlp + labels + depth * block + final + (n * d if pos_table else 0.0)
    return int(total)


def _count(name: str) -> int:
    model = get_model(name, num_classes=1000, learn_sigma=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return count_params(jax.eval_shape(model.init, jax.random.key(0), x, t, t)["params"])


@pytest.mark.parametrize("name", [f"dit_{s}_{p}" for s in SIZES for p in (2, 4, 8)])
def test_preset_parameter_counts_are_the_papers(name):
    """Every preset has the reference architecture's parameters, less its fixed positional table
    (a buffer there, computed here)."""
    _, size, patch = name.split("_")
    hidden, depth, _ = SIZES[size]
    assert name in PRESETS
    assert _count(name) == paper_count(hidden, depth, int(patch), pos_table=False)


def test_preset_sizes_round_to_the_papers_table():
    assert paper_count(1152, 28, 2) == 675_129_632  # the reference training script's printed count
    for name, millions in [("dit_xl_2", 675), ("dit_l_2", 458), ("dit_b_2", 130), ("dit_s_2", 33)]:
        assert round(_count(name) / 1e6) == millions, name


def test_positions_are_the_reference_codes_sincos_table():
    """The reference ``get_2d_sincos_pos_embed`` (meshgrid(grid_w, grid_h): column index first)."""
    dim, h, w = 16, 3, 5
    grid_w, grid_h = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))

    def one_d(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    want = np.concatenate([one_d(grid_w), one_d(grid_h)], axis=1)
    np.testing.assert_allclose(sincos_2d(dim, h, w), want, rtol=1e-6, atol=1e-7)
    # diffusers' rescaled grid (pos_grid=2 on a 4x4 grid): entry (1, 1) is at positions (0.5, 0.5).
    half = one_d(np.array([0.5]))
    np.testing.assert_allclose(sincos_2d(dim, 4, 4, pos_grid=2)[5], np.concatenate([half, half], axis=1)[0], rtol=1e-6)


# ------------------------------------------------------------------ adaLN-Zero


def test_a_fresh_dit_outputs_zero_and_every_block_is_the_identity():
    model = tiny(num_classes=3, learn_sigma=True)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    t, y = jnp.array([3, 700]), jnp.array([0, 2])
    params = model.init(jax.random.key(0), x, t, y)["params"]
    out = model.apply({"params": params}, x, t, y)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    h = jax.random.normal(jax.random.key(2), (2, 16, 16))
    c = jax.random.normal(jax.random.key(3), (2, 16))
    for i in range(model.depth):
        block = DiTBlock(num_heads=2)
        np.testing.assert_array_equal(np.asarray(block.apply({"params": params[f"block_{i}"]}, h, c)), np.asarray(h))
        moved = perturbed(params[f"block_{i}"])  # the same check fails once the modulations are not zero
        assert not np.allclose(np.asarray(block.apply({"params": moved}, h, c)), np.asarray(h))
    assert not np.allclose(np.asarray(model.apply({"params": perturbed(params)}, x, t, y)), 0.0)


def test_the_first_train_step_moves_only_the_final_linear_and_sampling_runs():
    """With the zero initialisation every gradient but the final linear's is zero, so Adam moves it alone;
    then the library's train step and sampler drive the DiT through the UNet's contract."""
    model = tiny(num_classes=3, learn_sigma=True, dropout=0.1)
    objective = objectives.Diffusion(schedule=schedules.linear_schedule(50), variance=True)
    state = create_train_state(jax.random.key(0), model, optax.adam(1e-2), (8, 8, 2), num_classes=3, label_dropout=0.2)
    batch = {"image": jax.random.uniform(jax.random.key(1), (4, 8, 8, 2), minval=-1, maxval=1),
             "index": jnp.arange(4), "label": jnp.array([0, 1, 2, 1])}
    new, metrics = jax.jit(train_step)(state, batch, jax.random.key(2), objective)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
    assert flat["final_linear/kernel"] and flat["final_linear/bias"]
    assert not any(v for k, v in flat.items() if not k.startswith("final_linear")), flat
    images = generate(objective, new.apply_fn, perturbed(new.params, 0.05), jax.random.key(3), jnp.array([0, 2]),
                      (8, 8, 2), sampler="ddim", num_steps=3, num_classes=3, guidance_scale=2.0)
    assert images.shape == (2, 8, 8, 2) and bool(jnp.all(jnp.isfinite(images)))


# ------------------------------------------------------------------ contract and options


def test_inputs_are_checked_naming_the_argument():
    model = tiny(num_classes=3)
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
    params = model.init(jax.random.key(0), x, t)["params"]
    cases = [
        (lambda: model.apply({"params": params}, x[0], t), "x must be"),
        (lambda: model.apply({"params": params}, x, t[:1]), "t must have shape"),
        (lambda: model.apply({"params": params}, jnp.zeros((2, 7, 8, 1)), t), "patch_size=2"),
        (lambda: model.apply({"params": params}, x, t, jnp.array([0, 4])), "y"),
        (lambda: model.apply({"params": params}, x, t, jnp.array([0])), "y must have shape"),
        (lambda: tiny().init(jax.random.key(0), x, t, jnp.array([0, 1])), "num_classes=None"),
        (lambda: get_model("dit_s_2", ch_mult=(1, 2)), "ch_mult"),
        (lambda: check_model_image_size(get_model("dit_s_4"), 30), "image size 30 is not divisible by patch_size=4"),
        (lambda: check_model_image_size(get_model("tiny"), 7), "image_size=7"),
    ]
    check_model_image_size(get_model("dit_s_4"), 32)
    for fn, words in cases:
        with pytest.raises(ValueError, match=words.replace("(", r"\(")):
            fn()


def test_the_null_label_is_used_without_labels():
    model = tiny(num_classes=3)
    x, t = jax.random.normal(jax.random.key(1), (2, 4, 4, 1)), jnp.array([5, 9])
    params = perturbed(model.init(jax.random.key(0), x, t)["params"])
    none = model.apply({"params": params}, x, t)
    np.testing.assert_array_equal(none, model.apply({"params": params}, x, t, jnp.array([3, 3])))
    assert not np.allclose(none, model.apply({"params": params}, x, t, jnp.array([0, 0])))


def test_two_time_inputs_add_a_second_timestep_mlp():
    model = tiny(time_inputs=2)
    x = jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
    t = jnp.array([[0.3, 0.1], [0.9, 0.5]])
    params = perturbed(model.init(jax.random.key(0), x, t)["params"])
    assert "t_embedder2_mlp_0" in params and "t_embedder2_mlp_0" not in tiny().init(
        jax.random.key(0), x, t[:, 0])["params"]
    a = model.apply({"params": params}, x, t)
    b = model.apply({"params": params}, x, t.at[:, 1].set(0.0))
    assert not np.allclose(a, b)
    with pytest.raises(ValueError, match="time_inputs=2"):
        model.apply({"params": params}, x, t[:, 0])


def test_bf16_remat_and_per_example_dropout():
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 2))
    t, y = jnp.array([1, 50, 999]), jnp.array([0, 1, 2])
    base = tiny(num_classes=3, learn_sigma=True)
    params = perturbed(base.init(jax.random.key(0), x, t, y)["params"])
    ref = base.apply({"params": params}, x, t, y)
    low = tiny(num_classes=3, learn_sigma=True, dtype=jnp.bfloat16).apply({"params": params}, x, t, y)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(low - ref)) / jnp.max(jnp.abs(ref))) < 5e-2

    def loss(model, p):
        return jnp.sum(model.apply({"params": p}, x, t, y) ** 2)

    g = jax.grad(lambda p: loss(base, p))(params)
    g_remat = jax.grad(lambda p: loss(tiny(num_classes=3, learn_sigma=True, remat=True), p))(params)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    drop = tiny(num_classes=3, learn_sigma=True, dropout=0.5)
    keys = jax.random.split(jax.random.key(7), 3)
    batch = drop.apply({"params": params}, x, t, y, train=True, dropout_keys=keys)
    alone = drop.apply({"params": params}, x[1:2], t[1:2], y[1:2], train=True, dropout_keys=keys[1:2])
    np.testing.assert_allclose(batch[1:2], alone, rtol=1e-4, atol=1e-4)
    assert not np.allclose(batch, ref)
    np.testing.assert_array_equal(drop.apply({"params": params}, x, t, y), ref)  # eval: no dropout


def test_the_nnx_bridge_wraps_a_dit():
    """``flax.nnx.bridge.ToNNX`` holds the Linen DiT with the Linen params tree (names and values)."""
    from flax import nnx

    model = tiny(num_classes=3)
    x, t = jax.random.normal(jax.random.key(1), (1, 4, 4, 1)), jnp.array([3])
    module = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0))
    module.lazy_init(x, t)
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    linen = model.init(jax.random.key(0), x, t)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(linen)
    moved = perturbed(params)
    nnx.update(module, nnx.State(jax.tree.map(nnx.Param, moved)))
    np.testing.assert_allclose(module(x, t), model.apply({"params": moved}, x, t), rtol=1e-6)


# ------------------------------------------------------------------ diffusers


@pytest.mark.parametrize("name,io", [("sigma_p2", "io"), ("sigma_p2", "io_large"), ("plain_p4", "io")])
def test_imported_dit_reproduces_diffusers(name, io):
    model, params = from_diffusers(os.path.join(FIXTURES, name))
    assert isinstance(model, DiT) and model.layout.freq_shift == 1
    data = np.load(os.path.join(FIXTURES, name, f"{io}.npz"))
    out = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))(params, data["x"], data["t"], data["y"])
    rel = float(jnp.max(jnp.abs(out - data["out"])) / np.max(np.abs(data["out"])))
    assert rel <= 1e-4, f"{name}/{io}: max relative error {rel:.2e}"
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        config = json.load(f)
    assert model.learn_sigma == (config["out_channels"] == 2 * config["in_channels"])


def test_the_layout_matters():
    """The fixtures would catch the original DiT's timestep frequencies or MLP epsilon in place of diffusers'."""
    for name, change in [("sigma_p2", {"freq_shift": 0.0}), ("plain_p4", {"mlp_norm_eps": 1e-6})]:
        model, params = from_diffusers(os.path.join(FIXTURES, name))
        data = np.load(os.path.join(FIXTURES, name, "io.npz"))
        out = model.clone(layout=model.layout._replace(**change)).apply({"params": params}, data["x"], data["t"],
                                                                         data["y"])
        assert float(jnp.max(jnp.abs(out - data["out"])) / np.max(np.abs(data["out"]))) > 1e-4, change
    model, params = from_diffusers(os.path.join(FIXTURES, "sigma_p2"))
    data = np.load(os.path.join(FIXTURES, "sigma_p2", "io_large.npz"))
    out = model.clone(layout=model.layout._replace(pos_grid=None)).apply({"params": params}, data["x"], data["t"],
                                                                          data["y"])
    assert float(jnp.max(jnp.abs(out - data["out"])) / np.max(np.abs(data["out"]))) > 1e-4


def _copy(tmp_path, name="sigma_p2"):
    folder = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), folder)
    return folder


def test_unsupported_settings_and_differing_embedder_copies_are_refused(tmp_path):
    for key, value in [("norm_type", "ada_norm"), ("activation_fn", "geglu"), ("norm_elementwise_affine", True),
                       ("attention_bias", False), ("cross_attention_dim", 8), ("num_embeds_ada_norm", None)]:
        folder = _copy(tmp_path / key)
        path = os.path.join(folder, "config.json")
        with open(path) as f:
            config = json.load(f)
        config[key] = value
        with open(path, "w") as f:
            json.dump(config, f)
        with pytest.raises(ValueError, match=key):
            from_diffusers(folder)
    folder = _copy(tmp_path / "copies")
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias"
    tensors[name] = tensors[name] + 1
    save_file(tensors, path)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        from_diffusers(folder)


def test_export_then_import_is_exact(tmp_path):
    model, params = from_diffusers(os.path.join(FIXTURES, "sigma_p2"))
    path = to_diffusers(model, params, str(tmp_path / "out"))
    with open(os.path.join(path, "config.json")) as f, open(os.path.join(FIXTURES, "sigma_p2", "config.json")) as g:
        assert {k: v for k, v in json.load(f).items() if k != "_diffusers_version"} == {
            k: v for k, v in json.load(g).items() if k != "_diffusers_version"}
    written = load_file(os.path.join(path, "diffusion_pytorch_model.safetensors"))
    original = load_file(os.path.join(FIXTURES, "sigma_p2", "diffusion_pytorch_model.safetensors"))
    assert written.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(written[k], original[k])
    again, params2 = from_diffusers(path)
    assert again == model
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_native_layout_does_not_export(tmp_path):
    model = tiny(num_classes=3)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
    with pytest.raises(ValueError, match="freq_shift"):
        to_diffusers(model, params, str(tmp_path / "a"), sample_size=8)
    ok = tiny(num_classes=3, layout=DiTLayout(freq_shift=1.0, mlp_norm_eps=1e-5))
    to_diffusers(ok, params, str(tmp_path / "b"), sample_size=8)
    back, _ = from_diffusers(str(tmp_path / "b"))
    assert back.layout == DiTLayout(freq_shift=1.0, mlp_norm_eps=1e-5, pos_grid=4)
    with pytest.raises(ValueError, match="time_inputs"):
        to_diffusers(ok.clone(time_inputs=2), params, str(tmp_path / "c"), sample_size=8)


def test_jit_dit_contract_matches_unet_signature():
    """The same keyword-only call as the UNet's: ``train=`` and ``dropout_keys=``."""
    import inspect

    from jaxdiff.models import UNet

    assert list(inspect.signature(DiT.__call__).parameters) == list(inspect.signature(UNet.__call__).parameters)
    assert isinstance(get_model("dit_b_4"), nn.Module)


def test_the_training_job_builds_a_dit_from_its_config():
    from jaxdiff.configs import digits_dit
    from jaxdiff.models.dit import DiT
    from jaxdiff.training.setup import resolve

    run = resolve(digits_dit.get_config())
    assert isinstance(run.model, DiT) and run.model.patch_size == 2 and run.model.num_classes == 10

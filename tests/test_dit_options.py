"""The DiT's optional block choices (``norm``, ``qk_norm``, ``mlp``, ``rope``; jaxdiff.models.dit).

References: float64 NumPy written from the formulas (RMSNorm; 2-D RoPE as explicit 2x2 rotations
per channel pair, and its relative-position property; a whole DiT block with attention, SwiGLU and
GELU spelled out); adaLN-Zero's zero output at initialisation with every option.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import DiT, DiTLayout, get_model, to_diffusers
from jaxdiff.models.dit import DiTBlock, RMSNorm, apply_rope, rope_2d_angles, swiglu_hidden


def tiny(**kw):
    return DiT(**{"patch_size": 2, "hidden_size": 16, "depth": 2, "num_heads": 2, **kw})


def perturbed(params, scale=0.3, seed=0):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


# ------------------------------------------------------------------ float64 references


def np_rms(x, eps, scale=None):
    y = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps)
    return y if scale is None else y * scale


def np_layernorm(x, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


def np_rotation(head_dim, i, j):
    """The ``[head_dim, head_dim]`` block-diagonal rotation of RoPE at grid position (i, j)."""
    quarter = head_dim // 4
    r = np.zeros((head_dim, head_dim))
    for p in range(head_dim // 2):
        pos, k = (i, p) if p < quarter else (j, p - quarter)
        a = pos * 10000.0 ** (-k / quarter)
        r[2 * p:2 * p + 2, 2 * p:2 * p + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    return r


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_block(p, h, c, heads, grid, *, norm, qk_norm, mlp, rope):
    """One DiT block in float64 from its formulas."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    b, n, d = h.shape
    hd = d // heads

    def dense(name, x):
        return x @ p[name]["kernel"] + p[name]["bias"]

    def nrm(x, eps):
        return np_rms(x, eps) if norm == "rmsnorm" else np_layernorm(x, eps)

    mod = dense("adaLN_modulation", np_silu(c))[:, None, :]
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, axis=-1)
    a = nrm(h, 1e-6) * (1 + scale1) + shift1
    qkv = dense("qkv", a).reshape(b, n, 3, heads, hd)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if qk_norm:
        q, k = np_rms(q, 1e-6, p["q_norm"]["scale"]), np_rms(k, 1e-6, p["k_norm"]["scale"])
    if rope:
        rots = np.stack([np_rotation(hd, i, j) for i in range(grid[0]) for j in range(grid[1])])  # [N, hd, hd]
        q, k = np.einsum("nde,bnhe->bnhd", rots, q), np.einsum("nde,bnhe->bnhd", rots, k)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d)
    h = h + gate1 * dense("proj", att)
    m = nrm(h, 1e-6) * (1 + scale2) + shift2
    if mlp == "swiglu":
        gate, value = np.split(dense("fc1", m), 2, axis=-1)
        m = np_silu(gate) * value
    else:
        m = np_gelu_tanh(dense("fc1", m))
    return h + gate2 * dense("fc2", m)


# ------------------------------------------------------------------ the pieces


def test_rmsnorm_is_the_formula():
    x = np.random.default_rng(0).standard_normal((2, 5, 8)) * 3 + 1
    out = RMSNorm(1e-6).apply({}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), np_rms(x, 1e-6), rtol=1e-5, atol=1e-6)
    scale = np.linspace(0.5, 2.0, 8)
    out = RMSNorm(1e-2, use_scale=True).apply({"params": {"scale": jnp.asarray(scale, jnp.float32)}},
                                               jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), np_rms(x, 1e-2, scale), rtol=1e-5, atol=1e-6)


def test_rope_rotates_each_pair_by_the_formula():
    head_dim, gh, gw = 8, 3, 4
    x = np.random.default_rng(1).standard_normal((2, gh * gw, 3, head_dim))  # [B, N, heads, hd]
    out = np.asarray(apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(rope_2d_angles(head_dim, gh, gw))))
    want = np.stack([np.einsum("de,bhe->bhd", np_rotation(head_dim, i, j), x[:, i * gw + j])
                     for i in range(gh) for j in range(gw)], axis=1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    with pytest.raises(ValueError, match="head_dim must be divisible by 4"):
        rope_2d_angles(6, 2, 2)


def test_rope_scores_depend_only_on_the_offset():
    """<R_m q, R_n k> is q^T R_(n - m) k: equal for every pair of grid positions with the same offset."""
    head_dim, g = 16, 7
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal(head_dim), rng.standard_normal(head_dim)
    angles = jnp.asarray(rope_2d_angles(head_dim, g, g))
    rq = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(q, jnp.float32), (g * g, 1, head_dim)), angles))[:, 0]
    rk = np.asarray(apply_rope(jnp.broadcast_to(jnp.asarray(k, jnp.float32), (g * g, 1, head_dim)), angles))[:, 0]

    def score(m, n):
        return float(rq[m[0] * g + m[1]] @ rk[n[0] * g + n[1]])

    for m, n, shift in [((1, 2), (3, 0), (2, 3)), ((0, 0), (6, 5), (0, 1)), ((4, 4), (4, 4), (-3, 2))]:
        moved = score((m[0] + shift[0], m[1] + shift[1]), (n[0] + shift[0], n[1] + shift[1]))
        want = q @ np_rotation(head_dim, n[0] - m[0], n[1] - m[1]) @ k
        np.testing.assert_allclose([score(m, n), moved], [want, want], rtol=1e-4, atol=1e-4)
    assert abs(score((1, 2), (3, 0)) - score((1, 2), (3, 1))) > 1e-3  # the offset does matter


def test_swiglu_width_is_lightningdits():
    assert swiglu_hidden(384, 4.0) == 1024 and swiglu_hidden(1152, 4.0) == 3072 and swiglu_hidden(96, 4.0) == 256


@pytest.mark.parametrize("norm,qk_norm,mlp,rope", [
    ("layernorm", False, "gelu", False), ("rmsnorm", False, "gelu", False), ("layernorm", True, "gelu", False),
    ("layernorm", False, "swiglu", False), ("layernorm", False, "gelu", True), ("rmsnorm", True, "swiglu", True),
])
def test_block_is_the_float64_formula(norm, qk_norm, mlp, rope):
    d, heads, grid = 16, 2, (2, 3)
    block = DiTBlock(heads, norm=norm, qk_norm=qk_norm, mlp=mlp, rope_grid=grid if rope else None)
    rng = np.random.default_rng(3)
    h, c = rng.standard_normal((2, 6, d)), rng.standard_normal((2, d))
    params = perturbed(block.init(jax.random.key(0), jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32))["params"])
    if mlp == "swiglu":
        assert params["fc1"]["kernel"].shape == (d, 2 * swiglu_hidden(d, 4.0))
    assert ("q_norm" in params) == qk_norm
    out = block.apply({"params": params}, jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32))
    want = np_block(params, h, c, heads, grid, norm=norm, qk_norm=qk_norm, mlp=mlp, rope=rope)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


# ------------------------------------------------------------------ the model


@pytest.mark.parametrize("option", [{"norm": "rmsnorm"}, {"qk_norm": True}, {"mlp": "swiglu"}, {"rope": True},
                                    {"norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "rope": True}])
def test_the_model_runs_with_each_option_and_is_zero_at_init(option):
    model = tiny(num_classes=3, learn_sigma=True, **option)
    x = jax.random.normal(jax.random.key(1), (2, 8, 4, 3))  # a 4x2 patch grid: rows and columns differ
    t, y = jnp.array([3, 700]), jnp.array([0, 2])
    params = model.init(jax.random.key(0), x, t, y)["params"]
    out = jax.jit(model.apply)({"params": params}, x, t, y)
    assert out.shape == (2, 8, 4, 6) and np.all(np.asarray(out) == 0.0)
    moved = model.apply({"params": perturbed(params)}, x, t, y)
    assert bool(jnp.all(jnp.isfinite(moved))) and not np.allclose(np.asarray(moved), 0.0)
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y) ** 2))(perturbed(params))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_rope_makes_the_model_see_positions_beyond_the_sincos_table():
    """With rope the tokens' relative positions reach attention itself: a model whose absolute table
    is the same answers differently once rope is on (same parameters: rope adds none)."""
    x = jax.random.normal(jax.random.key(1), (1, 8, 8, 1))
    t = jnp.array([10])
    params = perturbed(tiny().init(jax.random.key(0), x, t)["params"])
    assert jax.tree.structure(params) == jax.tree.structure(tiny(rope=True).init(jax.random.key(0), x, t)["params"])
    a, b = tiny().apply({"params": params}, x, t), tiny(rope=True).apply({"params": params}, x, t)
    assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_bad_options_are_refused_naming_the_field():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,))
    cases = [({"norm": "batchnorm"}, "norm must be one of"), ({"mlp": "relu"}, "mlp must be one of"),
             ({"rope": True, "hidden_size": 24, "num_heads": 4}, "rope=True needs"),
             ({"qk_norm": 1}, "qk_norm must be a bool")]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            tiny(**kw).init(jax.random.key(0), x, t)


@pytest.mark.parametrize("field,value", [("norm", "rmsnorm"), ("qk_norm", True), ("mlp", "swiglu"), ("rope", True)])
def test_export_to_diffusers_refuses_each_option(tmp_path, field, value):
    model = tiny(num_classes=3, layout=DiTLayout(freq_shift=1.0, mlp_norm_eps=1e-5), **{field: value})
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        to_diffusers(model, params, str(tmp_path / "out"), sample_size=8)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_presets_take_the_options():
    for norm, qk, mlp, rope in itertools.product(("layernorm", "rmsnorm"), (False, True), ("gelu",), (False, True)):
        model = get_model("dit_digits", norm=norm, qk_norm=qk, mlp=mlp, rope=rope)
        assert (model.norm, model.qk_norm, model.mlp, model.rope) == (norm, qk, mlp, rope)
    plain = get_model("dit_s_2")
    assert (plain.norm, plain.qk_norm, plain.mlp, plain.rope) == ("layernorm", False, "gelu", False)


def test_config_model_fields_set_the_options_of_a_dit_preset_only():
    from jaxdiff.configs import digits_dit
    from jaxdiff.training.setup import resolve, validate_config

    config = digits_dit.get_config()
    config.model.norm, config.model.qk_norm, config.model.mlp, config.model.rope = "rmsnorm", True, "swiglu", True
    model = resolve(config).model
    assert isinstance(model, DiT) and (model.norm, model.qk_norm, model.mlp, model.rope) == (
        "rmsnorm", True, "swiglu", True)
    plain = resolve(digits_dit.get_config()).model
    assert (plain.norm, plain.qk_norm, plain.mlp, plain.rope) == ("layernorm", False, "gelu", False)
    for field, value, words in [("norm", "batchnorm", "config.model.norm='batchnorm'"),
                                ("mlp", "relu", "config.model.mlp='relu'")]:
        bad = digits_dit.get_config()
        bad.model[field] = value
        with pytest.raises(ValueError, match=words):
            validate_config(bad)
    unet = digits_dit.get_config()
    unet.model.preset, unet.model.rope = "digits", True
    with pytest.raises(ValueError, match="config.model.rope=True: is a DiT block option"):
        validate_config(unet)


def test_meanflow_trains_a_dit_with_every_option_through_its_jvp():
    """MeanFlow's jvp runs through the DiT's second time input and every block option; with the
    zero initialisation the first step moves the final linear alone (every other gradient is 0)."""
    import optax

    from jaxdiff import objectives
    from jaxdiff.training.state import create_train_state
    from jaxdiff.training.step import train_step

    objective = objectives.MeanFlow()
    model = tiny(num_classes=3, time_inputs=objective.time_inputs, norm="rmsnorm", qk_norm=True, mlp="swiglu",
                 rope=True)
    state = create_train_state(jax.random.key(0), model, optax.adam(1e-2), (8, 8, 2), num_classes=3)
    batch = {"image": jax.random.uniform(jax.random.key(1), (4, 8, 8, 2), minval=-1, maxval=1),
             "index": jnp.arange(4), "label": jnp.array([0, 1, 2, 1])}
    new, metrics = jax.jit(train_step)(state, batch, jax.random.key(2), objective)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new.params)
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(moved)[0]}
    assert flat["final_linear/kernel"] and not any(v for k, v in flat.items() if not k.startswith("final_linear"))

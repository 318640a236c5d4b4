"""Tests for jaxdiff.models: shapes, the DDPM parameter count, and NumPy references."""

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.models import (
    PRESETS,
    UNet,
    check_image_size,
    count_params,
    ddpm_cifar10,
    get_model,
    small,
    timestep_embedding,
    tiny,
)
from jaxdiff.models.layers import AttnBlock, num_groups

B = 2


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


def _inputs(size=8, channels=1, batch=B):
    x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
    t = jnp.arange(batch, dtype=jnp.float32) * 100 + 7
    return x, t


def _random_params(model, *args, seed=0):
    """Random parameters of ``model``'s shapes, without compiling ``init``.

    Unlike ``init``, this makes the zero-initialised layers (output conv, attention output)
    non-zero, so the output depends on every input.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        elif name == "embedding":
            value = rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@partial(jax.jit, static_argnames=("model", "train"))
def _run(model, params, x, t, y=None, seed=0, train=False):
    rngs = {"dropout": jax.random.key(seed)}
    return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)


def _max_diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


# Tests share models (and so compilations): XLA compiles are what makes these tests slow.
COND = tiny(num_classes=3)
# One level (no resampling, no attention) with dropout: cheaper to compile and run eagerly.
DROP = tiny(ch_mult=(1,), attn_resolutions=(), dropout=0.5)


@pytest.fixture(scope="module")
def cond_setup():
    x, t = _inputs()
    y = jnp.array([0, 1])
    return _random_params(COND, x, t, y), x, t, y


# --- timestep embedding ---------------------------------------------------------------------


def _np_timestep_embedding(t, dim, max_period=10000.0):
    """DDPM / Transformer sinusoids in float64: sin(t / P^(i/(half-1))), cos(...), i < half."""
    t = np.asarray(t, np.float64)
    half = dim // 2
    inv_wavelength = max_period ** (-np.arange(half, dtype=np.float64) / (half - 1))
    angles = np.outer(t, inv_wavelength)
    emb = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    if dim % 2:
        emb = np.concatenate([emb, np.zeros((len(t), 1))], axis=1)
    return emb


@pytest.mark.parametrize("dim", [4, 7, 32, 128])
@pytest.mark.parametrize("t", [[0, 1, 17, 999], [0.0, 0.25, 5.5, 999.9]])
def test_timestep_embedding_matches_numpy(t, dim):
    t_arr = jnp.asarray(t)
    got = jax.jit(timestep_embedding, static_argnums=1)(t_arr, dim)
    assert got.shape == (len(t), dim)
    assert got.dtype == jnp.float32
    # float32 angles up to ~1000 rad carry ~1e-4 absolute error.
    np.testing.assert_allclose(got, _np_timestep_embedding(t, dim), atol=3e-4, rtol=0)


def test_timestep_embedding_max_period():
    t = jnp.array([3, 50])
    got = timestep_embedding(t, 16, max_period=100.0)
    np.testing.assert_allclose(got, _np_timestep_embedding([3, 50], 16, 100.0), atol=1e-5)


def test_timestep_embedding_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        timestep_embedding(jnp.zeros((2, 1)), 8)


# --- layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "channels,groups",
    [(128, 32), (256, 32), (64, 32), (96, 32), (48, 24), (40, 20), (32, 16), (16, 8), (7, 1)],
)
def test_num_groups(channels, groups):
    assert num_groups(channels) == groups


def _np_group_norm(x, groups, scale, bias, eps=1e-6):
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    return ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attn_block_matches_numpy(num_heads):
    c = 16
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, c))
    block = AttnBlock(num_heads=num_heads)
    p = _random_params(block, x)
    got = jax.jit(block.apply)({"params": p}, x)

    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    xn = np.asarray(x, np.float64)
    h = _np_group_norm(xn, 8, p64["norm"]["scale"], p64["norm"]["bias"]).reshape(2, 16, c)
    q, k, v = (h @ p64[n]["kernel"] + p64[n]["bias"] for n in "qkv")
    d = c // num_heads
    out = np.zeros_like(q)
    for n in range(num_heads):
        sl = slice(n * d, (n + 1) * d)
        logits = q[:, :, sl] @ k[:, :, sl].transpose(0, 2, 1) / math.sqrt(d)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, :, sl] = w @ v[:, :, sl]
    out = out @ p64["proj_out"]["kernel"] + p64["proj_out"]["bias"]
    want = xn + out.reshape(xn.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_attn_block_bf16_takes_logits_and_softmax_in_float32():
    """With bf16 compute the q k^T logits leave the matmul as float32 and the softmax's exp runs in float32."""
    x = jnp.zeros((2, 4, 4, 16), jnp.bfloat16)
    block = AttnBlock(num_heads=2, dtype=jnp.bfloat16)
    params = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    jaxpr = jax.make_jaxpr(lambda p: block.apply({"params": p}, x))(params)

    def eqns(jx):
        for e in jx.eqns:
            yield e
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from eqns(sub)

    found = list(eqns(jaxpr.jaxpr))
    # The logits are the only product with B * heads * HW * HW = 1024 entries (the projections have 512).
    logits = [e for e in found if e.primitive.name == "dot_general" and e.outvars[0].aval.size == 2 * 2 * 16 * 16]
    assert logits and all(e.outvars[0].aval.dtype == jnp.float32 for e in logits)
    exps = [e for e in found if e.primitive.name == "exp"]
    assert exps and all(e.outvars[0].aval.dtype == jnp.float32 for e in exps)


# --- presets, shapes and parameter counts ---------------------------------------------------


def test_ddpm_cifar10_param_count():
    """Ho et al. (2020) report 35.7M parameters for the CIFAR-10 model."""
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    shapes = jax.eval_shape(ddpm_cifar10().init, jax.random.key(0), x, t)["params"]
    assert abs(count_params(shapes) - 35.7e6) / 35.7e6 < 0.01
    # DDPM order: 2 blocks x 4 levels down, 2 in the middle, 3 x 4 up; attention at 16x16.
    names = list(shapes)
    assert sum("_block_" in n for n in names) == 8 + 2 + 12
    assert sum("_attn_" in n for n in names) == 2 + 1 + 3


def test_ddpm_cifar10_output_shape():
    model = ddpm_cifar10(learn_sigma=True)
    x, t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
    out = jax.eval_shape(model.apply, variables, x, t)
    assert out.shape == (2, 32, 32, 6) and out.dtype == jnp.float32


# `tiny` runs for real in the tests below (as COND).
@pytest.mark.parametrize("name,size", [("small", 28), ("digits", 8)])
def test_preset_output_shapes(name, size):
    model = get_model(name)
    x, t = _inputs(size)
    out = _run(model, _random_params(model, x, t), x, t)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    "kwargs,c_out",
    [
        ({"learn_sigma": True}, 2),
        ({"out_channels": 3}, 3),
        ({"out_channels": 3, "learn_sigma": True}, 6),
    ],
)
def test_learn_sigma_and_out_channels(kwargs, c_out):
    x, t = _inputs()
    out, _ = jax.eval_shape(tiny(**kwargs).init_with_output, jax.random.key(0), x, t)
    assert out.shape == (B, 8, 8, c_out)


def test_params_are_float32_in_bf16_model():
    x, t = _inputs()
    shapes = jax.eval_shape(tiny(dtype=jnp.bfloat16).init, jax.random.key(0), x, t)
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


def test_scale_shift_and_heads():
    x, t = _inputs()
    model = tiny(scale_shift=True, num_heads=2)
    params = _random_params(model, x, t)
    # Nichol & Dhariwal: the embedding projects to a scale and a shift per channel.
    assert params["down_0_block_0"]["temb_proj"]["kernel"].shape == (4 * 16, 2 * 16)
    out = _run(model, params, x, t)
    assert out.shape == x.shape
    assert _max_diff(out, _run(model, params, x, t + 0.5)) > 1e-3


def test_count_params():
    tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), jax.ShapeDtypeStruct((5, 1), jnp.float32)]}
    assert count_params(tree) == 15


def test_get_model():
    dits = {f"dit_{s}_{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)}
    assert set(PRESETS) == {"ddpm_cifar10", "small", "digits", "tiny", "dit_digits"} | dits
    model = get_model("small", num_classes=10)
    assert isinstance(model, UNet) and model.num_classes == 10 and model.ch == small().ch
    with pytest.raises(ValueError, match="tiny"):
        get_model("nope")


# --- conditioning on t and y ----------------------------------------------------------------


def test_float_timesteps(cond_setup):
    params, x, _, y = cond_setup
    out_int = _run(COND, params, x, jnp.array([5, 5], jnp.int32), y)
    out_float = _run(COND, params, x, jnp.array([5.0, 5.0]), y)
    out_half = _run(COND, params, x, jnp.array([5.5, 5.5]), y)
    np.testing.assert_allclose(out_float, out_int, rtol=1e-6, atol=1e-6)
    assert _max_diff(out_half, out_int) > 1e-3


def test_class_labels(cond_setup):
    params, x, t, y = cond_setup
    assert params["class_emb"]["embedding"].shape == (3 + 1, 4 * 16)
    other = _run(COND, params, x, t, jnp.array([2, 2]))
    assert _max_diff(_run(COND, params, x, t, y), other) > 1e-3
    null = _run(COND, params, x, t, jnp.array([3, 3]))
    np.testing.assert_allclose(_run(COND, params, x, t), null, rtol=1e-6, atol=1e-6)


def test_labels_on_unconditional_model_raise():
    x, t = _inputs()
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(tiny().init, jax.random.key(0), x, t, jnp.array([0, 1]))


# --- dropout, validation, transformations ---------------------------------------------------


@pytest.fixture(scope="module")
def drop_setup():
    x, t = _inputs()
    return _random_params(DROP, x, t), x, t


def test_dropout(drop_setup):
    params, x, t = drop_setup
    k1, k2 = 1, 2
    eval_1 = _run(DROP, params, x, t, None, k1)
    np.testing.assert_array_equal(eval_1, _run(DROP, params, x, t, None, k2))
    train_1 = _run(DROP, params, x, t, None, k1, train=True)
    np.testing.assert_array_equal(train_1, _run(DROP, params, x, t, None, k1, train=True))
    assert _max_diff(train_1, _run(DROP, params, x, t, None, k2, train=True)) > 1e-3
    assert _max_diff(train_1, eval_1) > 1e-3


@pytest.mark.parametrize(
    "preset,shape,bad",
    [("tiny", (2, 7, 7, 1), 7), ("tiny", (2, 8, 5, 1), 5), ("ddpm_cifar10", (2, 12, 12, 3), 12)],
)
def test_bad_image_size_raises(preset, shape, bad):
    t = jnp.zeros((shape[0],), jnp.int32)
    with pytest.raises(ValueError, match=f"image_size={bad}"):
        jax.eval_shape(get_model(preset).init, jax.random.key(0), jnp.zeros(shape), t)


def test_check_image_size():
    check_image_size(32, (1, 2, 2, 2))
    check_image_size(28, (1, 2, 2))
    with pytest.raises(ValueError, match=r"image_size=30.*ch_mult=\(1, 2, 2, 2\)"):
        check_image_size(30, (1, 2, 2, 2))


def test_bad_input_shapes_raise():
    x, t = _inputs()
    init = partial(jax.eval_shape, tiny().init, jax.random.key(0))
    with pytest.raises(ValueError, match="x must be"):
        init(x[0], t)
    with pytest.raises(ValueError, match="t must"):
        init(x, t[:, None])
    with pytest.raises(ValueError, match="t must"):
        init(x, t[:1])


def test_jit_equals_eager(drop_setup):
    params, x, t = drop_setup
    eager = DROP.apply({"params": params}, x, t)
    np.testing.assert_allclose(_run(DROP, params, x, t), eager, rtol=1e-5, atol=1e-5)


def test_bfloat16_close_to_float32(cond_setup):
    params, x, t, y = cond_setup
    ref = _run(COND, params, x, t, y)
    out = _run(COND.clone(dtype=jnp.bfloat16), params, x, t, y)
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


def test_remat_same_outputs_and_grads(drop_setup):
    params, x, t = drop_setup
    plain, remat = DROP, DROP.clone(remat=True)
    assert jax.tree.structure(params) == jax.tree.structure(_random_params(remat, x, t))

    @partial(jax.jit, static_argnums=0)
    def loss_and_grad(model, params):
        def loss(p):
            out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(7)})
            return jnp.mean(out**2)

        return jax.value_and_grad(loss)(params)

    l0, g0 = loss_and_grad(plain, params)
    l1, g1 = loss_and_grad(remat, params)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)

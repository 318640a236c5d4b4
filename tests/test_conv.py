"""The per-tap convolution (jaxdiff.models.conv) against a float64 NumPy convolution.

The reference gradients use only the NumPy forward pass: a convolution is linear in each
argument, so ``dL/dw[i, j, c, d]`` for ``L = sum(ct * conv(x, w))`` is ``L`` evaluated at the
basis kernel ``e_{ijcd}`` (and likewise for ``x``), computed in float64.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxdiff.models import get_model
from jaxdiff.models.conv import CONV_BACKWARDS, conv_for, conv_general_dilated
from jaxdiff.models.layers import ResBlock

DN = ("NHWC", "HWIO", "NHWC")


def np_conv(x, w, pads):
    """float64 stride-1 NHWC/HWIO cross-correlation with explicit ``pads = ((top, bottom), (left, right))``."""
    (top, bottom), (left, right) = pads
    xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw = w.shape[:2]
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
    for bb, h, ww in itertools.product(range(x.shape[0]), range(ho), range(wo)):
        out[bb, h, ww] = np.tensordot(xp[bb, h:h + kh, ww:ww + kw], w, axes=3)
    return out


def basis_grad(f, a):
    """Gradient of the linear scalar function ``f`` at any point: its values on the basis."""
    g = np.zeros(a.shape)
    for idx in np.ndindex(a.shape):
        e = np.zeros(a.shape)
        e[idx] = 1.0
        g[idx] = f(e)
    return g


# (3, 4) channels: the weight gradient takes one matmul per kernel column; (6, 2): one per tap.
@pytest.mark.parametrize("channels", [(3, 4), (6, 2)])
@pytest.mark.parametrize("pads, kernel", [
    ("SAME", (3, 3)), ("VALID", (3, 3)), (((1, 0), (2, 1)), (3, 3)), ("SAME", (1, 1)), ("SAME", (3, 1)),
])
def test_forward_and_gradients_match_float64_numpy(pads, kernel, channels):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, channels[0]))
    w = rng.normal(size=(*kernel, *channels))
    explicit = lax.padtype_to_pads(x.shape[1:3], kernel, (1, 1), pads) if isinstance(pads, str) else pads
    y_ref = np_conv(x, w, explicit)
    ct = rng.normal(size=y_ref.shape)

    def loss(xx, ww):
        return jnp.sum(ct * conv_general_dilated(xx, ww, (1, 1), pads, dimension_numbers=DN))

    y = conv_general_dilated(jnp.float32(x), jnp.float32(w), (1, 1), pads, dimension_numbers=DN)
    dx, dw = jax.grad(loss, (0, 1))(jnp.float32(x), jnp.float32(w))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, basis_grad(lambda e: np.sum(ct * np_conv(x, e, explicit)), w), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, basis_grad(lambda e: np.sum(ct * np_conv(e, w, explicit)), x), rtol=1e-5, atol=1e-4)


def test_forward_mode_matches_xla():
    """jax.jvp works (the likelihood's divergence needs it) and equals XLA's, in x and in w."""
    rng = np.random.default_rng(2)
    x, w = jnp.float32(rng.normal(size=(2, 6, 6, 3))), jnp.float32(rng.normal(size=(3, 3, 3, 4)))
    dx, dw = jnp.float32(rng.normal(size=x.shape)), jnp.float32(rng.normal(size=w.shape))

    def jvps(conv):
        def f(a, b):
            return conv(a, b, (1, 1), "SAME", dimension_numbers=DN)

        return jax.jvp(f, (x, w), (dx, dw)) + jax.jvp(lambda a: f(a, w), (x,), (dx,))

    for a, b in zip(jvps(conv_general_dilated), jvps(lax.conv_general_dilated), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_other_convolutions_are_lax_itself():
    """Strided or grouped convolutions are passed through: same values and gradients as lax."""
    rng = np.random.default_rng(1)
    x, w = jnp.float32(rng.normal(size=(2, 8, 8, 4))), jnp.float32(rng.normal(size=(3, 3, 2, 4)))
    for kwargs in ({"window_strides": (2, 2)}, {"window_strides": (1, 1), "feature_group_count": 2}):
        ww = w if "feature_group_count" in kwargs else jnp.concatenate([w, w], axis=2)

        def f(conv, xx, ww, kwargs=kwargs):
            return jnp.sum(jnp.sin(conv(xx, ww, padding="SAME", dimension_numbers=DN, **kwargs)))

        a = jax.grad(f, (1, 2))(lax.conv_general_dilated, x, ww)
        b = jax.grad(f, (1, 2))(conv_general_dilated, x, ww)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)


def test_bfloat16_gradients_keep_the_dtype():
    x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
    w = jnp.ones((3, 3, 2, 2), jnp.bfloat16)
    dx, dw = jax.grad(lambda a, b: jnp.sum(conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN)
                                           .astype(jnp.float32)), (0, 1))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    # Interior weight taps see all 16 positions, corner taps 9 (float64 count).
    np.testing.assert_array_equal(np.asarray(dw[1, 1, 0, 0], np.float64), 16.0)
    np.testing.assert_array_equal(np.asarray(dw[0, 0, 0, 0], np.float64), 9.0)


def test_resblock_gradients_equal_xlas():
    """A ResBlock (two 3x3 convs and a 1x1 shortcut) through flax: the 'taps' gradients equal XLA's own
    (an independent implementation)."""
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
    temb = jax.random.normal(jax.random.key(1), (3, 16))
    grads = {}
    for conv in (conv_general_dilated, None):
        block = ResBlock(6, conv=conv)
        params = block.init(jax.random.key(2), x, temb)["params"]
        params = jax.tree.map(lambda p: p + 0.05, params)  # a non-zero last conv: every layer gets a gradient

        def loss(p, x, block=block):
            return jnp.sum(jnp.sin(block.apply({"params": p}, x, temb)))

        grads[conv] = jax.jit(jax.grad(loss, (0, 1)))(params, x)
    for a, b in zip(jax.tree.leaves(grads[conv_general_dilated]), jax.tree.leaves(grads[None]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))


def test_the_unet_routes_its_convolutions_by_conv_backward():
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)

    def custom_rules(backward):
        model = get_model("tiny", conv_backward=backward)
        params = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
        jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t))(params)
        return str(jaxpr).count("custom_jvp_call")

    assert custom_rules("xla") == 0
    assert custom_rules(get_model("tiny").conv_backward) == 0  # the default, on every backend
    # tiny (ch_mult (1, 2), one ResBlock per level): conv_in and conv_out, 2 in each of its 8 ResBlocks
    # (2 down, 2 middle, 4 up), the 1x1 shortcuts of the 5 that change width, the upsampling conv;
    # not the strided downsampling conv.
    assert custom_rules("taps") == 2 + 2 * 8 + 5 + 1


def test_conv_backward_choice():
    assert conv_for("taps") is conv_general_dilated
    assert conv_for("xla") is None
    assert CONV_BACKWARDS == ("xla", "taps")
    for removed in ("auto", "fast"):  # no backend-dependent default
        with pytest.raises(ValueError, match="conv_backward must be one of"):
            conv_for(removed)
    assert get_model("tiny").conv_backward == "xla"

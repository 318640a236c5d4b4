"""Tests for jaxdiff.models.nnx: the NNX module against the Linen UNet it wraps.

The reference is the Linen ``UNet.apply`` on the same parameters (jitted with ``jax.jit``,
outside any NNX machinery); parameters are random for every leaf, so the zero-initialised
output layer does not hide a difference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxdiff
from jaxdiff.losses import diffusion_loss
from jaxdiff.models import (
    PRESETS,
    from_linen_params,
    get_model,
    nnx_unet,
    to_linen_params,
)
from jaxdiff.models.nnx import NNXUNet
from jaxdiff.oracle import default_mixture
from jaxdiff.samplers import sample

# The smallest input each preset accepts that still has every layer (attention included).
PRESET_SHAPES = {"tiny": (2, 8, 8, 1), "digits": (2, 8, 8, 1), "small": (1, 28, 28, 1), "ddpm_cifar10": (1, 16, 16, 3)}


def _random_params(unet, shape, seed=0):
    """Random values for every parameter of ``unet`` at input ``shape`` (no init compiled)."""
    x, t = jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32)
    shapes = jax.eval_shape(unet.init, jax.random.key(0), x, t)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs(shape, num_classes=None):
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.arange(shape[0], dtype=jnp.int32) * 300 + 7
    y = None if num_classes is None else jnp.arange(shape[0], dtype=jnp.int32) % num_classes
    return x, t, y


@nnx.jit(static_argnames="train")
def _nnx_forward(model, x, t, y, train=None):
    return model(x, t, y, train=train)


@jax.jit(static_argnames=("unet", "train"))
def _linen_forward(unet, params, x, t, y, train=False, dropout_key=None):
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    return unet.apply({"params": params}, x, t, y, train=train, rngs=rngs)


def _shapes(tree):
    return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


def _check_preset(name):
    shape = PRESET_SHAPES[name]
    unet = get_model(name)
    # The bridge's lazily initialised parameter tree is the Linen one (abstractly: no compile).
    abstract = nnx.eval_shape(lambda: nnx_unet(name, rngs=nnx.Rngs(0), sample_shape=shape))
    linen_shapes = jax.eval_shape(unet.init, jax.random.key(0), jnp.zeros(shape), jnp.zeros(shape[:1], jnp.int32))
    assert _shapes(to_linen_params(abstract)) == _shapes(linen_shapes["params"])
    # One forward on the same random parameters.
    params = _random_params(unet, shape)
    model = from_linen_params(name, params, sample_shape=shape, deterministic=True)
    x, t, _ = _inputs(shape)
    out, ref = _nnx_forward(model, x, t, None), _linen_forward(unet, params, x, t, None)
    assert out.shape == ref.shape == shape
    assert float(jnp.std(ref)) > 0.1
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny", "digits"])
def test_preset_matches_linen(name):
    _check_preset(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["small", "ddpm_cifar10"])
def test_big_preset_matches_linen(name):
    _check_preset(name)


def test_every_unet_preset_is_covered():
    assert set(PRESET_SHAPES) == {name for name, preset in PRESETS.items() if preset.func is jaxdiff.models.UNet}


def test_lazy_init_on_first_call_under_jit():
    model = nnx_unet("tiny", rngs=nnx.Rngs(params=3, dropout=4))
    assert not model.initialized
    x, t, _ = _inputs((2, 8, 8, 1))
    out = _nnx_forward(model, x, t, None)
    assert model.initialized and out.shape == x.shape
    # The output layer is zero-initialised (as Linen's init), the others are not.
    params = to_linen_params(model)
    assert not np.any(params["conv_out"]["kernel"]) and np.std(params["conv_in"]["kernel"]) > 0.01


def test_conditional_learned_variance_matches_linen():
    shape = (2, 8, 8, 1)
    unet = get_model("tiny", num_classes=3, learn_sigma=True)
    params = _random_params(unet, shape, seed=1)
    model = from_linen_params({"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [4],
                               "dropout": 0.0, "num_classes": 3, "learn_sigma": True}, params, sample_shape=shape)
    assert model.unet == unet
    x, t, y = _inputs(shape, num_classes=3)
    out, ref = _nnx_forward(model, x, t, y), _linen_forward(unet, params, x, t, y)
    assert out.shape == (2, 8, 8, 2)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-6)


def test_dropout_train_and_eval_modes():
    """Eval: Linen with train=False. Train: Linen with the key the bridge's dropout stream yields next."""
    shape = (2, 8, 8, 1)
    unet = get_model("tiny", dropout=0.5)
    params = _random_params(unet, shape, seed=2)
    model = from_linen_params("tiny", params, rngs=nnx.Rngs(params=0, dropout=5), dropout=0.5)
    x, t, _ = _inputs(shape)
    ref_eval = _linen_forward(unet, params, x, t, None)

    assert not model.deterministic  # NNX default: train mode
    outs = []
    for _ in range(2):
        next_key = nnx.clone(model.bridge.to_nnx__rngs).dropout()
        out = _nnx_forward(model, x, t, None)
        np.testing.assert_allclose(out, _linen_forward(unet, params, x, t, None, True, next_key), rtol=0, atol=1e-6)
        outs.append(out)
    # Dropout acts, and each call (the stream's count is carried out of nnx.jit) draws a new mask.
    assert float(jnp.max(jnp.abs(outs[0] - ref_eval))) > 1e-2
    assert float(jnp.max(jnp.abs(outs[0] - outs[1]))) > 1e-2

    model.eval()
    assert model.deterministic
    np.testing.assert_allclose(_nnx_forward(model, x, t, None), ref_eval, rtol=0, atol=1e-6)
    model.train()
    assert not model.deterministic


def test_param_conversion_round_trips_exactly():
    shape = (2, 8, 8, 1)
    unet = get_model("tiny")
    params = jax.tree.map(np.asarray, _random_params(unet, shape, seed=3))
    model = from_linen_params(unet, params, sample_shape=shape)
    back = to_linen_params(model)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, params)
    # In place, into an initialised module.
    other = from_linen_params("tiny", _random_params(unet, shape, seed=4))
    assert from_linen_params(other, params) is other
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), to_linen_params(other), params)


def test_bad_input_raises():
    shape = (2, 8, 8, 1)
    params = _random_params(get_model("tiny"), shape)
    model = from_linen_params("tiny", params)
    with pytest.raises(ValueError, match="unknown model"):
        nnx_unet("huge", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown UNet fields"):
        nnx_unet({"ch": 16, "chanels": 3}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rngs must be an nnx.Rngs"):
        nnx_unet("tiny", rngs=0)
    with pytest.raises(ValueError, match="no 'dropout' stream"):
        nnx_unet("tiny", rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="sample_shape"):
        nnx_unet("tiny", rngs=nnx.Rngs(0), sample_shape=(8, 8, 1))
    with pytest.raises(ValueError, match="no parameters yet"):
        to_linen_params(nnx_unet("tiny", rngs=nnx.Rngs(0)))
    wrong = jax.tree.map(lambda a: a, params)
    wrong["conv_in"]["kernel"] = jnp.zeros((3, 3, 2, 16))
    with pytest.raises(ValueError, match=r"\['conv_in'\]\['kernel'\] has shape"):
        from_linen_params(model, wrong)
    missing = {k: v for k, v in params.items() if k != "mid_attn_1"}
    with pytest.raises(ValueError, match="missing"):
        from_linen_params("tiny", missing, sample_shape=shape)


class MLP(nnx.Module):
    """A user's own epsilon network on 2-D points: ``(x [B, 2], t [B]) -> [B, 2]``."""

    def __init__(self, num_timesteps: int, *, rngs: nnx.Rngs, width: int = 64):
        self.num_timesteps = num_timesteps
        self.l1 = nnx.Linear(3, width, rngs=rngs)
        self.l2 = nnx.Linear(width, width, rngs=rngs)
        self.l3 = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x, t):
        h = jnp.concatenate([x, (t.astype(jnp.float32) / self.num_timesteps)[:, None]], axis=-1)
        return self.l3(nnx.silu(self.l2(nnx.silu(self.l1(h)))))


def _train(model, schedule, data_fn, num_steps, lr):
    """The documented NNX loop: diffusion_loss + nnx.Optimizer through nnx.jit. Returns (before, after) losses
    on a fixed batch and fixed (t, noise) draws."""
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        x0 = data_fn(jax.random.fold_in(key, 1))

        def loss_fn(model):
            return diffusion_loss(schedule, model, x0, key)[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def eval_loss(model):
        return diffusion_loss(schedule, model, data_fn(jax.random.key(123)), jax.random.key(99))[0]

    before = float(eval_loss(model))
    for step in range(num_steps):
        train_step(model, optimizer, jax.random.fold_in(jax.random.key(0), step))
    return before, float(eval_loss(model))


def test_user_nnx_mlp_trains_and_samples():
    schedule = jaxdiff.linear_schedule(100)
    mixture = default_mixture(dim=2)
    model = MLP(100, rngs=nnx.Rngs(0))
    before, after = _train(model, schedule, lambda k: mixture.sample(k, 1024), num_steps=150, lr=3e-3)
    assert after < 0.8 * before, (before, after)
    x = nnx.jit(lambda m, k: sample(schedule, m, k, (512, 2), sampler="ddim", num_steps=20))(model, jax.random.key(5))
    assert x.shape == (512, 2) and bool(jnp.all(jnp.isfinite(x)))
    # The samples are far likelier under the mixture than the N(0, I) prior's draws are.
    prior = jax.random.normal(jax.random.key(6), (512, 2))
    assert float(jnp.mean(mixture.log_prob(x))) > float(jnp.mean(mixture.log_prob(prior))) + 1.0


@pytest.mark.slow
def test_nnx_unet_trains_and_samples():
    schedule = jaxdiff.linear_schedule(100)
    model = nnx_unet("tiny", rngs=nnx.Rngs(params=0, dropout=1), sample_shape=(1, 8, 8, 1))
    # Smooth 8x8 "images": a random-phase horizontal cosine.
    grid = jnp.arange(8, dtype=jnp.float32)

    def images(key):
        phase = jax.random.uniform(key, (16, 1, 1, 1), maxval=2 * jnp.pi)
        return jnp.broadcast_to(jnp.cos(grid[None, None, :, None] * 0.8 + phase), (16, 8, 8, 1))

    before, after = _train(model, schedule, images, num_steps=30, lr=2e-3)
    assert after < 0.8 * before, (before, after)
    model.eval()
    x = nnx.jit(lambda m, k: sample(schedule, m, k, (4, 8, 8, 1), num_steps=5))(model, jax.random.key(1))
    assert x.shape == (4, 8, 8, 1) and bool(jnp.all(jnp.isfinite(x)))
    assert isinstance(model, NNXUNet)

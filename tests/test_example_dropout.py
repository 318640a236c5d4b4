"""Per-example dropout keys: masks from each example's own key, so a batch can be applied at once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxdiff.models import tiny
from jaxdiff.models.layers import dropout_salt, example_dropout

# One level, no attention, dropout 0.5: quick to compile.
DROP = tiny(ch_mult=(1,), attn_resolutions=(), dropout=0.5)
NODROP = tiny(ch_mult=(1,), attn_resolutions=(), dropout=0.0)


def _inputs(b=4):
    x = jax.random.normal(jax.random.key(0), (b, 8, 8, 1))
    t = jnp.arange(b, dtype=jnp.int32) * 97
    return x, t


def _random_params(model, x, t):
    # The zero-initialised convs after dropout would hide the masks: draw every weight.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)["params"]
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


def test_example_dropout_matches_numpy_recomputation_of_the_masks():
    rate, salt = 0.3, dropout_salt("down_0_block_0")
    x = jax.random.normal(jax.random.key(1), (3, 4, 5, 6))
    keys = jax.random.split(jax.random.key(2), 3)
    got = np.asarray(jax.jit(lambda x, k: example_dropout(x, rate, k, salt))(x, keys), np.float64)
    x64 = np.asarray(x, np.float64)
    kept = 0
    for b in range(3):  # each example alone, from the documented rule
        mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(keys[b], salt), 1.0 - rate, x.shape[1:]))
        np.testing.assert_allclose(got[b], np.where(mask, x64[b] / (1.0 - rate), 0.0), rtol=1e-6, atol=1e-7)
        kept += int(mask.sum())
    # The kept count is Binomial(n, 1 - rate).
    n = x.size
    assert stats.binomtest(kept, n, 1.0 - rate).pvalue > 1e-3
    # A different salt (another layer) draws a different mask.
    other = np.asarray(example_dropout(x, rate, keys, salt + 1))
    assert not np.array_equal(other == 0, got == 0)


def test_example_dropout_edge_rates_and_bad_input():
    x = jnp.ones((2, 3))
    keys = jax.random.split(jax.random.key(0), 2)
    np.testing.assert_array_equal(example_dropout(x, 0.0, keys, 1), x)
    np.testing.assert_array_equal(example_dropout(x, 1.0, keys, 1), jnp.zeros_like(x))
    with pytest.raises(ValueError, match="rate"):
        example_dropout(x, 1.5, keys, 1)
    with pytest.raises(ValueError, match="keys"):
        example_dropout(x, 0.5, keys[:1], 1)


@pytest.fixture(scope="module")
def drop_setup():
    x, t = _inputs()
    return _random_params(DROP, x, t), x, t


def test_each_example_gets_the_output_it_gets_alone(drop_setup):
    """The device-count invariance at the network: splitting the batch does not change any example."""
    params, x, t = drop_setup
    keys = jax.random.split(jax.random.key(9), x.shape[0])
    apply = jax.jit(lambda x, t, k: DROP.apply({"params": params}, x, t, train=True, dropout_keys=k))
    whole = np.asarray(apply(x, t, keys))
    halves = np.concatenate([apply(x[:2], t[:2], keys[:2]), apply(x[2:], t[2:], keys[2:])])
    ones = np.concatenate([apply(x[b:b + 1], t[b:b + 1], keys[b:b + 1]) for b in range(x.shape[0])])
    np.testing.assert_allclose(halves, whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ones, whole, rtol=1e-5, atol=1e-5)
    # Dropout is really applied, and by the keys.
    evaluated = np.asarray(DROP.apply({"params": params}, x, t, train=False))
    assert np.max(np.abs(whole - evaluated)) > 1e-3
    other = np.asarray(apply(x, t, jax.random.split(jax.random.key(10), x.shape[0])))
    assert np.max(np.abs(whole - other)) > 1e-3
    # remat recomputes the same masks.
    remat = DROP.clone(remat=True)
    np.testing.assert_allclose(remat.apply({"params": params}, x, t, train=True, dropout_keys=keys), whole,
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dropout_keys"):
        DROP.apply({"params": params}, x, t, train=True, dropout_keys=keys[:2])


def test_without_dropout_the_batched_apply_equals_the_per_example_one():
    x, t = _inputs()
    params = _random_params(NODROP, x, t)
    keys = jax.random.split(jax.random.key(9), x.shape[0])
    batched = NODROP.apply({"params": params}, x, t, train=True, dropout_keys=keys)

    def one(xb, tb, kb):
        return NODROP.apply({"params": params}, xb[None], tb[None], train=True, rngs={"dropout": kb})[0]

    np.testing.assert_allclose(batched, jax.vmap(one)(x, t, keys), rtol=1e-5, atol=1e-5)

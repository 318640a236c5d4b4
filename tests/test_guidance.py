"""Classifier-free guidance, classifier guidance and inpainting, with labelled mixture oracles.

References written here: the noised mixture's class posterior ``log p(y | x_t)`` (a classifier of
noisy inputs) from ``jax.scipy.stats.multivariate_normal`` and the standard normal CDF for the
labelled component's conditional mass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp
from jax.scipy.stats import multivariate_normal
from scipy import stats

from jaxdiff import diffusion as d
from jaxdiff.guidance import classifier_free_guidance, classifier_guidance, drop_labels, inpaint
from jaxdiff.oracle import GaussianMixture
from jaxdiff.samplers import sample
from jaxdiff.schedules import linear_schedule, ve_schedule

LIN = linear_schedule(1000)
NULL = 2
# Two overlapping classes: guidance towards class 1 moves mass from x[0] < 0 to x[0] > 0.
PAIR = GaussianMixture.create([0.5, 0.5], [[-0.6, 0.0], [0.6, 0.0]], [0.25 * np.eye(2)] * 2, labels=[0, 1])
# Three classes, two of them sharing a class (the classifier then is not a one-hot of components).
TRIO = GaussianMixture.create([0.4, 0.35, 0.25], [[1.0, 0.0], [-1.0, 0.5], [0.0, -1.0]],
                              [0.3 * np.eye(2), 0.2 * np.eye(2), 0.4 * np.eye(2)], labels=[0, 1, 1])


def class_log_posterior(mix, schedule):
    """``log p(y | x_t, t)`` of the noised mixture, for ``x_t`` in the schedule's coordinates."""
    means, covs = np.asarray(mix.means), np.asarray(mix.covs)
    logw, labels = np.log(np.asarray(mix.weights)), np.asarray(mix.labels)

    def log_prob(x_t, t, y):
        a, s = d.alpha_sigma(schedule, t)
        x = d.to_vp(schedule, x_t, t)

        def one(xi, ai, si, yi):
            comp = jnp.stack([logw[k] + multivariate_normal.logpdf(xi, ai * means[k], ai**2 * covs[k] + si**2 * np.eye(2))
                              for k in range(len(logw))])
            return logsumexp(jnp.where(labels == yi, comp, -jnp.inf)) - logsumexp(comp)

        return jax.vmap(one)(x, a, s, y)

    return log_prob


def test_cfg_w1_is_exactly_the_conditional_model_and_w0_the_unconditional():
    model = jax.jit(PAIR.conditional_model_fn(LIN, "epsilon", null_label=NULL))
    x = jax.random.normal(jax.random.key(0), (16, 2))
    y = jnp.arange(16) % 2
    for t in (jnp.full((16,), 500, jnp.int32), jnp.linspace(0.0, 999.0, 16)):
        cond, uncond = model(x, t, y), model(x, t, jnp.full_like(y, NULL))
        np.testing.assert_array_equal(classifier_free_guidance(model, y, NULL, 1.0)(x, t), cond)
        np.testing.assert_allclose(classifier_free_guidance(model, y, NULL, 0.0)(x, t), uncond, atol=1e-6)
        np.testing.assert_allclose(classifier_free_guidance(model, y, NULL, 3.0)(x, t),
                                   uncond + 3.0 * (cond - uncond), atol=1e-5)


def test_stronger_guidance_puts_more_samples_in_the_labelled_component():
    """Fraction of ``x[0] > 0`` when guiding towards class 1: 1/2 unguided, the exact conditional
    ``Phi(0.6/0.5) = 0.885`` at ``w = 1``, more at ``w = 3``. The scale is a runtime value."""
    model = PAIR.conditional_model_fn(LIN, "epsilon", null_label=NULL)
    n = 2000

    @jax.jit
    def generate(key, w):
        fn = classifier_free_guidance(model, 1, NULL, w)
        return sample(LIN, fn, key, (n, 2), sampler="dpm_solver++", num_steps=20)

    frac = {w: float(np.mean(np.asarray(generate(jax.random.key(1), w))[:, 0] > 0)) for w in (0.0, 1.0, 3.0)}
    assert generate._cache_size() == 1
    se = np.sqrt(0.25 / n)
    assert abs(frac[0.0] - 0.5) < 4 * se, frac
    exact = stats.norm.cdf(0.6 / 0.5)
    assert abs(frac[1.0] - exact) < 4 * np.sqrt(exact * (1 - exact) / n), frac
    assert frac[3.0] > frac[1.0] + 0.03, frac


@pytest.mark.parametrize("schedule,prediction", [(LIN, "v"), (ve_schedule(1000, 3.0), "epsilon")], ids=["vp-v", "ve-eps"])
def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_model(schedule, prediction):
    """grad log p_t(x) + grad log p_t(y | x) = grad log p_t(x | y): scale 1 turns the unconditional
    oracle into the conditional one; scale 0 leaves it unchanged. The scale is a runtime value."""
    uncond = TRIO.model_fn(schedule, prediction)
    cond = TRIO.conditional_model_fn(schedule, prediction)
    clf = class_log_posterior(TRIO, schedule)
    x = 1.5 * jax.random.normal(jax.random.key(2), (12, 2))
    y = jnp.arange(12) % 2
    t = jnp.linspace(20.0, 950.0, 12)
    guided = jax.jit(lambda s: classifier_guidance(schedule, uncond, clf, y, s, prediction=prediction)(x, t))
    np.testing.assert_allclose(guided(1.0), jax.jit(cond)(x, t, y), atol=2e-4, rtol=1e-4)
    np.testing.assert_allclose(guided(0.0), jax.jit(uncond)(x, t), atol=1e-4, rtol=1e-4)
    assert guided._cache_size() == 1


def test_inpainting_keeps_the_known_region_and_fills_in_the_rest(sampler="euler_ancestral"):
    """Components at (2, 2) and (-2, -2): the known x[0] tells which one, and the filled-in x[1]
    follows (conditional N(+-2, 0.1)); unconditionally half the chains would pick each."""
    mix = GaussianMixture.create([0.5, 0.5], [[2.0, 2.0], [-2.0, -2.0]], [0.1 * np.eye(2)] * 2)
    model = mix.model_fn(LIN)
    n = 400
    known = jnp.stack([jnp.concatenate([jnp.full((n,), 2.0), jnp.full((n,), -2.0)]), jnp.zeros(2 * n)], axis=1)
    mask = jnp.broadcast_to(jnp.array([[1.0, 0.0]]), known.shape)
    fn = inpaint(LIN, model, known, mask, jax.random.key(3))
    x = np.asarray(jax.jit(lambda key: sample(LIN, fn, key, known.shape, sampler=sampler, num_steps=100))(
        jax.random.key(4)))
    np.testing.assert_allclose(x[:, 0], np.asarray(known[:, 0]), atol=1e-4)
    for half, target in ((x[:n, 1], 2.0), (x[n:, 1], -2.0)):
        assert np.mean(np.abs(half - target) < 1.0) > 0.95
        inliers = half[np.abs(half - target) < 1.0]
        assert abs(np.mean(inliers) - target) < 0.1
        assert 0.6 < np.std(inliers) / np.sqrt(0.1) < 1.4


def _toy_net(x, t, y):
    """A conditional "network" with 4 output channels, in float32: a smooth function of (x, t, y)."""
    yf = jnp.asarray(y, jnp.float32)[:, None]
    tf = jnp.asarray(t, jnp.float32)[:, None] / 1000.0
    base = jnp.concatenate([x, x**2], axis=-1)  # [B, 4]
    return jnp.sin(base * (1.0 + yf) + tf) + 0.1 * yf


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("guided_channels", [None, 2])
def test_cfg_is_one_formula_in_float64(batched, guided_channels):
    """Batched (one call on [2B]) and two-call evaluation give the same guidance, equal to the float64
    formula uncond + w (cond - uncond) on the guided channels and the conditional output elsewhere."""
    x = np.random.default_rng(0).normal(size=(6, 2)).astype(np.float32)
    t = np.linspace(0, 999, 6).astype(np.int32)
    y = np.array([0, 1, 0, 1, 1, 0])
    w = 2.5
    got = np.asarray(classifier_free_guidance(_toy_net, y, NULL, w, batched=batched,
                                              guided_channels=guided_channels)(jnp.asarray(x), jnp.asarray(t)))

    def net64(yy):
        yf = yy.astype(np.float64)[:, None]
        base = np.concatenate([x, x**2], axis=-1).astype(np.float64)
        return np.sin(base * (1.0 + yf) + t[:, None] / 1000.0) + 0.1 * yf

    cond, uncond = net64(y), net64(np.full_like(y, NULL))
    want = uncond + w * (cond - uncond)
    if guided_channels is not None:
        want[:, guided_channels:] = cond[:, guided_channels:]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- label dropout


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_drop_labels_drops_a_binomial_fraction_to_exactly_the_null_label(rate):
    n, null = 20000, 10
    labels = jnp.asarray(np.random.default_rng(0).integers(0, 10, n), jnp.int32)
    out = np.asarray(jax.jit(lambda k: drop_labels(k, labels, rate, null))(jax.random.key(3)))
    dropped = out == null
    assert out.dtype == np.int32 and set(np.unique(out[dropped])) == {null}
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])
    lo, hi = stats.binom.ppf([1e-6, 1 - 1e-6], n, rate)  # a one-in-a-million band of Binomial(n, rate)
    assert lo <= dropped.sum() <= hi
    # Which examples drop depends on the keys alone, not on the labels.
    other = np.asarray(drop_labels(jax.random.key(3), (labels + 1) % 10, rate, null))
    np.testing.assert_array_equal(other == null, dropped)


def test_drop_labels_per_example_keys_make_each_drop_its_own():
    """With ``[B]`` keys (the training step's), example ``b`` depends on ``keys[b]`` alone: any split
    of the batch drops the same examples."""
    keys = jax.random.split(jax.random.key(1), 64)
    labels = jnp.arange(64, dtype=jnp.int32) % 5
    whole = np.asarray(drop_labels(keys, labels, 0.5, 5))
    parts = np.concatenate([drop_labels(keys[i:i + 8], labels[i:i + 8], 0.5, 5) for i in range(0, 64, 8)])
    np.testing.assert_array_equal(whole, parts)
    assert 0 < (whole == 5).sum() < 64
    np.testing.assert_array_equal(drop_labels(keys, labels, 0.0, 5), labels)
    np.testing.assert_array_equal(drop_labels(keys, labels, 1.0, 5), np.full(64, 5))


@pytest.mark.parametrize("call, match", [
    (lambda: drop_labels(jax.random.key(0), jnp.zeros((4,), jnp.int32), 1.5, 10), r"rate must be a probability"),
    (lambda: drop_labels(jax.random.key(0), jnp.zeros((4,), jnp.int32), -0.1, 10), r"rate must be a probability"),
    (lambda: drop_labels(jax.random.key(0), jnp.zeros((4, 1), jnp.int32), 0.1, 10), r"labels must be a \[B\] int"),
    (lambda: drop_labels(jax.random.key(0), jnp.zeros((4,)), 0.1, 10), r"labels must be a \[B\] int"),
    (lambda: drop_labels(0, jnp.zeros((4,), jnp.int32), 0.1, 10), r"key must be a PRNG key"),
])
def test_drop_labels_bad_inputs_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

"""Guidance and inpainting as model_fn wrappers, so they work with every sampler.

Each function takes a network ``model_fn`` and returns a new ``fn(x_t [B, ...], t [B]) -> [B, ...]``
of the same parameterization, to pass to :func:`jaxdiff.samplers.sample`. Scales may be traced
values: build the wrapper inside the jitted function and pass the scale as an argument, and
changing it does not recompile::

    @jax.jit
    def generate(key, w):
        fn = classifier_free_guidance(net, labels, null_label=10, guidance_scale=w)
        return sample(schedule, fn, key, shape, sampler="dpm_solver++", num_steps=20)

A sampler's NFE counts calls of the wrapped function; :func:`classifier_free_guidance` calls
the network twice per call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff import diffusion as d
from jaxdiff.schedules import Schedule

__all__ = ["classifier_free_guidance", "classifier_guidance", "drop_labels", "inpaint"]


def classifier_free_guidance(model_fn: Callable, labels, null_label: int, guidance_scale, *,
                             batched: bool = True, guided_channels: int | None = None) -> Callable:
    """Classifier-free guidance (Ho & Salimans 2022) of a class-conditional ``model_fn(x, t, y)``.

    ``out = out_uncond + w (out_cond - out_uncond)``, computed as
    ``out_cond + (w - 1)(out_cond - out_uncond)``, so that

    * ``w = 1`` is *exactly* the conditional model, ``w = 0`` the unconditional one (label
      ``null_label``), ``w > 1`` extrapolates away from the unconditional model;
    * the combination is affine with weights summing to one, so guiding the output of an
      epsilon, x0 or v network is the same guidance (each is affine in the others at fixed
      ``(x_t, t)``).

    Note the convention of Ho & Salimans' paper is ``(1 + w') eps_c - w' eps_u``, i.e. ``w = 1 + w'``.
    This is the library's only guidance formula: the training job and the scripts use it too.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B], y [B] int) -> [B, ...]``.
      labels: ``[B]`` int class labels (or a scalar, broadcast over the batch); ``B`` must be the
        batch of the ``x_t`` the wrapper is called with (``ValueError`` otherwise). Concrete labels
        must be ``>= 0``: JAX indexing wraps a negative label (for the UNet, -1 is the null label).
      null_label: the label of the unconditional model (``num_classes`` for :class:`jaxdiff.models.UNet`).
      guidance_scale: ``w >= 0``, a float or a traced scalar (a concrete ``w < 0``, which would
        steer away from the class, raises ``ValueError``).
      batched: evaluate the conditional and unconditional outputs in one call on a ``[2B, ...]``
        batch (faster on accelerators) instead of two calls on ``[B, ...]``.
      guided_channels: guide only the first ``guided_channels`` output channels and take the
        rest from the conditional output (the variance channels of a learned-variance model).
        ``None``: all channels.
    """
    labels = jnp.asarray(labels)
    if labels.ndim > 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be a [B] int array or an int, got shape {labels.shape} and dtype {labels.dtype}")
    checks.check_nonnegative(labels, "labels")
    checks.check_nonnegative(guidance_scale, "guidance_scale")

    def fn(x_t, t):
        if labels.ndim == 1 and labels.shape[0] != x_t.shape[0]:
            raise ValueError(f"labels has shape {labels.shape} but x_t has shape {x_t.shape}: labels must be [B] = "
                             f"[x_t.shape[0]] (or a scalar)")
        y = jnp.broadcast_to(labels.astype(jnp.int32), (x_t.shape[0],))
        null = jnp.full_like(y, null_label)
        if batched:
            both = model_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]), jnp.concatenate([y, null]))
            cond, uncond = jnp.split(both, 2)
        else:
            cond, uncond = model_fn(x_t, t, y), model_fn(x_t, t, null)
        c = cond.shape[-1] if guided_channels is None else guided_channels
        guided = cond[..., :c] + (guidance_scale - 1.0) * (cond[..., :c] - uncond[..., :c])
        return guided if c == cond.shape[-1] else jnp.concatenate([guided, cond[..., c:]], axis=-1)

    return fn


def drop_labels(key, labels, rate, null_label: int) -> jax.Array:
    """Label dropout for classifier-free guidance training: ``labels`` ``[B]`` with each entry replaced
    by ``null_label`` with probability ``rate``, independently.

    The training job's step drops labels with this function; use it the same way with
    :func:`jaxdiff.diffusion_loss` in a loop of your own::

        y = drop_labels(k_drop, labels, 0.1, null_label=num_classes)
        loss, _ = diffusion_loss(schedule, lambda x, t: unet.apply({"params": p}, x, t, y), x0, k_loss)

    Args:
      key: one PRNG key (split into ``B`` per-example keys), or ``[B]`` keys, one per example:
        example ``b`` is dropped by ``bernoulli(key[b], rate)`` alone, so a batch split across
        devices drops the same examples (the training step passes its per-example keys).
      labels: ``[B]`` int class labels.
      rate: the drop probability in ``[0, 1]`` (may be traced).
      null_label: the label of the unconditional model (``num_classes`` for :class:`jaxdiff.models.UNet`).
    Returns: ``[B]`` labels of ``labels``' dtype.
    """
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be a [B] int array, got shape {labels.shape} and dtype {labels.dtype}")
    r = checks.concrete_value(rate)
    if r is not None and (r.ndim or not 0.0 <= float(r) <= 1.0):
        raise ValueError(f"rate must be a probability in [0, 1], got {r.tolist()!r}")
    dtype = getattr(key, "dtype", None)
    per_example = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == labels.shape
    keys = key if per_example else jax.random.split(checks.check_key(key), labels.shape[0])
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, rate))(keys)
    return jnp.where(drop, null_label, labels)


def classifier_guidance(schedule: Schedule, model_fn: Callable, classifier_log_prob: Callable, labels,
                        guidance_scale, *, prediction: str = "epsilon") -> Callable:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 in its eps form).

    The score is shifted by ``s grad_x log p(y | x_t, t)``; for an epsilon network that is
    ``eps <- eps - sqrt(1 - abar_t) s grad`` (VP; for a VE schedule ``sigma_t`` replaces
    ``sqrt(1 - abar_t)``, the gradient being taken in the schedule's coordinates). Outputs of
    x0 / v / score networks are converted through ``(x0, eps)`` and back.

    Args:
      classifier_log_prob: ``f(x_t [B, ...], t [B], y [B]) -> [B]`` log-probabilities of the
        labels (the classifier of noisy inputs); differentiated with ``jax.grad``.
      labels: ``[B]`` int (or a scalar). guidance_scale: ``s``, a float or a traced scalar.
    """
    d.check_prediction(prediction)

    def fn(x_t, t):
        y = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (x_t.shape[0],))
        grad = jax.grad(lambda x: jnp.sum(classifier_log_prob(x, t, y)))(x_t)
        x0, eps = d.x0_eps_from_prediction(schedule, model_fn(x_t, t), x_t, t, prediction)
        eps = eps + d.eps_from_score(schedule, t, guidance_scale * grad)
        x0 = d.x0_from_eps(schedule, x_t, t, eps)
        return d.prediction_target(schedule, x0, t, eps, prediction)

    return fn


def inpaint(schedule: Schedule, model_fn: Callable, known, mask, key, *, prediction: str = "epsilon",
            fresh_noise: bool = True) -> Callable:
    """Inpainting by replacement (RePaint without resampling, Lugmayr et al. 2022).

    At every call the known region of the network's input is replaced by
    ``q_sample(known, t, noise)`` and the known region of the ``x0`` estimate by ``known``; the
    returned prediction is re-expressed relative to the sampler's own ``x_t``, so every sampler's
    final ``x0`` estimate equals ``known`` in the known region.

    ``fresh_noise=True`` (RePaint) draws new noise at every timestep (from ``key`` folded with
    the bits of ``t[0]``, so it is reproducible). ``fresh_noise=False`` draws it once per chain,
    which makes the wrapped function a smooth function of ``(x_t, t)`` -- use it with the adaptive
    ODE sampler -- but conditions less well (the unknown region keeps seeing the same noisy
    version of the known one).

    Replacement only conditions the unknown region through the noisy known region: it works
    when the known region identifies the mode, and can fail when only correlations that the
    noise hides decide it (resampling, not implemented, is RePaint's fix).

    Args:
      known: ``[B, ...]`` data (only the known region is used).
      mask: like ``known`` (or broadcastable with the same rank), 1 where known, 0 where to fill.
      key: the key of the replacement noise.
    """
    d.check_prediction(prediction)
    checks.check_key(key)
    known = jnp.asarray(known, jnp.float32)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim != known.ndim:
        raise ValueError(f"mask must have the rank of known {known.shape}, got shape {mask.shape}")

    def fn(x_t, t):
        if x_t.shape != known.shape:
            raise ValueError(f"x_t has shape {x_t.shape} but known has shape {known.shape}")
        k = key
        if fresh_noise:
            t_bits = jax.lax.bitcast_convert_type(jnp.asarray(t, jnp.float32)[0], jnp.int32)
            k = jax.random.fold_in(key, t_bits)
        noise = jax.random.normal(k, known.shape, known.dtype)
        x_in = mask * d.q_sample(schedule, known, t, noise) + (1.0 - mask) * x_t
        x0, _ = d.x0_eps_from_prediction(schedule, model_fn(x_in, t), x_in, t, prediction)
        x0 = mask * known + (1.0 - mask) * x0
        eps = d.eps_from_x0(schedule, x_t, t, x0)
        return d.prediction_target(schedule, x0, t, eps, prediction)

    return fn

"""The train state: a pytree of (step, params, optimizer state, EMA params[, post-hoc EMA]), and the optimizer.

As in flax's ``TrainState``, the state also holds what the step applies but never changes:
the network's ``apply_fn``, the optimizer ``tx``, the EMA decay and the label dropout of
classifier-free guidance training. They are static fields (part of the tree's structure, not
leaves): checkpoints hold only the arrays, and a resumed run takes them from its config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdiff import posthoc_ema

__all__ = ["TrainState", "make_optimizer", "create_train_state"]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step; all leaves are arrays."""

    step: jax.Array  # [] int32: number of completed steps
    params: Any  # the network's parameters
    opt_state: Any  # optax state of `tx`
    ema_params: Any  # exponential moving average of `params`
    # Power-function EMAs of `params` for post-hoc EMA (EDM2): K extra float32 copies of the
    # params (leaves [K, ...]); None (no leaves) when not tracked.
    posthoc_ema: posthoc_ema.PowerEMAState | None = None
    # Static: apply_fn({"params": p}, x, t, y, train=True, dropout_keys=keys) (a Flax module's apply).
    apply_fn: Callable | None = flax.struct.field(pytree_node=False, default=None)
    tx: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.9999)
    num_classes: int | None = flax.struct.field(pytree_node=False, default=None)  # None: unconditional
    label_dropout: float = flax.struct.field(pytree_node=False, default=0.0)  # P(label -> null label)


def make_optimizer(learning_rate: float, *, warmup_steps: int = 0, grad_clip: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with linear warmup to ``learning_rate`` over ``warmup_steps`` and global-norm clipping (DDPM)."""
    lr = optax.linear_schedule(0.0, learning_rate, warmup_steps) if warmup_steps > 0 else learning_rate
    chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
    chain.append(optax.adam(lr, b1=b1, b2=b2, eps=eps))
    return optax.chain(*chain)


def create_train_state(key: jax.Array, model, tx: optax.GradientTransformation, image_shape, *,
                       num_classes: int | None = None, posthoc_sigma_rels=(), ema_decay: float = 0.9999,
                       label_dropout: float = 0.0, param_dtype=jnp.float32) -> TrainState:
    """Initialises ``model`` (a Flax module) on a dummy batch of one ``image_shape`` ``(H, W, C)`` image.

    ``num_classes``: the labels of a class-conditional model (``None``: unconditional);
    ``posthoc_sigma_rels``: the ``sigma_rel`` of each power-function EMA to track (empty: none);
    ``ema_decay``, ``label_dropout``: see :class:`TrainState`. ``param_dtype``: the dtype of the
    floating-point params (the master weights; float32 unless memory demands ``bfloat16``), and so of
    the optimizer's moments and the EMA; the post-hoc EMAs stay float32.
    """
    x = jnp.zeros((1, *image_shape), jnp.float32)
    k = getattr(model, "time_inputs", 1)
    t = jnp.zeros((1,), jnp.int32) if k == 1 else jnp.zeros((1, k), jnp.float32)
    y = None if num_classes is None else jnp.zeros((1,), jnp.int32)
    params = model.init({"params": key}, x, t, y, train=False)["params"]
    params = jax.tree_util.tree_map(
        lambda p: p.astype(param_dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
    phema = posthoc_ema.init(params, posthoc_sigma_rels) if len(posthoc_sigma_rels) else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params), posthoc_ema=phema, apply_fn=model.apply,
                      tx=tx, ema_decay=float(ema_decay), num_classes=num_classes, label_dropout=float(label_dropout))

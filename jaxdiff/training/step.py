"""The pure training step. ``pmap``/``jit`` wrap it where it is used (training/parallel.py).

Randomness is derived, never carried: the key of example ``i`` of the global batch at step
``s`` is ``fold_in(fold_in(root, s), i)``, and it alone draws that example's timestep, noise,
dropout masks and label drop. So the update does not depend on how many devices or hosts
share the batch, and a resumed run reproduces the same keys without saving them.

What is trained is the ``objective`` argument (:mod:`jaxdiff.objectives`); this module never
asks which one it is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff import guidance, posthoc_ema
from jaxdiff.objectives import Objective
from jaxdiff.training.state import TrainState

__all__ = ["example_keys", "train_step"]

# optax.tree.norm replaces the deprecated optax.global_norm (older optax has only the latter).
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def example_keys(root: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """``[B]`` keys ``fold_in(fold_in(root, step), index[b])`` for the examples at global positions ``index``."""
    step_key = jax.random.fold_in(root, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def _split(tree, k: int):
    """``[B, ...]`` leaves -> ``[k, B / k, ...]``, microbatch ``j`` holding examples ``j, j + k, j + 2k, ...``.

    Strided, so that a batch sharded in contiguous blocks over devices (each block divisible by ``k``)
    gives every microbatch an equal share of every device's block: each iteration uses all devices.
    """
    return jax.tree_util.tree_map(lambda a: a.reshape(a.shape[0] // k, k, *a.shape[1:]).swapaxes(0, 1), tree)


def train_step(state: TrainState, batch: dict, root_key: jax.Array, objective: Objective, *,
               axis_name: str | None = None, microbatches: int = 1) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on a (local shard of a) global batch.

    Args:
      state: the train state; its ``apply_fn``, ``tx``, ``ema_decay``, ``num_classes`` and
        ``label_dropout`` say how to apply and update the network (:class:`TrainState`).
        ``apply_fn({"params": p}, x, t, y, train=True, dropout_keys=keys)`` gets the whole batch
        (or microbatch) with ``keys`` ``[B]``: each example's dropout masks must depend on its own key alone.
      batch: ``image`` ``[B, H, W, C]`` in [-1, 1], ``index`` ``[B]`` int global positions in the
        global batch, and ``label`` ``[B]`` when conditional (replaced by the null label
        ``num_classes`` with probability ``label_dropout``, for classifier-free guidance).
      root_key: the run's root key (from the seed).
      objective: what is trained (:mod:`jaxdiff.objectives`): it draws each example's noise
        level and computes the loss of the network.
      axis_name: the mapped axis to average gradients and metrics over (``pmap``), or None when
        the batch is a global array (``jit`` with shardings).
      microbatches: gradient accumulation: the ``B`` examples are taken in ``microbatches``
        sequential groups of ``B / microbatches`` (``lax.scan``; the activations of one group at a
        time; group ``j`` holds examples ``j, j + microbatches, ...``, so a batch sharded over devices
        keeps every device busy), whose gradients and metrics are averaged. Every example keeps its own key, and every
        objective's loss is a mean of per-example terms, so the update is that of the whole batch
        (to float32 rounding). ``B`` must divide by it (``ValueError``).

    Pure: ``jax.jit(train_step)(state, batch, key, objective)`` works as is (the objective is a
    pytree whose settings are static). The EMA is ``optax.incremental_update``; the state's
    post-hoc EMA (``state.posthoc_ema``, if tracked) is updated after the optimizer step.

    Returns: the new state (the old one where the loss or a gradient is not finite) and metrics
      ``{"loss", "mse", "grad_norm", "finite"}`` averaged over the global batch.
    """
    b = batch["image"].shape[0]
    if not isinstance(microbatches, int) or microbatches <= 0 or b % microbatches:
        raise ValueError(f"microbatches={microbatches!r} must be a positive integer dividing the batch of "
                         f"{b} examples (config.train.microbatches: the per-device batch must divide by it)")
    objective = objective.at_step(state.step)

    def grads_of(mb: dict):  # (gradients, metrics) of the mean loss over the examples of `mb`
        keys = example_keys(root_key, state.step, mb["index"])
        sub = jax.vmap(lambda k: jax.random.split(k, 4))(keys)  # [b, 4]: level, noise, dropout, label
        x0 = mb["image"]
        level = jax.vmap(objective.noise_level)(sub[:, 0])
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(sub[:, 1])
        y = None
        if state.num_classes is not None:
            y = guidance.drop_labels(sub[:, 3], mb["label"], state.label_dropout, state.num_classes)

        def loss_fn(params):
            def net(x_t, time, labels=y):  # the whole (micro)batch; each example's dropout masks from its own key
                return state.apply_fn({"params": params}, x_t, time, labels, train=True, dropout_keys=sub[:, 2])

            extra = {"labels": y, "null_label": state.num_classes} if objective.uses_labels else {}
            return objective.loss(net, x0, root_key, level=level, noise=noise, **extra)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return grads, metrics

    if microbatches == 1:
        grads, metrics = grads_of(batch)
    else:
        def accumulate(total, mb):
            g, m = grads_of(mb)
            return jax.tree_util.tree_map(lambda a, x: a + x.astype(a.dtype) / microbatches, total, (g, m)), None

        split = _split(batch, microbatches)
        shapes = jax.eval_shape(grads_of, jax.tree_util.tree_map(lambda a: a[0], split))
        # Sums in float32 at least (bfloat16 gradients of bfloat16 params would lose the small terms).
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, split)
        grads = jax.tree_util.tree_map(lambda g, s: g.astype(s.dtype), grads, shapes[0])
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optax.incremental_update(params, state.ema_params, step_size=1.0 - state.ema_decay)
    grad_norm = _tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    phema = state.posthoc_ema
    if phema is not None:
        phema = posthoc_ema.update(phema, params, state.step + 1)
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, posthoc_ema=phema)
    # Never let a non-finite update into the state: keep the old values (step still advances
    # so the loop can report which step failed).
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new, metrics

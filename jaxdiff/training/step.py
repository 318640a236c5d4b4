"""The pure training step. ``pmap``/``jit`` wrap it where it is used (training/parallel.py).

Randomness is derived, never carried: the key of example ``i`` of the global batch at step
``s`` is ``fold_in(fold_in(root, s), i)``, and it alone draws that example's timestep, noise,
dropout masks and label drop. So the update does not depend on how many devices or hosts
share the batch, and a resumed run reproduces the same keys without saving them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdiff import edm, flow, losses, posthoc_ema
from jaxdiff.schedules import Schedule
from jaxdiff.training.state import TrainState

__all__ = ["example_keys", "train_step"]

# optax.tree.norm replaces the deprecated optax.global_norm (older optax has only the latter).
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def example_keys(root: jax.Array, step: jax.Array, index: jax.Array) -> jax.Array:
    """``[B]`` keys ``fold_in(fold_in(root, step), index[b])`` for the examples at global positions ``index``."""
    step_key = jax.random.fold_in(root, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(index)


def train_step(state: TrainState, batch: dict, root_key: jax.Array, *, apply_fn: Callable,
               tx: optax.GradientTransformation,
               schedule: Schedule, prediction: str = "epsilon", weighting: str = "uniform", min_snr_gamma: float = 5.0,
               learned_variance: bool = False, ema_decay: float = 0.9999, num_classes: int | None = None,
               label_dropout: float = 0.0, objective: str = "diffusion", sigma_data: float = 0.5,
               p_mean: float = -1.2, p_std: float = 1.2,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, Any]]:
    """One optimizer step on a (local shard of a) global batch.

    Args:
      state: the train state. batch: ``image`` ``[B, H, W, C]`` in [-1, 1], ``index`` ``[B]`` int
        global positions in the global batch, and ``label`` ``[B]`` when conditional.
      root_key: the run's root key (from the seed).
      apply_fn: ``apply_fn({"params": p}, x, t, y, train=True, dropout_keys=keys)`` (a Flax
        module's ``apply``, e.g. :class:`jaxdiff.models.UNet`'s) with ``keys`` ``[B]``: each
        example's dropout masks must depend on its own key alone.
      label_dropout: probability of replacing a label by the null label ``num_classes``
        (classifier-free guidance training).
      objective: ``"diffusion"`` (:func:`jaxdiff.losses.diffusion_loss` on ``schedule``) or
        ``"flow_matching"`` (:func:`jaxdiff.flow.flow_matching_loss`, ``t ~ U[0, 1)`` fed to the
        network as ``999 t``) or ``"edm"`` (:func:`jaxdiff.edm.edm_loss`: ``ln sigma ~ N(p_mean, p_std^2)``,
        the network ``F`` preconditioned by :func:`jaxdiff.edm.precondition` with ``sigma_data`` and
        fed ``t = edm.unet_time(c_noise)``; ``schedule`` is unused).
      axis_name: the mapped axis to average gradients and metrics over (``pmap``), or None when
        the batch is a global array (``jit`` with shardings).

    The state's post-hoc EMA (``state.posthoc_ema``, if tracked) is updated after the optimizer step.

    Returns: the new state (the old one where the loss or a gradient is not finite) and metrics
      ``{"loss", "mse", "grad_norm", "finite"}`` averaged over the global batch.
    """
    keys = example_keys(root_key, state.step, batch["index"])
    sub = jax.vmap(lambda k: jax.random.split(k, 4))(keys)  # [B, 4]: t, noise, dropout, label
    x0 = batch["image"]
    if objective == "flow_matching":
        t = jax.vmap(lambda k: jax.random.uniform(k, ()))(sub[:, 0])
    elif objective == "edm":  # t is the noise level sigma
        t = jax.vmap(lambda k: edm.log_normal_sigma(k, (), p_mean, p_std))(sub[:, 0])
    else:
        t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))(sub[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(sub[:, 1])
    y = None
    if num_classes is not None:
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, label_dropout))(sub[:, 3])
        y = jnp.where(drop, num_classes, batch["label"])

    def loss_fn(params):
        def model_fn(x_t, tt):  # the whole batch; each example's dropout masks from its own key
            return apply_fn({"params": params}, x_t, tt, y, train=True, dropout_keys=sub[:, 2])

        if objective == "flow_matching":
            return flow.flow_matching_loss(flow.with_time_scale(model_fn), x0, root_key, t=t, noise=noise)
        if objective == "edm":
            denoiser = edm.precondition(lambda x, c: model_fn(x, edm.unet_time(c)), sigma_data=sigma_data)
            return edm.edm_loss(denoiser, x0, root_key, sigma_data=sigma_data, sigma=t, noise=noise)
        return losses.diffusion_loss(schedule, model_fn, x0, root_key, prediction=prediction, weighting=weighting,
                                     min_snr_gamma=min_snr_gamma, learned_variance=learned_variance, t=t, noise=noise)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree_util.tree_map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
    grad_norm = _tree_norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    phema = state.posthoc_ema
    if phema is not None:
        phema = posthoc_ema.update(phema, params, state.step + 1)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema, posthoc_ema=phema)
    # Never let a non-finite update into the state: keep the old values (step still advances
    # so the loop can report which step failed).
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    metrics = dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))
    return new, metrics

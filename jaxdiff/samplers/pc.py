"""Predictor-corrector sampling (Song et al. 2021, "Score-based generative modeling through SDEs", Alg. 2-5).

At each of ``n`` evenly spaced timesteps ``t_i`` (the DDPM/DDIM grid, :func:`~jaxdiff.samplers.spaced_timesteps`):

1. **corrector**: ``M`` steps of Langevin MCMC targeting ``p_{t_i}`` at fixed ``t_i``
   (``LangevinCorrector`` of the reference code):
   ``eps_step = 2 alpha_i (snr ||z|| / ||score||)^2``, ``x <- x + eps_step score + sqrt(2 eps_step) z``,
   with ``alpha_i = 1 - beta_{t_i}`` (VP) or 1 (VE). As in the reference code the two norms are
   per-example norms averaged over the batch, so one step size serves the batch (0 when the
   score is identically 0).
2. **predictor**: one ancestral (reverse-diffusion) step ``t_i -> t_{i+1}``: the respaced DDPM
   posterior (:func:`jaxdiff.samplers.ddpm.ddpm_step_between`), whose last step (to ``t = -1``)
   returns the ``x0`` estimate.

NFE = ``n (M + 1)``. ``n``, ``M`` and ``snr`` may be traced values.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.samplers.common import check_num_steps, run_loop, spaced_timesteps, steps_result
from jaxdiff.samplers.ddpm import ddpm_step_between
from jaxdiff.schedules import Schedule

__all__ = ["predictor_corrector", "pc_nfe", "langevin_step"]


def pc_nfe(num_steps, num_corrector_steps=1):
    """NFE of :func:`predictor_corrector`: ``n (M + 1)``."""
    return num_steps * (num_corrector_steps + 1)


def _norms(a: jax.Array) -> jax.Array:
    """Per-example L2 norm averaged over the batch: scalar."""
    return jnp.mean(jnp.sqrt(jnp.sum(a.reshape(a.shape[0], -1) ** 2, axis=-1)))


def langevin_step(schedule: Schedule, model_output, x_t, t, key, *, snr=0.16, prediction: str = "epsilon"):
    """One Langevin corrector step at ``t`` ``[B]`` int, in the schedule's coordinates."""
    _, eps = d.x0_eps_from_prediction(schedule, model_output, x_t, t, prediction)
    score = d.score_from_eps(schedule, t, eps)
    z = jax.random.normal(key, x_t.shape, x_t.dtype)
    alpha = schedule.alphas[t[0]] if schedule.kind == "vp" else jnp.ones((), jnp.float32)
    grad_norm = _norms(score)
    # A zero score (e.g. a freshly initialized network with a zero output layer) gives no
    # direction and an infinite step: skip the correction then.
    step = jnp.where(grad_norm > 0, 2.0 * alpha * (snr * _norms(z) / jnp.maximum(grad_norm, 1e-30)) ** 2, 0.0)
    return x_t + step * score + jnp.sqrt(2.0 * step) * z


def predictor_corrector(schedule: Schedule, model_fn: Callable, x_T, key, *, num_steps=None,
                        num_corrector_steps=1, snr=0.16, variance: str = "fixed_large",
                        prediction: str = "epsilon", clip_x0: bool = False):
    """Reverse-diffusion predictor + Langevin corrector from ``x_T`` to data.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] int32) -> [B, ...]``.
      num_steps: predictor steps ``n`` in ``[1, T]`` (default ``T``). num_corrector_steps: ``M``.
      snr: the corrector's signal-to-noise ratio (0.16 in Song et al. for CIFAR-10 VE).
      variance: the predictor's variance, ``"fixed_large"`` (beta, Song et al.'s ancestral
        predictor) or ``"fixed_small"``.
    Returns ``(x0 [B, ...], nfe = n (M + 1))``.
    """
    d.check_variance(variance, ("fixed_small", "fixed_large"))
    T = schedule.num_timesteps
    num_steps = check_num_steps(T if num_steps is None else num_steps, upper=T)
    if isinstance(num_corrector_steps, int) and num_corrector_steps < 0:
        raise ValueError(f"num_corrector_steps must be >= 0, got {num_corrector_steps}")
    b = x_T.shape[0]

    def body(i, x):
        t, t_prev = spaced_timesteps(T, num_steps, i)
        tb, tpb = jnp.full((b,), t), jnp.full((b,), t_prev)
        k_step = jax.random.fold_in(key, i)

        def corrector(j, x):
            out = model_fn(x, tb)
            return langevin_step(schedule, out, x, tb, jax.random.fold_in(k_step, j + 1), snr=snr,
                                 prediction=prediction)

        x = run_loop(corrector, x, num_corrector_steps)
        z = jax.random.normal(jax.random.fold_in(k_step, 0), x.shape, x.dtype)
        return ddpm_step_between(schedule, model_fn(x, tb), x, tb, tpb, z, prediction=prediction,
                                 variance=variance, clip_x0=clip_x0)

    return steps_result(num_steps, run_loop(body, x_T, num_steps), pc_nfe(num_steps, num_corrector_steps))

"""The model as the samplers see it: the ``Denoiser``, its adapters, and one driver ``sample_with_info``.

An objective (:mod:`jaxdiff.objectives`) turns its network into a :class:`Denoiser`; the
training job's sampling function calls :func:`sample_with_info` with it and never asks which
objective made it. A Denoiser always carries EDM's ``D(x, sigma)`` (VE coordinates
``x = x0 + sigma eps``) and, where the model has one, the view a sampler needs:

* a model trained on a discrete schedule (:func:`eps_denoiser`): the schedule, the raw
  ``model_fn(x_t, t)``, its prediction and learned-variance output, for every registry sampler;
* a flow-matching velocity (:func:`velocity_denoiser`): ``v(x_t, t)``, integrated by
  :func:`jaxdiff.flow.sample_with_info` (``euler`` / ``heun``);
* a denoiser alone (EDM): the samplers that take ``D`` (``edm``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion, edm, flow, samplers
from jaxdiff.samplers import registry
from jaxdiff.schedules import Schedule

__all__ = ["Denoiser", "eps_denoiser", "velocity_denoiser", "sample_with_info"]


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """``fn(x [B, ...], sigma [B]) -> x0_hat [B, ...]`` over the noise range ``[sigma_min, sigma_max]``, and
    the view of the model a sampler uses (module docstring): ``schedule``, ``model_fn``, ``prediction``,
    ``clip_x0``, ``learned_variance`` for a discrete-schedule model, ``velocity_fn`` for a flow."""

    fn: Callable
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    schedule: Schedule | None = None
    model_fn: Callable | None = None
    prediction: str = "epsilon"
    clip_x0: bool = False
    learned_variance: bool = False  # model_fn outputs 2C channels, the second half the variance
    velocity_fn: Callable | None = None  # v(x_t [B, ...], t [B] in [0, 1]) of the linear interpolant


def eps_denoiser(schedule: Schedule, model_fn: Callable, prediction: str = "epsilon", clip_x0: bool = False,
                 learned_variance: bool = False) -> Denoiser:
    """The Denoiser of a network ``model_fn(x_t, t)`` trained on ``schedule`` (EDM Table 1's VP / VE column)."""
    diffusion.check_prediction(prediction)
    return Denoiser(fn=edm.denoiser_from_eps(schedule, _first_half(model_fn) if learned_variance else model_fn,
                                             prediction, clip_x0),
                    sigma_min=schedule.sigmas[0], sigma_max=schedule.sigmas[schedule.num_timesteps - 1],
                    schedule=schedule, model_fn=model_fn, prediction=prediction, clip_x0=clip_x0,
                    learned_variance=learned_variance)


def _first_half(model_fn: Callable) -> Callable:
    def fn(x, t):
        out = model_fn(x, t)
        return out[..., : out.shape[-1] // 2]

    return fn


def velocity_denoiser(velocity_fn: Callable) -> Denoiser:
    """The Denoiser of a flow-matching velocity ``v(x_t, t)`` (``x_t = (1 - t) x0 + t eps``, ``t in [0, 1]``):
    ``t = sigma / (1 + sigma)``, ``x_t = x / (1 + sigma)``, ``D = x_t - t v(x_t, t)``."""

    def fn(x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        t = sigma / (1.0 + sigma)
        x_t = x / diffusion.bcast(1.0 + sigma, x)
        return x_t - diffusion.bcast(t, x) * velocity_fn(x_t, t)

    return Denoiser(fn=fn, sigma_min=0.0, sigma_max=float("inf"), velocity_fn=velocity_fn)


def sample_with_info(denoiser: Denoiser, key, shape, *, sampler: str, num_steps=None, **options):
    """Draws ``shape`` samples with the registry's ``sampler``: ``(x0 [B, ...], {"nfe": int32})``.

    ``num_steps`` ``None``: the sampler's default. The caller checks the request first
    (``Objective.check_sampler``); the sampler's ``options`` are forwarded.
    """
    spec = registry.get(sampler)
    if denoiser.velocity_fn is not None:
        n = 50 if num_steps is None else num_steps
        return flow.sample_with_info(denoiser.velocity_fn, key, shape, method=sampler, num_steps=n)
    if denoiser.schedule is None:
        n = registry.default_num_steps(sampler, 1000) if num_steps is None else num_steps
        k_init, k_steps = jax.random.split(key)
        x_T = jax.random.normal(k_init, shape, jnp.float32)
        x, nfe = spec.run(None, denoiser.fn, x_T, k_steps, num_steps=n, **options)
        return x, {"nfe": jnp.asarray(nfe, jnp.int32)}
    model_fn, options = denoiser.model_fn, dict(options)
    if denoiser.learned_variance and spec.learned_variance:
        options.setdefault("variance", "learned_range")
    elif denoiser.learned_variance:
        model_fn = _first_half(model_fn)
    return samplers.sample_with_info(denoiser.schedule, model_fn, key, shape, sampler=sampler,
                                     num_steps=None if spec.adaptive else num_steps, prediction=denoiser.prediction,
                                     clip_x0=denoiser.clip_x0, **options)

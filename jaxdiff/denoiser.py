"""The model as every sampler sees it: the :class:`~jaxdiff.denoiser.Denoiser` and the adapters that make one.

A Denoiser carries EDM's ``D(x, sigma)`` in VE coordinates ``x = x0 + sigma eps`` (the
probability-flow ODE is ``dx/dsigma = (x - D(x, sigma)) / sigma`` for every objective), the noise
range its samplers' grids are clipped to, and, for a model trained on a discrete schedule, the
*discrete view* the integer-grid samplers (ddpm, ddim, DPM-Solver++, pc, ode) need. The samplers
are in :mod:`jaxdiff.samplers` and never ask which objective made the Denoiser:

* :func:`eps_denoiser`: a network of any ``prediction`` on a discrete :class:`~jaxdiff.schedules.Schedule`
  (EDM Table 1's VP / VE column, :func:`denoiser_from_eps`), with its discrete view;
* :func:`velocity_denoiser`: a flow-matching velocity ``v(x_t, t)``;
* :func:`average_velocity_denoiser`: a MeanFlow average velocity ``u(z, r, t)`` (its view for the
  few-step sampler, and the instantaneous velocity ``u(z, t, t)`` as a flow);
* ``Denoiser(fn=D, ...)`` itself: an EDM-preconditioned network (:func:`jaxdiff.edm.precondition`).

:func:`prediction_fn` is the one conversion of a network's output to ``(x0_hat, eps_hat)`` on a schedule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.schedules import Schedule

__all__ = ["Denoiser", "eps_denoiser", "velocity_denoiser", "average_velocity_denoiser", "denoiser_from_eps",
           "prediction_fn", "mean_channels"]

EDM_SIGMA_MIN = 0.002  # the grid's lowest point where a model knows every noise level (EDM's choice)


@dataclasses.dataclass(frozen=True, eq=False)
class Denoiser:
    """``fn(x [B, ...], sigma [B]) -> x0_hat [B, ...]`` and what a sampler needs besides.

    Fields:

    * ``fn``: the denoiser ``D`` in VE coordinates.
    * ``sigma_min``, ``sigma_max``: the noise range the model knows; every sampler's sigma grid is
      clipped to it (``sigma_max = inf``: any level; a sampler's ``sigma_max`` option then sets the top).
    * ``prior_data_var``: the data variance assumed when the chain starts at ``sigma_max``: the start
      is ``sqrt(prior_data_var + sigma_max^2) z`` with ``z ~ N(0, I)``. 1 for a schedule model (its
      prior ``N(0, I)`` in VP coordinates), 0 for EDM's ``sigma_max z``.
    * ``schedule``, ``model_fn``, ``prediction``, ``clip_x0``, ``learned_variance``: the discrete view
      of a network ``model_fn(x_t, t)`` trained on ``schedule`` (``None`` for other models); with
      ``learned_variance`` it outputs ``2C`` channels, the second half the variance.
    * ``average_velocity_fn``: ``u(z [B, ...], r [B], t [B])`` of a MeanFlow model in the linear
      interpolant's coordinates (``z_t = (1 - t) x0 + t eps``), or ``None``.
    * ``consistency``: ``fn`` is a consistency function (the end of the trajectory through
      ``(x, sigma)``, :mod:`jaxdiff.consistency`), not a denoiser: only the consistency sampler runs it.
    """

    fn: Callable
    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = float("inf")
    prior_data_var: float = 0.0
    schedule: Schedule | None = None
    model_fn: Callable | None = None
    prediction: str = "epsilon"
    clip_x0: bool = False
    learned_variance: bool = False
    average_velocity_fn: Callable | None = None
    consistency: bool = False

    @property
    def discrete(self) -> bool:
        """Whether it has the discrete view (the integer-grid samplers can run it)."""
        return self.schedule is not None

    @property
    def views(self) -> tuple[str, ...]:
        """What it offers the samplers (:data:`jaxdiff.samplers.registry.VIEWS`)."""
        if self.consistency:
            return ("consistency",)
        return (("discrete",) if self.discrete else ()) + ("denoiser",) + (
            ("average_velocity",) if self.average_velocity_fn is not None else ())

    def __call__(self, x, sigma):
        return self.fn(x, sigma)


def prediction_fn(schedule: Schedule, model_fn: Callable, prediction: str = "epsilon", clip_x0: bool = False):
    """``fn(x_vp [B, ...], t [B] float) -> (x0_hat, eps_hat)``: one network evaluation.

    ``x_vp`` is in VP coordinates; the network is called in the schedule's coordinates
    (``from_vp``) at the fractional time ``t``. With ``clip_x0`` the x0 estimate is clipped to
    ``[-1, 1]`` and ``eps_hat`` recomputed from it (for image data).
    """
    d.check_prediction(prediction)

    def fn(x_vp, t):
        x_model = d.from_vp(schedule, x_vp, t)
        out = model_fn(x_model, t)
        x0, eps = d.x0_eps_from_prediction(schedule, out, x_model, t, prediction)
        if clip_x0:
            x0 = jnp.clip(x0, -1.0, 1.0)
            eps = d.eps_from_x0(schedule, x_model, t, x0)
        return x0, eps

    return fn


def denoiser_from_eps(schedule: Schedule, model_fn: Callable, prediction: str = "epsilon",
                      clip_x0: bool = False) -> Callable:
    """``D(x, sigma) = x0_hat`` from a network of the library's own objectives on ``schedule``.

    ``x`` ``[B, ...]`` is in EDM's coordinates ``x0 + sigma n``; the network ``model_fn(x_t, t)``
    (of any ``prediction``) is called at the fractional timestep ``t = t_from_sigma(sigma)`` on
    the VP input ``x / sqrt(1 + sigma^2)`` (mapped to the schedule's own coordinates for a VE
    schedule) through :func:`~jaxdiff.denoiser.prediction_fn`. For ``prediction="epsilon"`` on a VP schedule this is
    the VP column of EDM Table 1: ``D = x - sigma eps(x / sqrt(1 + sigma^2), t)``. A ``sigma``
    outside the schedule's range ``[schedule.sigmas[0], schedule.sigmas[-1]]`` is clamped to its
    end in ``t`` (the network never saw other noise levels).
    """
    predict = prediction_fn(schedule, model_fn, prediction, clip_x0)

    def fn(x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        x_vp = d.bcast(jax.lax.rsqrt(1.0 + sigma**2), x) * x
        return predict(x_vp, d.t_from_sigma(schedule, sigma))[0]

    return fn


def eps_denoiser(schedule: Schedule, model_fn: Callable, prediction: str = "epsilon", clip_x0: bool = False,
                 learned_variance: bool = False) -> Denoiser:
    """The Denoiser of a network ``model_fn(x_t, t)`` trained on ``schedule``, with its discrete view.

    Its range is the schedule's ``[sigmas[0], sigmas[T-1]]`` and its prior ``N(0, I)`` in VP
    coordinates (``prior_data_var = 1``).
    """
    d.check_prediction(prediction)
    first = mean_channels(model_fn) if learned_variance else model_fn
    return Denoiser(fn=denoiser_from_eps(schedule, first, prediction, clip_x0),
                    sigma_min=schedule.sigmas[0], sigma_max=schedule.sigmas[schedule.num_timesteps - 1],
                    prior_data_var=1.0, schedule=schedule, model_fn=model_fn, prediction=prediction,
                    clip_x0=clip_x0, learned_variance=learned_variance)


def mean_channels(model_fn: Callable) -> Callable:
    """``model_fn`` of a learned-variance network (``2C`` channels) cut to its first ``C``: the prediction."""

    def fn(x, t):
        out = model_fn(x, t)
        return out[..., : out.shape[-1] // 2]

    return fn


def velocity_denoiser(velocity_fn: Callable) -> Denoiser:
    """The Denoiser of a flow-matching velocity ``v(x_t, t)`` (``x_t = (1 - t) x0 + t eps``, ``t in [0, 1]``).

    The linear interpolant is the VE process scaled by ``1 / (1 + sigma)``: ``t = sigma / (1 + sigma)``,
    ``x_t = x / (1 + sigma)`` and ``x0_hat = x_t - t v(x_t, t)``. The range is every ``sigma``
    (down to EDM's 0.002) and the prior EDM's (``prior_data_var = 0``).
    """

    def fn(x, sigma):
        sigma = jnp.asarray(sigma, jnp.float32)
        t = sigma / (1.0 + sigma)
        x_t = x / d.bcast(1.0 + sigma, x)
        return x_t - d.bcast(t, x) * velocity_fn(x_t, t)

    return Denoiser(fn=fn)


def average_velocity_denoiser(average_velocity_fn: Callable) -> Denoiser:
    """The Denoiser of a MeanFlow average velocity ``u(z, r, t)`` (:mod:`jaxdiff.meanflow`).

    ``u(z, t, t)`` is the instantaneous velocity, so ``fn`` is that of :func:`velocity_denoiser`
    (every Karras-grid sampler runs it as a flow); the few-step sampler uses ``u`` itself.
    """
    flow = velocity_denoiser(lambda z, t: average_velocity_fn(z, t, t))
    return dataclasses.replace(flow, average_velocity_fn=average_velocity_fn)

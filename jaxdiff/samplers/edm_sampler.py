"""EDM Algorithm 2 (:func:`jaxdiff.edm.sample`) behind the registry's ``run`` contract, for ``objective="edm"``.

An EDM model is a denoiser ``D(x, sigma)`` in VE coordinates ``x = x0 + sigma n``; it has no
discrete :class:`~jaxdiff.schedules.Schedule`, so :func:`edm_sampler` ignores its ``schedule``
argument (pass ``None``), takes the denoiser as ``model_fn`` and a unit-normal ``x_T``, and starts
the chain at ``sigma_max x_T`` (the prior ``N(0, sigma_max^2 I)`` of EDM, whose data contribution
``var(x0) / sigma_max^2`` is neglected). Its options are the keyword-only parameters below: the
grid of EDM eq. 5 (``sigma_min``, ``sigma_max``, ``rho``) and the churn (``s_churn``, ``s_tmin``,
``s_tmax``, ``s_noise``). NFE ``2n - 1``; the default 18 steps is EDM's CIFAR-10 setting (35 NFE).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jaxdiff import edm
from jaxdiff.samplers.common import check_num_steps, steps_result

__all__ = ["edm_sampler", "edm_nfe", "MAX_STEPS"]

MAX_STEPS = 1000  # the grid's static capacity when ``num_steps`` is traced (a larger traced value is truncated)


def edm_nfe(num_steps):
    """Denoiser evaluations of :func:`edm_sampler` for ``n`` steps: ``2n - 1``."""
    return 2 * num_steps - 1


def edm_sampler(schedule, model_fn: Callable, x_T, key=None, *, num_steps=18, sigma_min=0.002, sigma_max=80.0,
                rho=7.0, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """EDM Algorithm 2 from ``sigma_max x_T``. Returns ``(x0 [B, ...], nfe)``.

    Args:
      schedule: ignored (an EDM model has no discrete schedule); ``None``.
      model_fn: the denoiser ``D(x [B, ...], sigma [B]) -> [B, ...]`` (:func:`jaxdiff.edm.precondition`).
      x_T: ``[B, ...]`` unit normal. key: the churn's randomness (unused when ``s_churn = 0``).
      num_steps: ``n``, a Python int or traced (then at most ``MAX_STEPS``).
      sigma_min, sigma_max, rho: the grid (EDM eq. 5). s_churn, s_tmin, s_tmax, s_noise: EDM's churn.
    """
    del schedule
    num_steps = check_num_steps(num_steps, upper=MAX_STEPS)
    capacity = num_steps if isinstance(num_steps, int) else MAX_STEPS
    sigmas = edm.karras_sigmas(num_steps, sigma_min, sigma_max, rho, max_steps=capacity)
    x = jnp.asarray(sigma_max, jnp.float32) * jnp.asarray(x_T, jnp.float32)
    out, info = edm.sample_with_info(model_fn, x, sigmas, key, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                     s_noise=s_noise)
    return steps_result(num_steps, out, info["nfe"])

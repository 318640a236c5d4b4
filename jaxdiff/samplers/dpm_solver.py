"""DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and its 3rd-order form).

The data-prediction exponential integrator of the probability-flow ODE in log-SNR time
``lambda = log(alpha / sigma)`` (here ``lambda`` is the schedule's ``log_snr = 2 log(alpha/sigma)``
and ``h`` is measured in half of it, the paper's lambda). With ``x0_i`` the model's data
prediction at ``lambda_i`` and ``h = lambda_{i+1} - lambda_i``:

* order 1 (= DDIM): ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) x0_i``;
* order 2 ("2M"): ``x0_i`` replaced by ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}``, ``r = h_{i-1}/h``;
* order 3: the two-difference form of the official code (``phi_2 = phi_1/h + 1``,
  ``phi_3 = phi_2/h - 1/2``).

The first steps use the orders their history allows (1, then 2, ...); with
``lower_order_final`` (default) the last step is first order (and, for order 3, the one before
it at most second order), as in the reference implementation.

Grid (``n = num_steps`` steps, NFE = ``n``): ``n + 1`` points from ``t_max`` to ``t = 0``,
uniform in log-SNR (``spacing="logsnr"``, default) or in ``t`` (``spacing="time"``); ``t_max`` is the
time of the option ``sigma_max`` (default 80, clipped to the schedule's range; ``None``: ``t = T-1``),
and the prior draw ``x_T`` is taken as the VP state there, as the Karras-grid samplers do
(:mod:`jaxdiff.samplers.karras`: the approximation neglects ``var(x0) / (1 + sigma_max^2)``); the network
is evaluated at the first ``n``, and the solution at ``t = 0`` is returned as
``x_0 / alpha_0 = x0 + sigma_0 eps`` (``sigma_0 = schedule.sigmas[0]``, 0.01 for the linear
schedule) -- the reference implementation's ``denoise_to_zero=False``. ``denoise_final=True``
returns the network's ``x0`` estimate at ``t = 0`` instead, for one more NFE. The grid is
computed inside the loop from ``(i, n)``, so ``n`` may be a traced value.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.samplers.common import (
    alpha_sigma_from_log_snr,
    bcast,
    check_num_steps,
    clipped_sigma_max,
    denoiser,
    run_loop,
    steps_result,
    t_from_log_snr,
)
from jaxdiff.schedules import Schedule

__all__ = ["dpm_solver_pp", "dpm_solver_nfe", "SPACINGS"]

SPACINGS = ("logsnr", "time")


def dpm_solver_nfe(num_steps, denoise_final: bool = False):
    """NFE of :func:`dpm_solver_pp`: one network evaluation per step (plus one with ``denoise_final``)."""
    return num_steps + int(denoise_final)


def _log_snr_grid(schedule: Schedule, num_steps, i, spacing: str, sigma_max=None):
    """``log_snr`` at point ``i`` of ``num_steps + 1`` (``i = 0``: ``sigma_max``, clipped; ``i = n``: ``t = 0``)."""
    T = schedule.num_timesteps
    frac = jnp.asarray(i, jnp.float32) / jnp.asarray(num_steps, jnp.float32)
    lo, hi = -2.0 * jnp.log(clipped_sigma_max(schedule, sigma_max)), schedule.log_snr[0]
    if spacing == "logsnr":
        return lo + (hi - lo) * frac
    t = t_from_log_snr(schedule, lo) * (1.0 - frac)
    return jnp.interp(t, jnp.arange(T, dtype=jnp.float32), schedule.log_snr)


def dpm_solver_pp(schedule: Schedule, model_fn: Callable, x_T, key=None, *, num_steps=20, order: int = 2,
                  spacing: str = "logsnr", lower_order_final: bool = True, denoise_final: bool = False,
                  sigma_max=80.0, prediction: str = "epsilon", clip_x0: bool = False):
    """DPM-Solver++ (multistep, orders 1-3) from ``x_T`` (schedule coordinates at ``t = T-1``) to data.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B] float) -> [B, ...]`` of ``prediction``.
      x_T: ``[B, ...]``. key: unused (deterministic sampler; kept for the common signature).
      num_steps: steps ``n`` = NFE, a Python or traced int >= 1 (default 20). order: 1, 2 or 3.
      spacing: ``"logsnr"`` or ``"time"``.
      lower_order_final: first order on the last step (and at most second order on the one
        before it for ``order=3``), as the reference implementation does for few steps.
      denoise_final: return the network's ``x0`` estimate at ``t = 0`` (one more NFE) instead of
        the solution at ``t = 0`` divided by ``alpha_0``.
      sigma_max: the noise level the chain starts from (clipped to the schedule's; ``None``: ``t = T-1``).
    Returns ``(x [B, ...], nfe)``: ``x = x0 + sigma_0 eps`` (``sigma_0 = schedule.sigmas[0]``)
    in data coordinates, or the ``x0`` estimate with ``denoise_final``.
    """
    del key
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    num_steps = check_num_steps(num_steps)
    denoise = denoiser(schedule, model_fn, prediction, clip_x0)
    T = schedule.num_timesteps
    b = x_T.shape[0]
    x = d.to_vp(schedule, x_T, jnp.full((b,), T - 1, jnp.int32))
    zeros = jnp.zeros_like(x)
    one = jnp.ones((), jnp.float32)
    n = num_steps

    def body(i, carry):
        x, m1, m2, h1, h2 = carry  # the previous two x0 estimates and steps (in half log-SNR)
        lam_s = _log_snr_grid(schedule, n, i, spacing, sigma_max)
        lam_t = _log_snr_grid(schedule, n, i + 1, spacing, sigma_max)
        x0, _ = denoise(x, jnp.full((b,), t_from_log_snr(schedule, lam_s)))
        _, sigma_s = alpha_sigma_from_log_snr(lam_s)
        alpha_t, sigma_t = alpha_sigma_from_log_snr(lam_t)
        h = 0.5 * (lam_t - lam_s)
        phi1 = jnp.expm1(-h)
        # Effective order: limited by the history (i + 1) and, optionally, near the end.
        k = jnp.minimum(order, i + 1)
        if lower_order_final:
            k = jnp.minimum(k, n - i)
        x_1 = (sigma_t / sigma_s) * x - alpha_t * phi1 * x0
        x_new = x_1
        if order >= 2:
            r0 = h1 / h
            d1_0 = (x0 - m1) / r0
            x_2 = x_1 - 0.5 * alpha_t * phi1 * d1_0
            x_new = jnp.where(k >= 2, x_2, x_new)
        if order >= 3:
            r1 = h2 / h
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            x_3 = x_1 + alpha_t * phi2 * d1 - alpha_t * phi3 * d2
            x_new = jnp.where(k >= 3, x_3, x_new)
        return x_new, x0, m1, h, h1

    x, *_ = run_loop(body, (x, zeros, zeros, one, one), n)
    t0 = jnp.zeros((b,), jnp.float32)
    if denoise_final:
        x = denoise(x, t0)[0].astype(x.dtype)
    else:
        x = x / bcast(d.alpha_sigma(schedule, t0)[0], x)
    return steps_result(n, x, dpm_solver_nfe(n, denoise_final))

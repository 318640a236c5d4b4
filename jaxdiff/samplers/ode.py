"""The probability-flow ODE (Song et al. 2021), solved adaptively with diffrax.

Time variable: the schedule's log-SNR ``lambda = log(abar/(1 - abar))``; state: VP coordinates
``x = alpha x0 + sigma eps`` (``alpha^2 = sigmoid(lambda)``, ``sigma^2 = sigmoid(-lambda)``). From
``d(x/alpha)/d(sigma/alpha) = eps_hat`` (the PF-ODE in the VE view),

    dx/dlambda = (sigma^2 x - sigma eps_hat(x, lambda)) / 2,

a smooth, well-scaled field over ``lambda in [log_snr[T-1], log_snr[0]]`` whatever the
schedule's kind (the network is called at the fractional timestep of ``lambda``).

Sampling integrates from ``t = T-1`` to ``t = 0`` with an embedded Runge-Kutta pair (Tsit5 or
Dopri5, both 7-stage "first same as last") under a PID step-size controller, then takes the
network's ``x0`` estimate at ``t = 0`` (one more evaluation), like the last DDIM step.

NFE = ``1 + 6 * (accepted + rejected steps) + 1``: one evaluation at the start, six new
stages per attempted step (the seventh is the next step's first), one final denoising call.
The count is per chain (under ``vmap`` each key has its own adaptive steps).
"""

from __future__ import annotations

from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.samplers.common import alpha_sigma_from_log_snr, denoiser, t_from_log_snr
from jaxdiff.schedules import Schedule

__all__ = ["SOLVERS", "pf_ode_drift", "solve_ode", "probability_flow", "ode_nfe"]

SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5}
_STAGES_PER_STEP = 6  # Tsit5 / Dopri5: 7 stages, first same as last


def ode_nfe(num_solver_steps):
    """NFE of :func:`probability_flow` from diffrax's ``num_steps`` (accepted + rejected)."""
    return 2 + _STAGES_PER_STEP * num_solver_steps


def pf_ode_drift(schedule: Schedule, model_fn: Callable, prediction: str = "epsilon", clip_x0: bool = False):
    """``f(lambda, x_vp [B, ...]) -> dx/dlambda [B, ...]``, one network evaluation per call."""
    denoise = denoiser(schedule, model_fn, prediction, clip_x0)

    def f(lam, x):
        _, sigma = alpha_sigma_from_log_snr(lam)
        _, eps = denoise(x, jnp.full((x.shape[0],), t_from_log_snr(schedule, lam)))
        return (0.5 * (sigma**2 * x - sigma * eps)).astype(x.dtype)  # the state's dtype, whatever the model's

    return f


def solve_ode(vector_field: Callable, y0, lam0, lam1, *, rtol=1e-5, atol=1e-5, solver: str = "tsit5",
              max_steps: int = 4096, initial_steps: int = 32):
    """Integrates ``dy/dlambda = vector_field(lambda, y)`` (any pytree ``y``) from ``lam0`` to ``lam1``.

    ``rtol``/``atol`` may be traced. The first step is ``(lam1 - lam0) / initial_steps`` (given,
    so no extra evaluations are spent choosing it). Returns ``(y1, num_solver_steps)``.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {solver!r}")
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda lam, y, args: vector_field(lam, y)),
        SOLVERS[solver](),
        t0=lam0,
        t1=lam1,
        dt0=(lam1 - lam0) / initial_steps,
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
        adjoint=diffrax.ForwardMode(),  # plain lax.while_loop: nothing is differentiated
    )
    y1 = jax.tree.map(lambda a: a[-1], sol.ys)
    return y1, sol.stats["num_steps"]


def probability_flow(schedule: Schedule, model_fn: Callable, x_T, key=None, *, rtol=1e-5, atol=1e-5,
                     solver: str = "tsit5", max_steps: int = 4096, prediction: str = "epsilon",
                     clip_x0: bool = False):
    """Samples by solving the PF-ODE adaptively from ``x_T`` (schedule coordinates at ``t = T-1``).

    ``model_fn(x_t [B, ...], t [B] float) -> [B, ...]``. The batch is one ODE system (a shared
    step size). ``rtol``/``atol`` may be traced. Returns ``(x0 [B, ...], nfe)`` with ``nfe`` an
    int32 scalar (see the module docstring).
    """
    del key
    T = schedule.num_timesteps
    b = x_T.shape[0]
    x = d.to_vp(schedule, x_T, jnp.full((b,), T - 1, jnp.int32))
    lam0, lam1 = schedule.log_snr[T - 1], schedule.log_snr[0]
    x, steps = solve_ode(pf_ode_drift(schedule, model_fn, prediction, clip_x0), x, lam0, lam1, rtol=rtol,
                         atol=atol, solver=solver, max_steps=max_steps)
    x0, _ = denoiser(schedule, model_fn, prediction, clip_x0)(x, jnp.zeros((b,), jnp.float32))
    return x0.astype(x.dtype), ode_nfe(steps)

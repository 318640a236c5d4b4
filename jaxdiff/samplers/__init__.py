"""Reverse-process samplers: single steps, one module per sampler family, one registry, one entry point.

Use :func:`sample_denoiser` on any :class:`jaxdiff.denoiser.Denoiser`, or :func:`sample` /
:func:`sample_with_info` on a network trained on a discrete schedule, with ``sampler=`` one of
the keys of :data:`SAMPLERS` (``"ddpm"``, ``"ddim"``, ``"dpm_solver++"``/``"dpm++2m"``, ``"pc"``,
``"ode"`` on a schedule; ``"euler"``, ``"heun"``, ``"euler_ancestral"``, ``"edm"`` on any
Denoiser); :mod:`jaxdiff.samplers.registry` says what each accepts. A step count below 1
raises when it is concrete; a traced one gives NaN samples and NFE 0 (:mod:`jaxdiff.samplers.common`).
"""

from jaxdiff.samplers import registry
from jaxdiff.samplers.common import (
    prior_sample,
    run_loop,
    spaced_timesteps,
    steps_result,
    t_from_log_snr,
    t_from_sigma,
)
from jaxdiff.samplers.ddim import ddim_loop, ddim_sigma, ddim_step
from jaxdiff.samplers.ddpm import ddpm_loop, ddpm_step, ddpm_step_between, respaced_posterior
from jaxdiff.samplers.dpm_solver import dpm_solver_pp
from jaxdiff.samplers.driver import sample, sample_denoiser, sample_with_info
from jaxdiff.samplers.karras import euler, euler_ancestral, grid_sigma, heun, heun_on_grid
from jaxdiff.samplers.ode import pf_ode_drift, probability_flow
from jaxdiff.samplers.pc import langevin_step, predictor_corrector
from jaxdiff.samplers.registry import SAMPLERS, Sampler, nfe

__all__ = [
    "SAMPLERS", "Sampler", "registry", "nfe", "sample", "sample_with_info", "sample_denoiser",
    "ddpm_step", "ddpm_step_between", "respaced_posterior", "ddpm_loop",
    "ddim_step", "ddim_sigma", "ddim_loop",
    "dpm_solver_pp", "euler", "heun", "heun_on_grid", "euler_ancestral", "grid_sigma",
    "predictor_corrector", "langevin_step", "probability_flow", "pf_ode_drift",
    "prior_sample", "run_loop", "spaced_timesteps", "steps_result", "t_from_log_snr", "t_from_sigma",
]

"""Reverse-process samplers: single steps, one module per sampler family, one entry point.

Use :func:`sample` / :func:`sample_with_info` with ``sampler=`` one of the keys of
:data:`SAMPLERS` (``"ddpm"``, ``"ddim"``, ``"dpm_solver++"``/``"dpm++2m"``, ``"euler"``,
``"heun"``, ``"euler_ancestral"``, ``"pc"``, ``"ode"``).
"""

from jaxdiff.samplers.common import t_from_log_snr, t_from_sigma
from jaxdiff.samplers.ddim import ddim_sigma, ddim_step
from jaxdiff.samplers.ddpm import ddpm_step, ddpm_step_between, respaced_posterior
from jaxdiff.samplers.dpm_solver import dpm_solver_pp
from jaxdiff.samplers.driver import (
    SAMPLERS,
    Sampler,
    nfe,
    prior_sample,
    run_loop,
    sample,
    sample_with_info,
    spaced_timesteps,
)
from jaxdiff.samplers.karras import euler, euler_ancestral, heun, karras_sigmas
from jaxdiff.samplers.ode import pf_ode_drift, probability_flow
from jaxdiff.samplers.pc import langevin_step, predictor_corrector

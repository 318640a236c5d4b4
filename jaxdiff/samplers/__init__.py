"""Reverse-process samplers: single steps and the compiled loop driver."""

from jaxdiff.samplers.ddim import ddim_sigma, ddim_step
from jaxdiff.samplers.ddpm import ddpm_step, ddpm_step_between, respaced_posterior
from jaxdiff.samplers.driver import SAMPLERS, prior_sample, run_loop, sample, spaced_timesteps

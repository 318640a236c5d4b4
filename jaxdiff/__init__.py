"""jaxdiff: diffusion models as pure JAX functions.

Modules: :mod:`~jaxdiff.schedules` (noise schedules), :mod:`~jaxdiff.diffusion` (forward process,
the model's reverse posterior, parameterization conversions), :mod:`~jaxdiff.losses` (training
objectives and the variational bound), :mod:`~jaxdiff.samplers` (every reverse sampler, one
registry, one entry point), :mod:`~jaxdiff.guidance` (classifier-free / classifier guidance,
inpainting), :mod:`~jaxdiff.likelihood` (PF-ODE NLL), :mod:`~jaxdiff.flow` (flow matching),
:mod:`~jaxdiff.oracle` (an exact Gaussian-mixture "network" for testing samplers),
:mod:`~jaxdiff.objectives` (each training objective as one value: noise levels, loss, denoiser),
:mod:`~jaxdiff.pipeline` (a model, its parameters and sampling defaults as one object with ``.sample``).
The UNet is in :mod:`jaxdiff.models` and the training job in :mod:`jaxdiff.training`; both are
imported on first use of ``jaxdiff.models`` / ``jaxdiff.training``. ``to_uint8`` / ``from_uint8``
convert between uint8 images and the models' ``[-1, 1]`` (:mod:`jaxdiff.data`).
"""

from jaxdiff import diffusion, flow, guidance, likelihood, losses, oracle, samplers, schedules
from jaxdiff.diffusion import p_mean_variance, q_posterior, q_sample
from jaxdiff.losses import diffusion_loss, variational_bound
from jaxdiff.samplers import ddim_step, ddpm_step, sample, sample_with_info
from jaxdiff.schedules import (
    Schedule,
    cosine_schedule,
    linear_schedule,
    schedule_from_betas,
    sigmoid_schedule,
    ve_schedule,
)

__version__ = "0.1.0"

# Imported on first attribute access: modules, and names with the module that defines them.
_LAZY = ("data", "edm", "metrics", "models", "objectives", "pipeline", "posthoc_ema", "training")
_LAZY_NAMES = {"from_diffusers_pipeline": "jaxdiff.models", "Pipeline": "jaxdiff.pipeline",
               "to_uint8": "jaxdiff.data", "from_uint8": "jaxdiff.data"}


def __getattr__(name: str):
    import importlib

    if name in _LAZY:
        return importlib.import_module(f"jaxdiff.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'jaxdiff' has no attribute {name!r}")

__all__ = [
    "diffusion", "flow", "guidance", "likelihood", "losses", "oracle", "samplers", "schedules",
    "Schedule", "linear_schedule", "cosine_schedule", "sigmoid_schedule", "schedule_from_betas", "ve_schedule",
    "q_sample", "q_posterior", "p_mean_variance", "diffusion_loss", "variational_bound",
    "ddpm_step", "ddim_step", "sample", "sample_with_info", "from_diffusers_pipeline", "Pipeline",
    "to_uint8", "from_uint8",
]

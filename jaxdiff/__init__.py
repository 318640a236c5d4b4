"""jaxdiff: diffusion models as pure JAX functions.

Modules: :mod:`~jaxdiff.schedules` (noise schedules), :mod:`~jaxdiff.diffusion` (forward process,
posterior, parameterization conversions), :mod:`~jaxdiff.losses` (training objectives and the
variational bound), :mod:`~jaxdiff.samplers` (every reverse sampler, one entry point),
:mod:`~jaxdiff.guidance` (classifier-free / classifier guidance, inpainting),
:mod:`~jaxdiff.likelihood` (PF-ODE NLL), :mod:`~jaxdiff.flow` (flow matching),
:mod:`~jaxdiff.oracle` (an exact Gaussian-mixture "network" for testing samplers).
The UNet is in :mod:`jaxdiff.models` and the training job in :mod:`jaxdiff.training`.
"""

from jaxdiff import diffusion, flow, guidance, likelihood, losses, oracle, samplers, schedules
from jaxdiff.diffusion import q_posterior, q_sample
from jaxdiff.schedules import (
    Schedule,
    cosine_schedule,
    linear_schedule,
    schedule_from_betas,
    sigmoid_schedule,
    ve_schedule,
)

__version__ = "0.1.0"

"""jaxdiff: diffusion models as pure JAX functions."""

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

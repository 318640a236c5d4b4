"""Networks: the DDPM UNet, DiT and the Stable Diffusion autoencoder, their blocks and presets, and NNX's UNet."""

from jaxdiff.models.autoencoder import AutoencoderKL, sample_latents, sd_vae
from jaxdiff.models.diffusers import from_diffusers, to_diffusers
from jaxdiff.models.diffusers_pipeline import (
    DiffusersPipeline,
    SamplingDefaults,
    from_diffusers_pipeline,
    to_diffusers_pipeline,
)
from jaxdiff.models.dit import DiT, DiTLayout
from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.nnx import from_linen_params, nnx_unet, to_linen_params
from jaxdiff.models.presets import PRESETS, check_model_image_size, get_model
from jaxdiff.models.unet import (
    UNet,
    check_image_size,
    count_params,
    ddpm_cifar10,
    digits,
    small,
    tiny,
)

__all__ = [
    "AutoencoderKL",
    "PRESETS",
    "DiT",
    "DiTLayout",
    "DiffusersPipeline",
    "SamplingDefaults",
    "UNet",
    "check_image_size",
    "check_model_image_size",
    "count_params",
    "ddpm_cifar10",
    "digits",
    "from_diffusers",
    "from_diffusers_pipeline",
    "from_linen_params",
    "get_model",
    "nnx_unet",
    "sample_latents",
    "sd_vae",
    "small",
    "timestep_embedding",
    "tiny",
    "to_diffusers",
    "to_diffusers_pipeline",
    "to_linen_params",
]

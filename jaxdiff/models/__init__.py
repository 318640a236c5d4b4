"""Networks: the DDPM UNet, its building blocks and presets, and the UNet for NNX users."""

from jaxdiff.models.layers import timestep_embedding
from jaxdiff.models.nnx import from_linen_params, nnx_unet, to_linen_params
from jaxdiff.models.unet import (
    PRESETS,
    UNet,
    check_image_size,
    count_params,
    ddpm_cifar10,
    digits,
    get_model,
    small,
    tiny,
)

__all__ = [
    "PRESETS",
    "UNet",
    "check_image_size",
    "count_params",
    "ddpm_cifar10",
    "digits",
    "from_linen_params",
    "get_model",
    "nnx_unet",
    "small",
    "timestep_embedding",
    "tiny",
    "to_linen_params",
]

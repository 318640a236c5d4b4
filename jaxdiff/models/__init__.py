"""Networks: the DDPM UNet, its building blocks and presets."""

from jaxdiff.models.layers import timestep_embedding
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
    "get_model",
    "small",
    "tiny",
    "timestep_embedding",
]

"""Every model preset by name, the UNets' and the DiTs', and :func:`get_model` that builds one.

A preset is a ``functools.partial`` of a network class; :func:`get_model` applies field
overrides to it (the training setup passes ``conv_backward``, ``num_classes``, ``learn_sigma``,
``dtype``, ``remat`` and ``time_inputs``, which every network takes).
"""

from __future__ import annotations

import flax.linen as nn

from jaxdiff.models.dit import DIT_PRESETS, DiT, check_patch_size
from jaxdiff.models.unet import UNET_PRESETS, check_image_size

__all__ = ["PRESETS", "check_model_image_size", "get_model"]

#: The presets by name (what :func:`get_model` builds): ``ddpm_cifar10``, ``small``, ``digits``,
#: ``tiny`` (:class:`~jaxdiff.models.UNet`) and ``dit_{s,b,l,xl}_{2,4,8}`` (:class:`~jaxdiff.models.DiT`).
PRESETS = {**UNET_PRESETS, **DIT_PRESETS}


def get_model(name: str, **overrides) -> nn.Module:
    """Build the preset ``name`` with field ``overrides`` (e.g. ``num_classes=10``).

    A field the preset's network lacks raises ``ValueError`` naming it and the network's fields.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(PRESETS)}")
    preset = PRESETS[name]
    fields = set(preset.func.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"model {name!r} ({preset.func.__name__}) has no field(s) {unknown}; "
                         f"its fields: {sorted(fields)}")
    return preset(**overrides)


def check_model_image_size(model: nn.Module, image_size: int) -> None:
    """Raise ``ValueError`` unless ``model`` takes ``image_size x image_size`` inputs.

    A :class:`~jaxdiff.models.UNet` must halve it ``len(ch_mult) - 1`` times, a
    :class:`~jaxdiff.models.DiT` cut it into whole patches.
    """
    if isinstance(model, DiT):
        check_patch_size(image_size, model.patch_size, "image")
    else:
        check_image_size(image_size, model.ch_mult)

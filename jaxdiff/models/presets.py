"""Every model preset by name, the UNets' and the DiTs', and :func:`get_model` that builds one.

A preset is a ``functools.partial`` of a network class; :func:`get_model` applies field
overrides to it (the training setup passes ``conv_backward``, ``num_classes``, ``learn_sigma``,
``dtype``, ``remat`` and ``time_inputs``, which every network takes).
"""

from __future__ import annotations

import flax.linen as nn

from jaxdiff.models.dit import DIT_PRESETS
from jaxdiff.models.unet import UNET_PRESETS

__all__ = ["PRESETS", "get_model"]

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

"""diffusers ``UNet2DModel`` configs <-> :class:`~jaxdiff.models.unet.UNet` fields (the DDPM family).

Supported ``config.json`` settings (missing keys take diffusers' defaults, ``DEFAULTS``):
``down_block_types`` ``DownBlock2D``/``AttnDownBlock2D`` and ``up_block_types``
``UpBlock2D``/``AttnUpBlock2D`` with attention at the same levels on both sides,
``mid_block_type`` ``UNetMidBlock2D``, ``block_out_channels`` (multiples of the first),
``layers_per_block``, ``in_channels``, ``out_channels``, ``sample_size``, ``flip_sin_to_cos``,
``freq_shift``, ``downsample_padding`` 0/1, ``norm_num_groups`` (every GroupNorm),
``attn_norm_num_groups`` (``null`` or ``norm_num_groups``), ``norm_eps``,
``attention_head_dim``, ``resnet_time_scale_shift`` ``default``/``scale_shift``,
``num_class_embeds``, ``add_attention``, ``dropout``, ``time_embedding_type`` ``positional``,
``act_fn`` ``silu``, ``mid_block_scale_factor`` 1, ``center_input_sample`` false,
``downsample_type``/``upsample_type`` ``conv``, ``class_embed_type`` null, ``time_embedding_dim``
null (or ``4 * block_out_channels[0]``). Anything else is refused naming the setting.

Export (:func:`~jaxdiff.models.diffusers_config.config_from_unet`) maps jaxdiff's own options where
diffusers can hold them:
``norm_groups=None`` when its rule gives one group count for every width, ``attn_resolutions``
at a given ``sample_size``, ``num_heads`` when every attention layer has the same width,
``learn_sigma`` as ``out_channels = 2 C``; otherwise ``ValueError`` names the field.

An imported class-conditional model has ``num_classes = num_class_embeds - 1``: its table has
the same ``num_class_embeds`` rows and every label diffusers accepts means the same row; the
last row is what jaxdiff uses when ``y`` is ``None``.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxdiff.models.layers import num_groups
from jaxdiff.models.unet import Layout, UNet, check_image_size

__all__ = ["DEFAULTS", "WRITTEN_VERSION", "DiffusersUNet", "config_from_unet", "unet_from_config"]

_DDPM = Layout()


class DiffusersUNet(UNet):
    """The :class:`~jaxdiff.models.unet.UNet` with the layout details diffusers' ``UNet2DModel`` varies.

    The same network, parameter tree and call as ``UNet`` (``(x [B, H, W, C], t [B], y [B] | None)
    -> [B, H, W, C_out]``); its extra fields are those of :class:`~jaxdiff.models.unet.Layout`
    (defaults: DDPM's), set by :func:`unet_from_config` from a ``config.json``.
    """

    norm_eps: float = _DDPM.norm_eps
    flip_sin_to_cos: bool = _DDPM.flip_sin_to_cos
    freq_shift: float = _DDPM.freq_shift
    downsample_padding: int = _DDPM.downsample_padding
    attn_levels: tuple[int, ...] | None = _DDPM.attn_levels
    head_dim: int | None = _DDPM.head_dim
    mid_attn: bool = _DDPM.mid_attn
    mid_attn_norm: bool = _DDPM.mid_attn_norm

    def layout(self) -> Layout:
        """This network's layout details: its fields."""
        return Layout(**{name: getattr(self, name) for name in Layout._fields})

WRITTEN_VERSION = "0.42.1"  # the diffusers release whose config.json layout config_from_unet writes

# diffusers' UNet2DModel.__init__ defaults (0.42), for keys an older config.json omits.
DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}
# Settings with the only value (or values) jaxdiff implements.
_ONLY = {
    "time_embedding_type": ("positional",), "act_fn": ("silu",), "center_input_sample": (False,),
    "mid_block_scale_factor": (1,), "mid_block_type": ("UNetMidBlock2D",), "downsample_type": ("conv",),
    "upsample_type": ("conv",), "class_embed_type": (None,), "resnet_time_scale_shift": ("default", "scale_shift"),
    "downsample_padding": (0, 1),
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _block_attention(types, known: dict, setting: str) -> list[bool]:
    out = []
    for name in types:
        base = name.removeprefix("UNetRes")
        if base not in known:
            raise ValueError(f"{setting}: block type {name!r} is not supported (supported: {sorted(known)})")
        out.append(known[base])
    return out


def unet_from_config(config: dict) -> tuple[DiffusersUNet, dict]:
    """The :class:`DiffusersUNet` of a diffusers ``UNet2DModel`` config, and ``{"in_channels", "sample_size"}``.

    Raises ``ValueError`` naming the first setting it cannot reproduce exactly.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unsupported setting(s) {unknown}")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for key, allowed in _ONLY.items():
        if c[key] not in allowed:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (supported: {list(allowed)})")
    chans = [int(v) for v in c["block_out_channels"]]
    levels = len(chans)
    if not levels or min(chans) < 1:
        raise ValueError(f"config.json: block_out_channels={chans} must be non-empty positive ints")
    if len(c["down_block_types"]) != levels or len(c["up_block_types"]) != levels:
        raise ValueError(
            f"config.json: down_block_types ({len(c['down_block_types'])}) and up_block_types "
            f"({len(c['up_block_types'])}) must have one entry per block_out_channels ({levels})"
        )
    down = _block_attention(c["down_block_types"], _DOWN, "down_block_types")
    up = _block_attention(c["up_block_types"], _UP, "up_block_types")[::-1]  # up_blocks[k] is level L-1-k
    if down != up:
        raise ValueError(
            f"config.json: attention at down levels {[i for i in range(levels) if down[i]]} but up levels "
            f"{[i for i in range(levels) if up[i]]} (down_block_types vs up_block_types): jaxdiff needs them equal"
        )
    ch = chans[0]
    if any(v % ch for v in chans):
        raise ValueError(f"config.json: block_out_channels={chans} must be multiples of the first")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise ValueError(f"config.json: time_embedding_dim={c['time_embedding_dim']} (jaxdiff uses 4 * {ch})")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1 or any(v % groups for v in chans):
        raise ValueError(f"config.json: norm_num_groups={groups!r} must be an int dividing block_out_channels={chans}")
    scale_shift = c["resnet_time_scale_shift"] == "scale_shift"
    if c["attn_norm_num_groups"] not in (None, groups):
        raise ValueError(f"config.json: attn_norm_num_groups={c['attn_norm_num_groups']} (only null or {groups})")
    attn_levels = tuple(i for i in range(levels) if down[i])
    head_dim = c["attention_head_dim"]
    if head_dim is not None:
        attn_chans = [chans[i] for i in attn_levels] + ([chans[-1]] if c["add_attention"] else [])
        if not isinstance(head_dim, int) or head_dim < 1 or any(v % head_dim for v in attn_chans):
            raise ValueError(
                f"config.json: attention_head_dim={head_dim!r} must divide the attention widths {attn_chans}"
            )
    num_class_embeds = c["num_class_embeds"]
    if num_class_embeds is not None and (not isinstance(num_class_embeds, int) or num_class_embeds < 1):
        raise ValueError(f"config.json: num_class_embeds={num_class_embeds!r} must be a positive int")
    for key in ("in_channels", "out_channels", "layers_per_block"):
        if not isinstance(c[key], int) or c[key] < 1:
            raise ValueError(f"config.json: {key}={c[key]!r} must be a positive int")
    sample_size = c["sample_size"]
    for size in [] if sample_size is None else np.atleast_1d(sample_size).tolist():
        check_image_size(int(size), [1] * levels)
    model = DiffusersUNet(
        ch=ch, ch_mult=tuple(v // ch for v in chans), num_res_blocks=c["layers_per_block"], attn_resolutions=(),
        dropout=float(c["dropout"]), num_classes=None if num_class_embeds is None else num_class_embeds - 1,
        out_channels=c["out_channels"], scale_shift=scale_shift, num_heads=1, norm_groups=groups,
        norm_eps=float(c["norm_eps"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        downsample_padding=int(c["downsample_padding"]), attn_levels=attn_levels, head_dim=head_dim,
        mid_attn=bool(c["add_attention"]), mid_attn_norm=not (scale_shift and c["attn_norm_num_groups"] is None),
    )
    return model, {"in_channels": c["in_channels"], "sample_size": sample_size}


def _group_norm_widths(params) -> list[int]:
    widths = []
    jax.tree_util.tree_map_with_path(
        lambda path, leaf: widths.append(leaf.shape[0]) if path[-1].key == "scale" else None, params
    )
    return widths


def config_from_unet(model: UNet, params, sample_size: int | None = None) -> dict:
    """The diffusers ``UNet2DModel`` config equivalent to ``model`` with ``params``, or ``ValueError`` naming the field.

    ``sample_size`` is written to the config; it is needed when the model places attention by
    ``attn_resolutions`` (diffusers places it by level: the two agree at this size).
    """
    levels = len(model.ch_mult)
    lay = model.layout()
    widths = _group_norm_widths(params)
    if model.norm_groups is None:
        counts = sorted({num_groups(w) for w in widths})
        if len(counts) != 1:
            raise ValueError(
                f"norm_groups=None gives GroupNorm group counts {counts} across widths {sorted(set(widths))}; "
                "diffusers has one norm_num_groups: set UNet.norm_groups"
            )
        groups = counts[0]
    else:
        groups = model.norm_groups
    if lay.attn_levels is not None:
        attn_levels = tuple(lay.attn_levels)
    elif not model.attn_resolutions:
        attn_levels = ()
    elif sample_size is None:
        raise ValueError(
            f"attn_resolutions={model.attn_resolutions}: pass sample_size (or use DiffusersUNet(attn_levels=...))"
        )
    else:
        attn_levels = tuple(i for i in range(levels) if sample_size // 2**i in model.attn_resolutions)
    chans = [model.ch * m for m in model.ch_mult]
    attn_chans = sorted({chans[i] for i in attn_levels} | ({chans[-1]} if lay.mid_attn else set()))
    if lay.head_dim is not None:
        head_dim = lay.head_dim
    elif model.num_heads == 1:
        head_dim = None
    elif len(attn_chans) == 1 and attn_chans[0] % model.num_heads == 0:
        head_dim = attn_chans[0] // model.num_heads
    else:
        raise ValueError(
            f"num_heads={model.num_heads} at attention widths {attn_chans}: diffusers fixes the head width"
        )
    if lay.mid_attn_norm:
        attn_norm = groups if model.scale_shift else None
    elif model.scale_shift:
        attn_norm = None
    else:
        raise ValueError("mid_attn_norm=False needs scale_shift=True in diffusers (attn_norm_num_groups=null)")
    in_ch = params["conv_in"]["kernel"].shape[2]
    out_ch = params["conv_out"]["kernel"].shape[3]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": WRITTEN_VERSION,
        **DEFAULTS,
        "sample_size": sample_size, "in_channels": int(in_ch), "out_channels": int(out_ch),
        "freq_shift": int(lay.freq_shift) if float(lay.freq_shift).is_integer() else lay.freq_shift,
        "flip_sin_to_cos": lay.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(levels))],
        "block_out_channels": chans, "layers_per_block": model.num_res_blocks,
        "downsample_padding": lay.downsample_padding, "dropout": model.dropout, "attention_head_dim": head_dim,
        "norm_num_groups": groups, "attn_norm_num_groups": attn_norm, "norm_eps": lay.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if model.scale_shift else "default",
        "add_attention": lay.mid_attn,
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
    }

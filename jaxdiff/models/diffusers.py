"""Import and export of diffusers ``UNet2DModel`` folders (the DDPM family).

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``. Weights are read
with ``safetensors.numpy`` (nothing loaded executes code); a ``.bin`` (pickle) file is refused
with the command that converts it. Example::

    model, params = from_diffusers("ddpm-cifar10-32/unet")
    eps = model.apply({"params": params}, x, t)      # x: [B, H, W, C] (NHWC), t: [B] ints
    to_diffusers(model, params, "exported", sample_size=32)

Supported ``config.json`` settings (missing keys take diffusers' defaults, :data:`DEFAULTS`):
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
null (or ``4 * block_out_channels[0]``). Anything else is refused naming the setting. Both
attention namings are read: ``to_q``/``to_k``/``to_v``/``to_out.0`` and the google/ddpm-*
checkpoints' ``query``/``key``/``value``/``proj_attn``; export writes the former.

An imported class-conditional model has ``num_classes = num_class_embeds - 1``: its table has
the same ``num_class_embeds`` rows and every label diffusers accepts means the same row; the
last row is what jaxdiff uses when ``y`` is ``None``.
"""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.layers import num_groups
from jaxdiff.models.unet import UNet, check_image_size

__all__ = ["CONVERT_BIN_COMMAND", "DEFAULTS", "config_from_unet", "from_diffusers", "to_diffusers", "unet_from_config"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
WRITTEN_VERSION = "0.42.1"  # the diffusers release whose config.json layout to_diffusers writes
# Converts a pickle (.bin) folder in place; needs torch and diffusers, and runs torch.load on the file.
CONVERT_BIN_COMMAND = (
    "python -c \"import sys; from diffusers import UNet2DModel; "
    "UNet2DModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1], safe_serialization=True)\" {folder}"
)

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


def unet_from_config(config: dict) -> tuple[UNet, dict]:
    """The :class:`UNet` of a diffusers ``UNet2DModel`` config, and ``{"in_channels", "sample_size"}``.

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
    model = UNet(
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
    if model.attn_levels is not None:
        attn_levels = tuple(model.attn_levels)
    elif not model.attn_resolutions:
        attn_levels = ()
    elif sample_size is None:
        raise ValueError(f"attn_resolutions={model.attn_resolutions}: pass sample_size (or set UNet.attn_levels)")
    else:
        attn_levels = tuple(i for i in range(levels) if sample_size // 2**i in model.attn_resolutions)
    chans = [model.ch * m for m in model.ch_mult]
    attn_chans = sorted({chans[i] for i in attn_levels} | ({chans[-1]} if model.mid_attn else set()))
    if model.head_dim is not None:
        head_dim = model.head_dim
    elif model.num_heads == 1:
        head_dim = None
    elif len(attn_chans) == 1 and attn_chans[0] % model.num_heads == 0:
        head_dim = attn_chans[0] // model.num_heads
    else:
        raise ValueError(
            f"num_heads={model.num_heads} at attention widths {attn_chans}: diffusers fixes the head width"
        )
    if model.mid_attn_norm:
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
        "freq_shift": int(model.freq_shift) if float(model.freq_shift).is_integer() else model.freq_shift,
        "flip_sin_to_cos": model.flip_sin_to_cos,
        "down_block_types": ["AttnDownBlock2D" if i in attn_levels else "DownBlock2D" for i in range(levels)],
        "up_block_types": ["AttnUpBlock2D" if i in attn_levels else "UpBlock2D" for i in reversed(range(levels))],
        "block_out_channels": chans, "layers_per_block": model.num_res_blocks,
        "downsample_padding": model.downsample_padding, "dropout": model.dropout, "attention_head_dim": head_dim,
        "norm_num_groups": groups, "attn_norm_num_groups": attn_norm, "norm_eps": model.norm_eps,
        "resnet_time_scale_shift": "scale_shift" if model.scale_shift else "default",
        "add_attention": model.mid_attn,
        "num_class_embeds": None if model.num_classes is None else model.num_classes + 1,
    }


# ------------------------------------------------------------------ tensor names

_TOP = {
    "conv_in": "conv_in", "temb_dense0": "time_embedding.linear_1", "temb_dense1": "time_embedding.linear_2",
    "class_emb": "class_embedding", "norm_out": "conv_norm_out", "conv_out": "conv_out",
    "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0", "mid_block_2": "mid_block.resnets.1",
}
_SUB = {
    "norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
    "nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v",
    "proj_out": "to_out.0", "conv": "conv",
}
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_LEVEL = re.compile(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?")


def diffusers_names(path: tuple[str, ...], num_levels: int) -> list[str]:
    """diffusers' tensor name for the jaxdiff parameter at ``path``: current name, then the legacy one if any."""
    top, *mid, leaf = path
    if top in _TOP:
        prefix = _TOP[top]
    else:
        side, level, kind, j = _LEVEL.fullmatch(top).groups()
        index = int(level) if side == "down" else num_levels - 1 - int(level)
        part = {"block": f"resnets.{j}", "attn": f"attentions.{j}", "downsample": "downsamplers.0",
                "upsample": "upsamplers.0"}[kind]
        prefix = f"{side}_blocks.{index}.{part}"
    names = [".".join([prefix, *(_SUB[m] for m in mid), _LEAF[leaf]])]
    if mid and _SUB[mid[-1]] in _LEGACY:
        names.append(".".join([prefix, _LEGACY[_SUB[mid[-1]]], _LEAF[leaf]]))
    return names


def _to_jax_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # linear [O, I] -> [I, O] (embedding tables are not passed here)
        return value.T
    return value


def _to_torch_layout(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2:
        return value.T
    return value


# ------------------------------------------------------------------ folders


def _read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"diffusers UNet folder {folder!r} does not exist")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a diffusers UNet2DModel folder has {CONFIG_NAME})")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{path}: _class_name={config['_class_name']!r}, expected 'UNet2DModel'")
    return config


def _read_tensors(folder: str) -> tuple[str, dict[str, np.ndarray]]:
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, BIN_NAME)):
            raise ValueError(
                f"{os.path.join(folder, BIN_NAME)}: pickle weights are not loaded (loading them runs code). "
                f"Convert the folder to safetensors once, with torch and diffusers installed:\n  "
                + CONVERT_BIN_COMMAND.format(folder=folder)
            )
        raise FileNotFoundError(f"{path}: missing")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return path, load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # truncated, corrupt, or a dtype NumPy lacks
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _param_shapes(model: UNet, in_channels: int):
    size = 2 ** (len(model.ch_mult) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def _keys(path) -> tuple[str, ...]:
    return tuple(p.key for p in path)


def from_diffusers(path: str) -> tuple[UNet, dict]:
    """Loads a diffusers ``UNet2DModel`` folder as ``(model, params)``.

    ``model.apply({"params": params}, x, t[, y])`` with ``x: [B, H, W, C]`` and ``t: [B]``
    returns diffusers' ``UNet2DModel(x_nchw, t[, y]).sample`` in NHWC. Every tensor of the file
    fills a parameter and every parameter is filled, or ``ValueError`` names the leftovers.
    """
    config = _read_config(path)
    model, info = unet_from_config(config)
    file, tensors = _read_tensors(path)
    shapes = _param_shapes(model, info["in_channels"])
    levels = len(model.ch_mult)
    used, missing, bad = set(), [], []

    def fill(p, leaf):
        keys = _keys(p)
        names = [n for n in diffusers_names(keys, levels) if n in tensors]
        if len(names) != 1:
            missing.append(" or ".join(diffusers_names(keys, levels)) if not names else f"both {names}")
            return None
        name = names[0]
        used.add(name)
        value = np.asarray(tensors[name])
        value = value if keys[-1] == "embedding" else _to_jax_layout(value)
        if value.shape != leaf.shape:
            want = leaf.shape if keys[-1] == "embedding" else _to_torch_layout(np.empty(leaf.shape, np.uint8)).shape
            bad.append(f"{name}: shape {tensors[name].shape} (expected {want})")
            return None
        if not np.issubdtype(value.dtype, np.floating):
            bad.append(f"{name}: dtype {value.dtype} (expected floating point)")
            return None
        return jnp.asarray(value, jnp.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    if bad:
        raise ValueError(f"{file}: tensor(s) of the wrong shape or dtype for config.json: {bad[:5]}")
    if missing:
        raise ValueError(f"{file}: {len(missing)} tensor(s) missing, e.g. {missing[:5]}")
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise ValueError(f"{file}: {len(leftover)} tensor(s) not used by config.json's model, e.g. {leftover[:5]}")
    return model, params


def to_diffusers(model: UNet, params, path: str, *, sample_size: int | None = None) -> str:
    """Writes ``(model, params)`` as a diffusers ``UNet2DModel`` folder at ``path`` and returns ``path``.

    The folder must not exist or be empty. Fields without a diffusers counterpart raise
    ``ValueError`` naming them (see :func:`config_from_unet`). ``learn_sigma`` models export
    with ``out_channels = 2 C``.
    """
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists and is not an empty folder: not overwriting it")
    config = config_from_unet(model, params, sample_size)
    rebuilt, info = unet_from_config(config)
    expected = jax.tree.map(lambda s: s.shape, _param_shapes(rebuilt, info["in_channels"]))
    got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("params do not match the model's parameter tree (names or shapes): was it built by `model`?")
    levels = len(model.ch_mult)
    tensors = {}

    def put(p, value):
        keys = _keys(p)
        value = np.asarray(value, np.float32)
        tensors[diffusers_names(keys, levels)[0]] = np.ascontiguousarray(
            value if keys[-1] == "embedding" else _to_torch_layout(value)
        )

    jax.tree_util.tree_map_with_path(put, params)
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path

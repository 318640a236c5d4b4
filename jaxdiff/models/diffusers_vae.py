"""diffusers ``AutoencoderKL`` folders <-> :class:`~jaxdiff.models.autoencoder.AutoencoderKL`.

Used by :func:`jaxdiff.models.from_diffusers` / :func:`~jaxdiff.models.to_diffusers`, which read
and write the folder; here are the config and the tensor names. The published Stable Diffusion
folders load: stabilityai/sd-vae-ft-ema (and the ``vae`` of SD 1.x / 2.x: 4 levels 128-256-512-512,
4 latent channels, ``scaling_factor`` 0.18215) and SDXL's (the same layout, 0.13025).

Supported ``config.json`` settings (missing keys take diffusers' defaults, ``DEFAULTS``):
``in_channels``, ``out_channels``, ``block_out_channels`` (each a multiple of ``norm_num_groups``),
``layers_per_block``, ``latent_channels``, ``norm_num_groups``, ``use_quant_conv``,
``use_post_quant_conv``, ``mid_block_add_attention``, ``scaling_factor`` and ``shift_factor``
(kept on the model as metadata), ``down_block_types`` all ``DownEncoderBlock2D`` and
``up_block_types`` all ``UpDecoderBlock2D`` (one per level), ``act_fn`` ``silu``,
``latents_mean`` / ``latents_std`` null, ``force_upcast`` (a hint for float16 torch; jaxdiff's
``dtype`` decides) and ``sample_size`` (diffusers' tiling size; unused by the network). Anything
else is refused naming the setting.

Tensor names: the model's parameter path with ``_<i>`` read as ``.<i>`` (``encoder.down_blocks.0.resnets.1.conv1``),
``kernel``/``scale`` as ``weight``; the attention's ``norm``, ``q``, ``k``, ``v``, ``proj_out`` are
``group_norm``, ``to_q``, ``to_k``, ``to_v``, ``to_out.0``, or the old ``query``, ``key``, ``value``,
``proj_attn`` (both read; export writes the former). Attention weights stored as 1x1 convs
``[C, C, 1, 1]`` are read as the linear maps they are.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.autoencoder import AutoencoderKL

__all__ = ["CLASS_NAME", "DEFAULTS", "config_from_vae", "param_shapes", "params_from_tensors",
           "tensor_names", "tensors_from_params", "vae_from_config"]

CLASS_NAME = "AutoencoderKL"

# AutoencoderKL.__init__ defaults (diffusers 0.42).
DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_BOOLS = ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention", "force_upcast")
_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"), "v": ("to_v", "value"),
         "proj_out": ("to_out.0", "proj_attn")}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_INDEX = re.compile(r"_(\d+)(_|$)")


def _int(config: dict, key: str, low: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.json: {key}={value!r} must be an int >= {low}")
    return value


def _number(config: dict, key: str, optional: bool = False) -> float | None:
    value = config[key]
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.json: {key}={value!r} must be a number" + (" or null" if optional else ""))
    return float(value)


def vae_from_config(config: dict) -> tuple[AutoencoderKL, dict]:
    """The :class:`~jaxdiff.models.autoencoder.AutoencoderKL` of an ``AutoencoderKL`` ``config.json`` and
    ``{"sample_size", "force_upcast"}`` (the settings the network does not use); ``ValueError`` names the
    first setting it cannot reproduce."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unsupported setting(s) {unknown} for {CLASS_NAME}")
    c = {**DEFAULTS, **config}
    chans = c["block_out_channels"]
    if not isinstance(chans, (list, tuple)) or not chans:
        raise ValueError(f"config.json: block_out_channels={chans!r} must be a non-empty list of ints")
    chans = tuple(_int({"block_out_channels": ch}, "block_out_channels") for ch in chans)
    groups = _int(c, "norm_num_groups")
    if any(ch % groups for ch in chans):
        raise ValueError(f"config.json: block_out_channels={list(chans)} must each divide by norm_num_groups={groups}")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(c[key]) != [block] * len(chans):
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (supported: {block!r} for each of "
                             f"the {len(chans)} levels of block_out_channels)")
    if c["act_fn"] != "silu":
        raise ValueError(f"config.json: act_fn={c['act_fn']!r} is not supported (supported: ['silu'])")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (supported: null; the latent "
                             "pipeline normalises with scaling_factor and shift_factor)")
    for key in _BOOLS:
        if not isinstance(c[key], bool):
            raise ValueError(f"config.json: {key}={c[key]!r} must be true or false")
    model = AutoencoderKL(
        block_out_channels=chans, layers_per_block=_int(c, "layers_per_block"),
        latent_channels=_int(c, "latent_channels"), norm_num_groups=groups, use_quant_conv=c["use_quant_conv"],
        use_post_quant_conv=c["use_post_quant_conv"], mid_block_add_attention=c["mid_block_add_attention"],
        in_channels=_int(c, "in_channels"), out_channels=_int(c, "out_channels"),
        scaling_factor=_number(c, "scaling_factor"), shift_factor=_number(c, "shift_factor", optional=True),
    )
    return model, {"sample_size": c["sample_size"], "force_upcast": c["force_upcast"]}


def config_from_vae(model: AutoencoderKL, sample_size=None) -> dict:
    """The ``config.json`` of ``model`` (``sample_size``: diffusers' tiling size, its default 32 when None)."""
    levels = len(model.block_out_channels)
    return {
        "_class_name": CLASS_NAME, **DEFAULTS, "in_channels": model.in_channels, "out_channels": model.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(c) for c in model.block_out_channels], "layers_per_block": model.layers_per_block,
        "latent_channels": model.latent_channels, "norm_num_groups": model.norm_num_groups,
        "sample_size": DEFAULTS["sample_size"] if sample_size is None else sample_size,
        "scaling_factor": model.scaling_factor, "shift_factor": model.shift_factor,
        "use_quant_conv": model.use_quant_conv, "use_post_quant_conv": model.use_post_quant_conv,
        "mid_block_add_attention": model.mid_block_add_attention,
    }


def param_shapes(model: AutoencoderKL):
    """The parameter tree of ``model`` as ``jax.ShapeDtypeStruct`` leaves (nothing allocated)."""
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def _dotted(module: str) -> str:
    """``down_blocks_0_resnets_1`` -> ``down_blocks.0.resnets.1`` (a flax name -> diffusers' path)."""
    return _INDEX.sub(lambda m: "." + m[1] + ("." if m[2] else ""), module)


def tensor_names(keys: tuple[str, ...]) -> tuple[str, ...]:
    """diffusers' names for the parameter at path ``keys``: the current one, then the old one if any."""
    *mods, last, leaf = keys
    in_attention = bool(mods) and mods[-1].startswith("attentions_")
    prefix = ".".join(_dotted(m) for m in mods)
    options = _ATTN[last] if in_attention else (_dotted(last),)
    return tuple(".".join(p for p in (prefix, o, _LEAF[leaf]) if p) for o in options)


def _layout(value: np.ndarray, to_jax: bool) -> np.ndarray:
    if value.ndim == 4:  # conv [O, I, kh, kw] <-> [kh, kw, I, O]
        return value.transpose((2, 3, 1, 0) if to_jax else (3, 2, 0, 1))
    return value.T if value.ndim == 2 else value


def params_from_tensors(shapes, tensors: dict[str, np.ndarray], file: str) -> dict:
    """The params (shaped as ``shapes``) from a folder's ``tensors``; every tensor used once, else ``ValueError``."""
    used: set[str] = set()
    missing, bad = [], []

    def fill(path, leaf):
        keys = tuple(p.key for p in path)
        options = tensor_names(keys)
        found = [n for n in options if n in tensors]
        if len(found) != 1:
            missing.append(" or ".join(options) if not found else f"both {found}")
            return None
        name = found[0]
        used.add(name)
        value = np.asarray(tensors[name])
        if len(leaf.shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # an attention projection stored as a 1x1 conv
        value = _layout(value, to_jax=True)
        if value.shape != tuple(leaf.shape):
            bad.append(f"{name}: shape {tensors[name].shape} (expected {_layout(np.empty(leaf.shape), False).shape})")
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
    return params


def tensors_from_params(params) -> dict[str, np.ndarray]:
    """diffusers' tensors (current names, torch layout, float32) of ``params``."""
    tensors: dict[str, np.ndarray] = {}

    def put(path, value):
        keys = tuple(p.key for p in path)
        tensors[tensor_names(keys)[0]] = np.ascontiguousarray(_layout(np.asarray(value, np.float32), to_jax=False))

    jax.tree_util.tree_map_with_path(put, params)
    return tensors

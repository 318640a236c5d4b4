"""Import and export of diffusers model folders: ``UNet2DModel`` (the DDPM family), ``DiTTransformer2DModel``
and ``AutoencoderKL`` (the Stable Diffusion autoencoder).

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``. Weights are read
with ``safetensors.numpy`` (nothing loaded executes code); a ``.bin`` (pickle) file is refused
with the command that converts it. Example::

    model, params = from_diffusers("ddpm-cifar10-32/unet")
    eps = model.apply({"params": params}, x, t)      # x: [B, H, W, C] (NHWC), t: [B] ints
    to_diffusers(model, params, "exported", sample_size=32)

:func:`from_diffusers` dispatches on ``config.json``'s ``_class_name``. The supported settings,
and what is refused, are listed in :mod:`jaxdiff.models.diffusers_config` (``UNet2DModel``) and
:mod:`jaxdiff.models.diffusers_dit` (``DiTTransformer2DModel``, imported as a
:class:`~jaxdiff.models.DiT` with diffusers' layout) and :mod:`jaxdiff.models.diffusers_vae`
(``AutoencoderKL``, imported as an :class:`~jaxdiff.models.AutoencoderKL` that carries the folder's
``scaling_factor`` and ``shift_factor`` as fields). Both attention namings are read: ``to_q``/``to_k``/
``to_v``/``to_out.0`` and the google/ddpm-* checkpoints' ``query``/``key``/``value``/``proj_attn``;
export writes the former.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models import diffusers_dit, diffusers_vae
from jaxdiff.models.autoencoder import AutoencoderKL
from jaxdiff.models.diffusers_config import (
    WRITTEN_VERSION,
    config_from_unet,
    unet_from_config,
)
from jaxdiff.models.dit import DiT
from jaxdiff.models.unet import UNet

__all__ = ["CONVERT_BIN_COMMAND", "WRITTEN_VERSION", "diffusers_names", "from_diffusers", "resolve_folder",
           "to_diffusers"]

CONFIG_NAME = "config.json"
CLASS_NAMES = ("UNet2DModel", diffusers_dit.CLASS_NAME, diffusers_vae.CLASS_NAME)  # what from_diffusers reads
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
# Converts a pickle (.bin) folder in place; needs torch and diffusers, and runs torch.load on the file.
CONVERT_BIN_COMMAND = (
    "python -c \"import sys; from diffusers import UNet2DModel; "
    "UNet2DModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[1], safe_serialization=True)\" {folder}"
)

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*$")


def resolve_folder(path: str) -> str:
    """``path`` if it is a folder; else a hub id ``"org/name"`` or ``"org/name/subfolder"`` (e.g.
    ``"facebook/DiT-XL-2-256/transformer"``) resolved to its folder in the ``huggingface_hub`` cache.

    Nothing is downloaded (``local_files_only``): a hub id works where ``huggingface_hub`` is
    installed and the files are already cached (``huggingface-cli download ORG/NAME`` once, on a machine
    with network). ``FileNotFoundError`` says which of these is missing.
    """
    if os.path.isdir(path) or not _HUB_ID.match(path) or os.path.exists(path):
        return path
    org, name, *sub = path.split("/")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(f"{path!r} is neither a folder nor, without huggingface_hub installed, a hub id "
                                f"(pip install huggingface_hub to read hub ids from its cache)") from None
    try:
        snapshot = huggingface_hub.snapshot_download(f"{org}/{name}", local_files_only=True)
    except Exception as e:  # huggingface_hub's LocalEntryNotFoundError and friends: not cached
        raise FileNotFoundError(f"{path!r}: not a folder, and hub id {org}/{name} is not in the huggingface_hub "
                                f"cache (nothing is downloaded; run `huggingface-cli download {org}/{name}` once "
                                f"where there is network) ({type(e).__name__})") from None
    folder = os.path.join(snapshot, *sub)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path!r}: the cached {org}/{name} has no folder {'/'.join(sub)!r}")
    return folder


def _read_config(folder: str) -> dict:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"diffusers model folder {folder!r} does not exist")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (a diffusers model folder has {CONFIG_NAME})")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON config ({e})") from None
    if config.get("_class_name", "UNet2DModel") not in CLASS_NAMES:
        raise ValueError(f"{path}: _class_name={config['_class_name']!r}, expected one of {CLASS_NAMES}")
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


def _param_shapes(model, in_channels: int):
    size = model.patch_size if isinstance(model, DiT) else 2 ** (len(model.ch_mult) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    y = None if model.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def _keys(path) -> tuple[str, ...]:
    return tuple(p.key for p in path)


def from_diffusers(path: str) -> tuple[UNet | DiT | AutoencoderKL, dict]:
    """Loads a diffusers ``UNet2DModel``, ``DiTTransformer2DModel`` or ``AutoencoderKL`` folder as ``(model, params)``.

    ``model.apply({"params": params}, x, t[, y])`` with ``x: [B, H, W, C]`` and ``t: [B]``
    returns diffusers' ``UNet2DModel(x_nchw, t[, y]).sample`` (or
    ``DiTTransformer2DModel(x_nchw, timestep=t, class_labels=y).sample``) in NHWC. An autoencoder's
    ``model.apply({"params": params}, x, method=model.encode)`` returns ``(mean, logvar)`` (diffusers'
    ``encode(x).latent_dist``), ``method=model.decode`` images; ``model.scaling_factor`` and
    ``model.shift_factor`` are the folder's (not applied by the model). Every tensor of
    the file fills a parameter and every parameter is filled, or ``ValueError`` names the leftovers.

    ``path``: a folder, or a hub id already in the ``huggingface_hub`` cache (``resolve_folder`` of this module).
    """
    path = resolve_folder(path)
    config = _read_config(path)
    if config.get("_class_name") == diffusers_vae.CLASS_NAME:
        try:
            vae, _ = diffusers_vae.vae_from_config(config)
        except ValueError as e:
            raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
        file, tensors = _read_tensors(path)
        return vae, diffusers_vae.params_from_tensors(diffusers_vae.param_shapes(vae), tensors, file)
    if config.get("_class_name") == diffusers_dit.CLASS_NAME:
        try:
            model, info = diffusers_dit.dit_from_config(config)
        except ValueError as e:
            raise ValueError(f"{os.path.join(path, CONFIG_NAME)}: {e}") from None
        file, tensors = _read_tensors(path)
        shapes = _param_shapes(model, info["in_channels"])
        return model, diffusers_dit.params_from_tensors(model, shapes, tensors, file)
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


def _check_tree(params, expected_shapes) -> None:
    expected = jax.tree.map(lambda s: s.shape, expected_shapes)
    got = jax.tree.map(lambda a: tuple(np.shape(a)), params)
    if jax.tree.structure(expected) != jax.tree.structure(got) or expected != got:
        raise ValueError("params do not match the model's parameter tree (names or shapes): was it built by `model`?")


def _write(path: str, config: dict, tensors: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def to_diffusers(model: UNet | DiT | AutoencoderKL, params, path: str, *, sample_size: int | None = None,
                 in_channels: int | None = None) -> str:
    """Writes ``(model, params)`` as a diffusers ``UNet2DModel`` (``DiTTransformer2DModel`` for a DiT,
    ``AutoencoderKL`` for an autoencoder) folder at ``path`` and returns ``path``.

    The folder must not exist or be empty. Fields without a diffusers counterpart raise
    ``ValueError`` naming them (see :func:`~jaxdiff.models.diffusers_config.config_from_unet` and
    :func:`~jaxdiff.models.diffusers_dit.config_from_dit`: a DiT exports with diffusers' layout
    only, ``layout.freq_shift=1``). ``learn_sigma`` models export with ``out_channels = 2 C``.
    ``in_channels``: a DiT's input channels when ``out_channels`` is set (otherwise read from the params).
    An autoencoder's ``sample_size`` is diffusers' tiling size (default 32).
    """
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise FileExistsError(f"{path!r} exists and is not an empty folder: not overwriting it")
    if isinstance(model, AutoencoderKL):
        if in_channels is not None:
            raise ValueError("in_channels: not an AutoencoderKL setting (the model has in_channels)")
        _check_tree(params, diffusers_vae.param_shapes(model))
        config = diffusers_vae.config_from_vae(model, sample_size)
        return _write(path, config, diffusers_vae.tensors_from_params(params))
    if isinstance(model, DiT):
        kernel = params.get("patch_embed", {}).get("kernel") if isinstance(params, Mapping) else None
        if kernel is None or np.ndim(kernel) != 4:
            raise ValueError("params have no patch_embed kernel [p, p, C, D]: was it built by `model`?")
        c_in = int(np.shape(kernel)[2]) if in_channels is None else in_channels
        config = diffusers_dit.config_from_dit(model, c_in, sample_size)
        rebuilt, info = diffusers_dit.dit_from_config(config)
        _check_tree(params, _param_shapes(rebuilt, info["in_channels"]))
        return _write(path, config, diffusers_dit.tensors_from_params(model, params))
    config = config_from_unet(model, params, sample_size)
    rebuilt, info = unet_from_config(config)
    _check_tree(params, _param_shapes(rebuilt, info["in_channels"]))
    levels = len(model.ch_mult)
    tensors = {}

    def put(p, value):
        keys = _keys(p)
        value = np.asarray(value, np.float32)
        tensors[diffusers_names(keys, levels)[0]] = np.ascontiguousarray(
            value if keys[-1] == "embedding" else _to_torch_layout(value)
        )

    jax.tree_util.tree_map_with_path(put, params)
    return _write(path, config, tensors)

"""Latent datasets: the storage format of ``jaxdiff-encode``, the latents <-> images facts, and decoding.

A latent diffusion model (DiT on the Stable Diffusion autoencoder) trains on the autoencoder's
latents instead of pixels. The facts, decided here once and used by the data pipeline, the
training setup, sampling and the FID evaluation:

* **Model space.** The network sees ``x = (z - shift_factor) * scaling_factor`` ``[B, h, w, c]``
  (``z``: a latent of the autoencoder; the factors come from its ``config.json``: SD-VAE's
  ``scaling_factor`` is 0.18215, its ``shift_factor`` 0), :func:`to_model`; its samples go back
  through ``z = x / scaling_factor + shift_factor`` (:func:`to_latents`) and ``vae.decode`` to
  images in ``[-1, 1]`` (:meth:`Autoencoder.decode`).
* **Storage** (a folder written by ``jaxdiff-encode``, :mod:`jaxdiff.training.encode`): shards
  ``shard_00000.npz``, ``shard_00001.npz``, ... of ``shard_size`` examples each in the dataset's own
  order (the last one shorter), uncompressed NumPy ``.npz`` files (no pickle: only numeric arrays,
  read without ``allow_pickle``) holding ``mean`` and ``std`` float32 ``[n, h, w, c]`` (the
  diagonal Gaussian posterior ``q(z | image)``: ``std = exp(logvar / 2)``), ``label`` int32 ``[n]``
  for a labelled dataset and, when encoded with flips, ``mean_flip`` / ``std_flip`` (the posterior
  of the horizontally flipped image); plus ``manifest.json`` (:class:`Manifest`): the dataset, the
  shapes, the shard size, how many shards are complete, the autoencoder's factors, its path and
  the sha256 of its files. Shards are read by memory-mapping their members, so a dataset larger
  than the host's memory trains.
* **Sampling policy** (``config.data.latent_draw``): ``"sample"`` (default) draws
  ``z = mean + std * eps`` afresh every time an example is used, as DiT trains (the posterior
  sample of the original code; fast-DiT freezes one draw at extraction time instead), with
  ``eps`` from ``np.random.default_rng([seed, step, i, 1])`` for the example at index ``i`` of the
  global batch at ``step``: a pure function of ``(seed, step)``, like the images' random flip, so
  the batches do not depend on the number of devices and a resumed run sees the same ones.
  ``"mean"`` uses the posterior mean alone (deterministic latents). A random flip
  (``config.data.random_flip``) picks the stored flipped posterior (it needs ``--flip`` at encoding:
  a flipped latent is not the latent of the flipped image).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import struct
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np

from jaxdiff import data

__all__ = ["MANIFEST", "DRAWS", "Manifest", "LatentSource", "Autoencoder", "load_autoencoder",
           "read_manifest", "shard_path", "to_model", "to_latents"]

MANIFEST = "manifest.json"
FORMAT = "jaxdiff-latents"
VERSION = 1
DRAWS = ("sample", "mean")  # config.data.latent_draw


def to_model(z, scaling_factor: float, shift_factor: float = 0.0):
    """Latents ``z`` ``[..., c]`` -> what the network sees: ``(z - shift_factor) * scaling_factor``."""
    return (z - shift_factor) * scaling_factor


def to_latents(x, scaling_factor: float, shift_factor: float = 0.0):
    """The inverse of :func:`to_model`: ``x / scaling_factor + shift_factor``."""
    return x / scaling_factor + shift_factor


def shard_path(folder: str, index: int) -> str:
    """The path of shard ``index`` in a latents ``folder``."""
    return os.path.join(folder, f"shard_{index:05d}.npz")


@dataclasses.dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a latents folder: what was encoded, with what, and how far."""

    dataset: dict  # {"name", "split", "data_dir", "image_size"}: the images (jaxdiff.data.make_source)
    image_shape: tuple[int, int, int]  # (H, W, C) of the encoded images
    latent_shape: tuple[int, int, int]  # (h, w, c) of the latents
    num_examples: int
    num_classes: int | None
    shard_size: int
    complete_shards: int  # shards 0 .. complete_shards - 1 are written completely
    flips: bool  # the posterior of each flipped image is stored too (mean_flip, std_flip)
    autoencoder: dict  # {"path", "scaling_factor", "shift_factor", "sha256"}
    batch_size: int  # examples per encoding call (a resumed encoding must use the same)
    num_devices: int  # devices the encoding was sharded over (likewise)

    @property
    def num_shards(self) -> int:
        return -(-self.num_examples // self.shard_size)

    @property
    def complete(self) -> bool:
        return self.complete_shards == self.num_shards

    @property
    def scaling_factor(self) -> float:
        return float(self.autoencoder["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.autoencoder.get("shift_factor") or 0.0)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self),
                "arrays": {"mean": "float32 [n, h, w, c]", "std": "float32 [n, h, w, c]", "label": "int32 [n]",
                           **({"mean_flip": "float32 [n, h, w, c]", "std_flip": "float32 [n, h, w, c]"}
                              if self.flips else {})}}

    def write(self, folder: str) -> None:
        """Writes ``folder/manifest.json`` atomically (a new file moved over the old one)."""
        tmp = os.path.join(folder, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(tmp, os.path.join(folder, MANIFEST))

    def image_source(self) -> data.Source:
        """The dataset of the encoded images (the reference of an FID without a stats file)."""
        ds = self.dataset
        return data.make_source(ds["name"], ds["split"], ds.get("data_dir") or None)


def read_manifest(folder: str, *, name: str = "latents") -> Manifest:
    """The manifest of a latents ``folder``; ``FileNotFoundError`` / ``ValueError`` naming ``name``."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{name}={folder!r}: no {MANIFEST} there (make it with jaxdiff-encode)")
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(f"{name}={folder!r}: {MANIFEST} is not a {FORMAT} version {VERSION} manifest")
    fields = {f.name for f in dataclasses.fields(Manifest)}
    missing = sorted(fields - set(raw))
    if missing:
        raise ValueError(f"{name}={folder!r}: {MANIFEST} lacks {missing}")
    values = {k: raw[k] for k in fields}
    for k in ("image_shape", "latent_shape"):
        values[k] = tuple(int(v) for v in values[k])
    return Manifest(**values)


def _member_memmap(path: str, member: str) -> np.ndarray:
    """A read-only memory map of the array ``member`` of an uncompressed ``.npz`` (no pickle, no copy)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member + ".npy")
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f"{path}: {member} is compressed; latents shards are written uncompressed")
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ValueError(f"{path}: not a zip local header at {member}")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: {member} holds Python objects; latents shards hold numbers only")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


class LatentSource:
    """The examples of a complete latents folder: ``source[i] -> {"mean", "std"[, "mean_flip", "std_flip"],
    "label"}`` (float32 ``[h, w, c]``); ``info.image_shape`` is the latent shape ``(h, w, c)``.

    :func:`jaxdiff.data.get_batch` reads it through :meth:`model_inputs`, which applies the
    sampling policy ``draw`` (module docstring) and :func:`to_model`.
    """

    def __init__(self, folder: str, *, draw: str = "sample", name: str = "latents"):
        if draw not in DRAWS:
            raise ValueError(f"latent_draw must be one of {DRAWS}, got {draw!r}")
        self.folder, self.draw = folder, draw
        self.manifest = m = read_manifest(folder, name=name)
        if not m.complete:
            raise ValueError(f"{name}={folder!r}: {m.complete_shards} of {m.num_shards} shards are encoded; run "
                             f"jaxdiff-encode again with the same flags to finish")
        self.info = data.DatasetInfo(name=m.dataset["name"], split=m.dataset["split"], image_shape=m.latent_shape,
                                     num_examples=m.num_examples, num_classes=m.num_classes)
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.manifest.num_examples

    def _shard(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._shards:
            path = shard_path(self.folder, k)
            with zipfile.ZipFile(path) as zf:
                members = [n[:-4] for n in zf.namelist()]
            self._shards[k] = {n: _member_memmap(path, n) for n in members}
        return self._shards[k]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        k, j = divmod(index, self.manifest.shard_size)
        shard = self._shard(k)
        example = {n: np.asarray(a[j]) for n, a in shard.items() if n != "label"}
        if "label" in shard:
            example["label"] = int(shard["label"][j])
        return example

    def model_inputs(self, indices: np.ndarray, *, seed: int, step: int, index: np.ndarray,
                     flip: np.ndarray | None, image_size: int | None) -> dict[str, np.ndarray]:
        """``{"image": float32 [b, h, w, c][, "label": int32 [b]]}``: the network's inputs for source examples
        ``indices`` ``[b]`` at global batch positions ``index`` ``[b]`` of ``step`` (``flip`` ``[b]`` bool or
        None), by the policy ``draw``, and their labels."""
        m = self.manifest
        if image_size is not None and image_size != m.image_shape[0]:
            raise ValueError(f"image_size={image_size}: the latents were encoded from {m.image_shape[0]}x"
                             f"{m.image_shape[1]} images (set data.image_size to 0 or {m.image_shape[0]})")
        if flip is not None and not m.flips:
            raise ValueError("random_flip: the latents hold no flipped posteriors (encode with --flip)")
        out = np.empty((len(indices), *m.latent_shape), np.float32)
        labels = np.zeros((len(indices),), np.int32)
        for b, i in enumerate(indices):
            example = self[int(i)]
            labels[b] = example.get("label", 0)
            suffix = "_flip" if flip is not None and flip[b] else ""
            z = example["mean" + suffix]
            if self.draw == "sample":
                eps = np.random.default_rng([seed, step, int(index[b]), 1]).standard_normal(z.shape, np.float32)
                z = z + example["std" + suffix] * eps
            out[b] = to_model(z, np.float32(m.scaling_factor), np.float32(m.shift_factor))
        return {"image": out, **({"label": labels} if m.num_classes is not None else {})}


# ---------------------------------------------------------------------------- the autoencoder


@dataclasses.dataclass(frozen=True, eq=False)
class Autoencoder:
    """An autoencoder loaded from a diffusers ``AutoencoderKL`` folder (a jaxdiff one is saved as such)."""

    module: Any  # jaxdiff.models.autoencoder.AutoencoderKL
    params: Any
    scaling_factor: float
    shift_factor: float
    path: str  # absolute path of the folder
    sha256: str  # of the folder's config.json and weights files, in name order

    def encode(self, params, images):
        """``images`` ``[B, H, W, C]`` in [-1, 1] -> the posterior ``(mean, logvar)`` ``[B, h, w, c]`` (pure)."""
        return self.module.apply({"params": params}, images, method=self.module.encode)

    def decode(self, params, x):
        """Model-space samples ``x`` ``[B, h, w, c]`` -> images ``[B, H, W, C]`` in about [-1, 1] (pure)."""
        z = to_latents(x, self.scaling_factor, self.shift_factor)
        return self.module.apply({"params": params}, z, method=self.module.decode)

    @functools.cached_property
    def _decode_jit(self) -> Callable:
        import jax

        return jax.jit(self.decode)

    def decode_images(self, x, *, batch_size: int = 64) -> np.ndarray:
        """:meth:`decode` with this object's parameters, jitted on the default device, ``batch_size`` samples at a
        time: ``x`` ``[N, h, w, c]`` (N >= 1) -> float32 ``[N, H, W, C]``."""
        x = np.asarray(x, np.float32)
        return np.concatenate([np.asarray(self._decode_jit(self.params, x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)])


def _folder_sha256(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or name.endswith(".safetensors"):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def load_autoencoder(path: str, *, name: str = "--vae") -> Autoencoder:
    """The ``AutoencoderKL`` of a diffusers folder (``config.json`` + safetensors weights), through
    :func:`jaxdiff.models.from_diffusers`, with its ``scaling_factor`` / ``shift_factor`` (its ``config.json``'s).

    ``ValueError`` naming ``name`` (the flag or setting that gave ``path``) for a missing folder or
    one that does not hold an autoencoder.
    """
    from jaxdiff.models import from_diffusers  # here: only latent runs need the models
    from jaxdiff.models.autoencoder import AutoencoderKL
    from jaxdiff.models.diffusers import resolve_folder

    try:
        path = resolve_folder(path) if path else path  # a hub id in the huggingface_hub cache
    except FileNotFoundError as error:
        raise ValueError(f"{name}={path!r}: {error}") from None
    if not path or not os.path.isdir(path):
        raise ValueError(f"{name}={path!r}: no such folder (a diffusers AutoencoderKL folder: config.json and "
                         f"diffusion_pytorch_model.safetensors)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{name}={path!r}: no config.json there; give a diffusers AutoencoderKL folder")
    try:
        module, params = from_diffusers(path)
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{name}={path!r}: {error}") from None
    if not isinstance(module, AutoencoderKL):
        raise ValueError(f"{name}={path!r} holds a {type(module).__name__}, not an AutoencoderKL")
    return Autoencoder(module=module, params=params, scaling_factor=float(module.scaling_factor),
                       shift_factor=float(module.shift_factor or 0.0), path=os.path.abspath(path),
                       sha256=_folder_sha256(path))

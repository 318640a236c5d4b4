"""Encode a dataset once into an autoencoder's latents (``jaxdiff-encode``): batched, sharded, resumable.

The folder it writes is described in :mod:`jaxdiff.latents` (shards of ``shard_size`` examples in
the dataset's order + ``manifest.json``). The encoding is a pure function of the images and the
autoencoder, batch by batch at fixed offsets within each shard (the last batch padded with copies
of the shard's last image), so a run that is stopped and started again with the same flags
continues after the last complete shard and writes the same bytes as an uninterrupted run.
Each shard is written beside its final name and moved into place, then the manifest counts it:
a shard left by a run killed in between is encoded again. A complete folder is never
overwritten (``FileExistsError``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import data, latents
from jaxdiff.training.parallel import DataParallel

__all__ = ["encode_dataset"]


def _check_resume(saved: latents.Manifest, new: latents.Manifest, output: str) -> None:
    """A resumed encoding must be the same encoding: ``ValueError`` naming the flag that differs."""
    pairs = [("--dataset/--split/--data_dir/--image_size", saved.dataset, new.dataset),
             ("--shard_size", saved.shard_size, new.shard_size), ("--flip", saved.flips, new.flips),
             ("--vae", saved.autoencoder.get("sha256"), new.autoencoder.get("sha256")),
             ("--batch_size", saved.batch_size, new.batch_size),
             ("the number of devices", saved.num_devices, new.num_devices)]
    for flag, a, b in pairs:
        if a != b:
            raise ValueError(f"--output {output} holds a partial encoding made with other settings ({flag}: "
                             f"{a!r} there, {b!r} now); resume it with the same flags or choose another --output")


def _encode_fn(autoencoder: latents.Autoencoder, flip: bool) -> Callable:
    def fn(params, images):  # images [B, H, W, C] in [-1, 1]
        views = [images, images[:, :, ::-1]] if flip else [images]
        out = []
        for view in views:
            mean, logvar = autoencoder.encode(params, view)
            out += [mean.astype(jnp.float32), jnp.exp(0.5 * logvar.astype(jnp.float32))]
        return tuple(out)

    return fn


def encode_dataset(output: str, *, vae: str, dataset: str = "digits", split: str = "train",
                   data_dir: str | None = None, image_size: int | None = None, shard_size: int = 10_000,
                   batch_size: int = 64, flip: bool = False, max_shards: int | None = None,
                   devices=None, log: Callable[[str], None] = print) -> latents.Manifest:
    """Encodes ``dataset`` (``split``; :func:`jaxdiff.data.make_source`) with the autoencoder of the folder
    ``vae`` into the latents folder ``output``, or continues a partial one; returns its manifest.

    ``image_size``: resize the images to this square size first (as ``config.data.image_size`` does;
    ``None``: their own size). ``shard_size``: examples per shard file. ``batch_size``: examples per
    call, rounded up to a multiple of the device count, sharded over ``devices`` (default: this
    process's, through :meth:`DataParallel.compile_batched`). ``flip``: also store the posterior of
    each horizontally flipped image (for ``config.data.random_flip``). ``max_shards``: encode at most
    this many shards in this call (the rest on a later call). ``log``: receives one progress line per shard.

    Every argument, the output folder and the autoencoder are checked before any image is encoded
    (``ValueError`` / ``FileExistsError`` naming the flag). One process only (a multi-host job is refused).
    """
    for name, value in (("--shard_size", shard_size), ("--batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if image_size is not None and image_size <= 0:
        raise ValueError(f"--image_size must be positive, got {image_size}")
    if max_shards is not None and max_shards <= 0:
        raise ValueError(f"--max_shards must be positive, got {max_shards}")
    if jax.process_count() > 1:
        raise ValueError(f"jaxdiff-encode runs in one process (this job has {jax.process_count()}); encode on one "
                         f"host, then copy --output to the others")
    saved = None
    if os.path.exists(output):
        if not os.path.isdir(output):
            raise FileExistsError(f"--output {output} exists and is not a folder")
        if os.path.isfile(os.path.join(output, latents.MANIFEST)):
            saved = latents.read_manifest(output, name="--output")
            if saved.complete:
                raise FileExistsError(f"--output {output} holds a complete encoding ({saved.num_examples} examples); "
                                      f"refusing to overwrite it: remove it or choose another --output")
        elif os.listdir(output):
            raise FileExistsError(f"--output {output} is a folder with other files in it; give a new or empty one")
    autoencoder = latents.load_autoencoder(vae, name="--vae")
    try:
        source = data.make_source(dataset, split, data_dir)
    except ValueError as error:
        raise ValueError(f"--dataset={dataset!r}: {error}") from None
    info = source.info
    image_shape = (image_size, image_size, info.image_shape[2]) if image_size else tuple(info.image_shape)
    if None in image_shape:
        raise ValueError(f"--image_size: dataset {dataset!r} has images of varying size; set it")
    try:
        posterior = jax.eval_shape(autoencoder.encode, autoencoder.params, jax.ShapeDtypeStruct((1, *image_shape),
                                                                                                jnp.float32))
    except (ValueError, TypeError) as error:
        raise ValueError(f"--vae={vae!r} cannot encode {image_shape} images: {error}") from None
    par = DataParallel("sharding", devices=jax.local_devices() if devices is None else devices)
    batch = -(-batch_size // par.num_devices) * par.num_devices
    manifest = latents.Manifest(
        dataset={"name": dataset, "split": split, "data_dir": data_dir or "", "image_size": image_size or 0},
        image_shape=tuple(int(v) for v in image_shape), latent_shape=tuple(int(v) for v in posterior[0].shape[1:]),
        num_examples=len(source), num_classes=info.num_classes, shard_size=shard_size, complete_shards=0,
        flips=bool(flip), autoencoder={"path": autoencoder.path, "scaling_factor": autoencoder.scaling_factor,
                                       "shift_factor": autoencoder.shift_factor, "sha256": autoencoder.sha256},
        batch_size=batch, num_devices=par.num_devices)
    if saved is not None:
        _check_resume(saved, manifest, output)
        manifest = saved
    os.makedirs(output, exist_ok=True)
    manifest.write(output)

    fn = par.compile_batched(_encode_fn(autoencoder, flip))
    params = par.put_replicated(autoencoder.params)
    names = ["mean", "std"] + (["mean_flip", "std_flip"] if flip else [])
    first = manifest.complete_shards
    last = manifest.num_shards if max_shards is None else min(manifest.num_shards, first + max_shards)
    if first:
        log(f"resuming {output}: {first} of {manifest.num_shards} shards are complete")
    for k in range(first, last):
        start, stop = k * shard_size, min((k + 1) * shard_size, manifest.num_examples)
        t0 = time.time()
        parts: dict[str, list] = {n: [] for n in names + ["label"]}
        for b in range(start, stop, batch):
            n = min(batch, stop - b)
            idx = np.minimum(np.arange(b, b + batch), stop - 1)  # padding: copies of the shard's last image
            images, labels = data.read_images(source, idx, image_size=image_size)
            outputs = fn(params, data.from_uint8(images))
            for name, value in zip(names, outputs):
                parts[name].append(np.asarray(value)[:n])
            if labels is not None:
                parts["label"].append(labels[:n])
        arrays = {n: np.concatenate(v) for n, v in parts.items() if v}
        path = latents.shard_path(output, k)
        with open(path + ".tmp", "wb") as f:
            np.savez(f, **arrays)
        os.replace(path + ".tmp", path)
        manifest = dataclasses.replace(manifest, complete_shards=k + 1)
        manifest.write(output)
        log(f"shard {k + 1}/{manifest.num_shards}: examples {start}..{stop - 1} "
            f"({(stop - start) / max(time.time() - t0, 1e-9):.0f} images/s)")
    if manifest.complete:
        log(f"wrote {manifest.num_examples} latents {manifest.latent_shape} to {output}")
    return manifest

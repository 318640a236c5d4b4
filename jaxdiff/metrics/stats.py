"""Reference statistics of a dataset: the mean and covariance of its features, as ``.npz``.

    python -m jaxdiff.metrics.stats --dataset cifar10 --split train --inception W.safetensors --out cifar10.npz
    python -m jaxdiff.metrics.stats --dataset digits --features digits --out digits.npz

Images are read by :mod:`jaxdiff.data` exactly as training reads them (``make_source``, then
batches in [-1, 1] of the epoch-0 order, each example once), passed through the feature
network and accumulated in float64 batch by batch (:func:`jaxdiff.metrics.fid.update_statistics`),
so no more than one batch of images or features is in memory. The file records the image
count and the SHA-256 of the network's weights file, so a FID is only ever computed against
statistics of the same network (:func:`jaxdiff.metrics.fid.load_stats`).

``--features inception`` (the default) needs the FID Inception weights (``--inception``);
``--features digits`` uses the shipped 8x8 digits classifier (offline).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Callable

import numpy as np

from jaxdiff import data
from jaxdiff.metrics import fid

__all__ = ["FEATURES", "dataset_statistics", "file_sha256", "load_features"]

FEATURES = ("inception", "digits")


def file_sha256(path: str | os.PathLike) -> str:
    """Lowercase hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_features(features: str, weights: str | os.PathLike | None = None) -> tuple[Callable, str]:
    """``(images [N, H, W, C] in [-1, 1] -> features [N, D], sha256 of the weights file)``.

    ``features``: ``"inception"`` (``weights`` required: the FID Inception file read by
    :func:`jaxdiff.metrics.inception.load_inception`, fed the images back as uint8) or
    ``"digits"`` (``weights`` optional:
    default the shipped classifier).
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    if features == "digits":
        from jaxdiff.metrics import digits

        path = os.fspath(weights) if weights is not None else digits.WEIGHTS_PATH
        return digits.load_digits_features(path), file_sha256(path)
    if weights is None:
        raise ValueError("features 'inception' needs the Inception weights file (--inception)")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"Inception weights {weights} do not exist")
    from jaxdiff.metrics import inception  # imported here: only this network needs it

    network = inception.load_inception(weights)

    def inception_features(images: np.ndarray) -> np.ndarray:
        # The FID Inception takes uint8, like pytorch-fid; to_uint8 inverts the pipeline's from_uint8 exactly.
        return network(data.to_uint8(images))

    return inception_features, file_sha256(weights)


def dataset_statistics(source: data.Source, feature_fn: Callable, *, batch_size: int = 250,
                       image_size: int | None = None, max_images: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu [D], sigma [D, D], count)`` of ``feature_fn`` over ``source``, streamed.

    Reads the first ``count = min(len(source), max_images)`` positions of the epoch-0 order
    of ``seed`` (all examples once when ``max_images`` is None) in batches of ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    count = len(source) if max_images is None else min(len(source), max_images)
    if count < 2:
        raise ValueError(f"source {source.info.name!r} has {count} images; statistics need at least 2")
    acc = None
    num_steps = math.ceil(count / batch_size)
    with data.batch_iterator(source, 0, num_steps, global_batch_size=batch_size, seed=seed,
                             image_size=image_size) as batches:
        for step, batch in batches:
            images = batch["image"][: count - step * batch_size]  # the last batch: epoch 0 only
            features = np.asarray(feature_fn(images))
            if acc is None:
                acc = fid.init_statistics(features.shape[-1])
            acc = fid.update_statistics(acc, features)
    mu, sigma = fid.finalize_statistics(acc)
    return mu, sigma, acc.count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.metrics.stats", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="'digits' or a prepared TFDS image dataset")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (default: $TFDS_DATA_DIR)")
    parser.add_argument("--features", default="inception", choices=FEATURES)
    parser.add_argument("--inception", default=None, help="FID Inception weights (for --features inception)")
    parser.add_argument("--digits_weights", default=None, help="digits classifier weights (default: shipped)")
    parser.add_argument("--out", required=True, help="statistics file to write (.npz)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--batch_size", type=int, default=250)
    parser.add_argument("--image_size", type=int, default=None, help="center-crop and resize to this size")
    parser.add_argument("--max_images", type=int, default=None, help="at most this many (a seeded subset)")
    parser.add_argument("--seed", type=int, default=0, help="order of the subset when --max_images is set")
    args = parser.parse_args(argv)
    try:
        if os.path.exists(args.out) and not args.overwrite:
            raise FileExistsError(f"stats file {args.out} exists; pass --overwrite to replace it")
        source = data.make_source(args.dataset, args.split, args.data_dir)
        shape = source.info.image_shape
        if args.image_size is not None:
            shape = (args.image_size, args.image_size, shape[-1])
        if args.features == "digits" and tuple(shape) != (8, 8, 1):
            raise ValueError(f"features 'digits' needs 8x8x1 images; dataset {args.dataset!r} gives {shape}")
        weights = args.inception if args.features == "inception" else args.digits_weights
        feature_fn, sha = load_features(args.features, weights)
        mu, sigma, count = dataset_statistics(source, feature_fn, batch_size=args.batch_size,
                                              image_size=args.image_size, max_images=args.max_images,
                                              seed=args.seed)
        fid.save_stats(args.out, mu, sigma, count=count, weights_sha256=sha, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {args.out}: {count} images of {args.dataset}/{args.split}, {mu.shape[0]} features ({args.features})")


if __name__ == "__main__":
    main()

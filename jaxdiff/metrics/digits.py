"""The offline feature network: a small CNN classifier of scikit-learn's 8x8 digits.

Inception weights need a download; the default job trains on the 8x8 digits
(:func:`jaxdiff.data.load_digits`), so FID-style numbers for it come from this network's
penultimate features instead (64-dimensional, after a ReLU, like Inception's pool3).

* Split: the 1,797 digits in the order ``np.random.default_rng(0).permutation(1797)``; the
  first 360 are *held out* (never seen by the classifier), the other 1,437 train it. The
  diffusion job itself trains on all 1,797 (the dataset has one split).
* Weights: ``digits_classifier.safetensors`` beside this file, made deterministically by::

      python -m jaxdiff.metrics.digits --train --out jaxdiff/metrics/digits_classifier.safetensors

  (Adam, seed 0, 40 epochs of batch 64; ``--report`` prints the figures below). 38,282
  parameters (154 kB); 99.2% accuracy on the held-out digits.
* :func:`load_digits_features` maps images ``[N, 8, 8, 1]``, float in [-1, 1] (the
  convention of :mod:`jaxdiff.data` and the samplers) or uint8 in [0, 255] (converted as
  ``x / 127.5 - 1``), to features ``[N, 64]``. Floats that all lie in ``[0, 1]`` are refused
  (``ValueError``): they are the other scaling, and would give a wrong distance.
* :func:`digits_fd` gives the Frechet distance of generated images to the real digits,
  with the *floor*: the distance real digits of the other split reach with the same count.
  Against the held-out digits the floor is 8.4 with 360 images and 5.6 with 1,000; 1,000
  images of uniform noise score 499, 1,000 blank images 1,055.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdiff import checks
from jaxdiff.metrics import fid

__all__ = [
    "check_digits_shape",
    "FEATURE_DIM",
    "HELDOUT_SIZE",
    "WEIGHTS_PATH",
    "DigitsClassifier",
    "digits_fd",
    "digits_split",
    "heldout_accuracy",
    "load_digits_features",
    "load_params",
    "save_params",
    "train_classifier",
]


def check_digits_shape(image_shape) -> int:
    """The factor ``k`` by which the digits network average-pools ``(8k, 8k, 1)`` images to its 8x8x1 input
    (``k = 1``: 8x8 digits as they are; e.g. decoded 32x32 samples of digits upsampled for a latent run
    give ``k = 4``). ``ValueError`` for any other shape."""
    h, w, c = tuple(image_shape)
    if c != 1 or h != w or h % 8:
        raise ValueError(f"the digits network takes 8x8x1 images (or 8k x 8k x 1, average-pooled to 8x8); this run "
                         f"makes {tuple(image_shape)}")
    return h // 8


FEATURE_DIM = 64
HELDOUT_SIZE = 360
SPLIT_SEED = 0
WEIGHTS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_classifier.safetensors")
_BATCH = 512  # feature extraction batch (padded: one compilation)


class DigitsClassifier(nn.Module):
    """``x: [B, 8, 8, 1]`` in [-1, 1] -> logits ``[B, 10]`` (or features ``[B, 64]``)."""

    features: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array, *, return_features: bool = False) -> jax.Array:
        x = nn.relu(nn.Conv(16, (3, 3))(x))  # [B, 8, 8, 16]
        x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))  # [B, 4, 4, 32]
        h = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))  # [B, 64]
        return h if return_features else nn.Dense(10)(h)


def digits_split() -> dict[str, np.ndarray]:
    """The fixed split: ``train_images [1437, 8, 8, 1]``, ``heldout_images [360, 8, 8, 1]`` (float32
    in [-1, 1], ``x / 127.5 - 1`` as :func:`jaxdiff.data.get_batch`) and int32 ``*_labels``."""
    from jaxdiff import data

    source = data.load_digits()
    images = source.images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    labels = source.labels.astype(np.int32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    held, train = order[:HELDOUT_SIZE], order[HELDOUT_SIZE:]
    return {"train_images": images[train], "train_labels": labels[train],
            "heldout_images": images[held], "heldout_labels": labels[held]}


def train_classifier(*, epochs: int = 40, batch_size: int = 64, learning_rate: float = 1e-3,
                     seed: int = 0) -> tuple[dict, float]:
    """Trains :class:`DigitsClassifier` on the train split; returns ``(params, heldout_accuracy)``.

    Deterministic: init from ``jax.random.key(seed)``, epoch ``e`` in the order
    ``np.random.default_rng([seed, e]).permutation``, the last partial batch dropped.
    """
    import optax

    split = digits_split()
    x, y = split["train_images"], split["train_labels"]
    model = DigitsClassifier()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)))["params"]
    tx = optax.adam(learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    for epoch in range(epochs):
        order = np.random.default_rng([seed, epoch]).permutation(len(x))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i : i + batch_size]
            params, opt_state = step(params, opt_state, x[idx], y[idx])
    return params, heldout_accuracy(params)


def heldout_accuracy(params: dict) -> float:
    """Fraction of the 360 held-out digits that ``params`` classify correctly."""
    split = digits_split()
    logits = DigitsClassifier().apply({"params": params}, split["heldout_images"])
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == split["heldout_labels"]))


def save_params(path: str, params: dict, *, overwrite: bool = False) -> None:
    """Writes ``params`` as float32 safetensors, keys ``"Conv_0/kernel"`` etc."""
    from safetensors.numpy import save_file

    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"weights file {path} exists; pass --overwrite to replace it")
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}, path,
              metadata={"format": "jaxdiff.metrics.digits.DigitsClassifier"})


def load_params(path: str | os.PathLike | None = None) -> dict:
    """The classifier's params from ``path`` (default: the shipped ``WEIGHTS_PATH``).

    Raises FileNotFoundError for a missing file and ValueError naming the file when its
    tensors do not match :class:`DigitsClassifier`'s names and shapes.
    """
    from safetensors.numpy import load_file

    path = os.fspath(path) if path is not None else WEIGHTS_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f"digits classifier weights {path} do not exist")
    tensors = load_file(path)
    abstract = jax.eval_shape(DigitsClassifier().init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    expected = {k: v.shape for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    found = {k: v.shape for k, v in tensors.items()}
    if found != expected:
        raise ValueError(f"weights file {path} does not hold a DigitsClassifier: expected {expected}, found {found}")
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in tensors.items()}, sep="/")


_CONVENTION = "float in [-1, 1] or uint8 in [0, 255]"


def _check_images(images) -> np.ndarray:
    """``images`` [N, 8, 8, 1] as float32 in [-1, 1]: floats as they are, uint8 as ``x / 127.5 - 1``."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[1:] != (8, 8, 1) or not (np.issubdtype(x.dtype, np.floating) or x.dtype == np.uint8):
        raise ValueError(f"images must be [N, 8, 8, 1], {_CONVENTION}, got {x.dtype} {x.shape}"
                         f"{checks.layout_hint(x.shape)}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(127.5) - np.float32(1.0)  # as digits_split scales the real ones
    if not np.all(np.isfinite(x)):
        raise ValueError("images hold non-finite values")
    if x.size and (x.min() < -1.001 or x.max() > 1.001):
        raise ValueError(f"images must be {_CONVENTION} (clip float samples first), got floats in "
                         f"[{x.min():.3g}, {x.max():.3g}]")
    if x.size and x.min() >= 0.0:
        raise ValueError(f"images must be {_CONVENTION}; got floats in [{x.min():.3g}, {x.max():.3g}], which looks "
                         f"like [0, 1]: pass 2 x - 1")
    return x.astype(np.float32)


def load_digits_features(path: str | os.PathLike | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``images: [N, 8, 8, 1] -> features: float32 [N, 64]``, images float in [-1, 1] or uint8.

    Runs in padded batches of 512 (one compilation); raises ValueError for other shapes,
    dtypes, floats beyond [-1, 1] or floats that all lie in [0, 1].
    """
    params = load_params(path)
    apply = jax.jit(functools.partial(DigitsClassifier().apply, return_features=True))

    def features(images) -> np.ndarray:
        x = _check_images(images)
        n = len(x)
        padded = np.pad(x, ((0, -n % _BATCH), (0, 0), (0, 0), (0, 0)))
        out = [np.asarray(apply({"params": params}, padded[i : i + _BATCH])) for i in range(0, len(padded), _BATCH)]
        return np.concatenate(out or [np.zeros((0, FEATURE_DIM), np.float32)])[:n]

    return features


@functools.lru_cache(maxsize=2)
def _network(path: str) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, np.ndarray]]:
    """The feature function of the weights at ``path`` and its features of both splits."""
    split, features = digits_split(), load_digits_features(path)
    return features, {"train": features(split["train_images"]), "heldout": features(split["heldout_images"])}


def digits_fd(images, reference: str = "heldout", *, seed: int = 0, weights: str | os.PathLike | None = None) -> dict:
    """Frechet distance in the classifier's features between ``images`` and real digits.

    ``images``: ``[N, 8, 8, 1]``, float in [-1, 1] or uint8, ``N >= 2``. ``reference``: ``"heldout"``
    (360 digits the classifier never saw) or ``"train"`` (1,437). Returns ``{"fd", "floor",
    "num_images", "floor_count", "reference"}``, where ``floor`` is the distance of
    ``floor_count = min(N, size of the other split)`` real digits of the *other* split
    (drawn with ``np.random.default_rng(seed)``) to the same reference: what a generator
    matching the data would score with that many samples.
    """
    if reference not in ("heldout", "train"):
        raise ValueError(f"reference must be 'heldout' or 'train', got {reference!r}")
    x = _check_images(images)
    if len(x) < 2:
        raise ValueError(f"images needs at least 2 images, got shape {x.shape}")
    features, real = _network(os.path.abspath(os.fspath(weights)) if weights is not None else WEIGHTS_PATH)
    ref = real[reference]
    other = real["train" if reference == "heldout" else "heldout"]
    m = min(len(x), len(other))
    subset = other[np.random.default_rng(seed).choice(len(other), m, replace=False)]
    ref_stats = fid.feature_statistics(ref)
    fd = fid.frechet_distance_from_stats(*fid.feature_statistics(features(x)), *ref_stats)
    floor = fid.frechet_distance_from_stats(*fid.feature_statistics(subset), *ref_stats)
    return {"fd": fd, "floor": floor, "num_images": len(x), "floor_count": m, "reference": reference}


def _report(path: str | None) -> str:
    params = load_params(path)
    n_params = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))
    size = os.path.getsize(path or WEIGHTS_PATH)
    noise = np.random.default_rng(0).uniform(-1, 1, (1000, 8, 8, 1)).astype(np.float32)
    res = digits_fd(noise, weights=path)
    return (f"heldout accuracy {heldout_accuracy(params):.4f}, {n_params} parameters, {size} bytes; "
            f"FD floor (train vs heldout, {res['floor_count']} images) {res['floor']:.3f}; "
            f"FD of uniform noise ({res['num_images']} images) vs heldout {res['fd']:.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxdiff.metrics.digits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", action="store_true", help="train the classifier and write --out")
    parser.add_argument("--out", default=None, help="weights file to write (.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--report", action="store_true", help="print accuracy and FD figures of the weights")
    parser.add_argument("--weights", default=None, help="weights to --report on (default: the shipped file)")
    args = parser.parse_args(argv)
    try:
        if args.train:
            if not args.out:
                raise ValueError("--train needs --out")
            if os.path.exists(args.out) and not args.overwrite:
                raise FileExistsError(f"weights file {args.out} exists; pass --overwrite to replace it")
            params, accuracy = train_classifier()
            save_params(args.out, params, overwrite=args.overwrite)
            print(f"wrote {args.out}: heldout accuracy {accuracy:.4f}")
        if args.report:
            print(_report(args.weights or (args.out if args.train else None)))
        if not (args.train or args.report):
            raise ValueError("nothing to do: pass --train --out PATH and/or --report")
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

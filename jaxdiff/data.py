"""Image datasets -> deterministic NumPy batches in [-1, 1], NHWC.

Sources are random-access sequences of examples ``{"image": uint8 [H, W, C], "label": int}``
with an ``info`` (:class:`DatasetInfo`):

* ``"digits"``: the 8x8 handwritten digits that ship with scikit-learn (1,797 images,
  10 classes), offline; the default dataset.
* any TFDS image dataset (``"mnist"``, ``"cifar10"``, ``"celeb_a"``, ...), read through
  ``tfds.data_source`` (array_record files; no TensorFlow needed once prepared). Prepare it
  once with ``pip install -e '.[prepare]'`` and ``python -m jaxdiff.prepare NAME``.
* :class:`ArraySource` wraps in-memory arrays (your own data, tests).
* :class:`jaxdiff.latents.LatentSource`: an autoencoder's latents of a dataset, written once by
  ``jaxdiff-encode`` (``config.data.latents``); its batches' ``image`` is the network's input
  ``(z - shift) * scaling`` ``[B, h, w, c]``.

Batches are a pure function of ``(seed, step)``, so training gives the same result on any
number of devices and hosts and a resumed run reproduces an uninterrupted one without
saving iterator state:

* Epoch ``e`` visits the examples in the order ``np.random.default_rng([seed, e])
  .permutation(n)``; the *stream* is the concatenation of the epochs' orders.
* The global batch at ``step`` holds stream positions ``[step * B, (step + 1) * B)``
  (batches may straddle epochs; nothing is dropped). Process ``p`` of ``P`` reads only its
  contiguous shard: positions ``step * B + [p * B / P, (p + 1) * B / P)``.
* The random horizontal flip of the example at index ``i`` of the global batch is a
  splitmix64 hash of ``(seed, step, i)``: independent of the process count.
* ``batch["index"]`` is ``i`` (0..B-1), from which the training step folds per-example
  noise keys.

Examples are read by random access and mapped (decode, crop, resize) in a background thread
(:class:`BatchIterator`). TensorFlow Datasets is imported only for TFDS datasets, so the
offline ``digits`` job never loads it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

from jaxdiff.prefetch import BatchIterator

__all__ = [
    "ArraySource",
    "BatchIterator",
    "DatasetInfo",
    "Source",
    "TfdsSource",
    "batch_iterator",
    "example_hash",
    "from_uint8",
    "get_batch",
    "load_digits",
    "make_source",
    "prepare_command",
    "read_images",
    "stream_indices",
    "to_uint8",
]

DIGITS = "digits"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a training loop needs to know about a source before reading it."""

    name: str
    split: str
    image_shape: tuple[int | None, int | None, int]  # (H, W, C); None where sizes vary
    num_examples: int
    num_classes: int | None  # None: unlabeled (no "label" in the examples or batches)


class Source(Protocol):
    """Random access: ``source[i] -> {"image": uint8 [H, W, C], "label": int}``.

    A source of stored model inputs instead of images (:class:`jaxdiff.latents.LatentSource`) has a
    ``model_inputs(indices, *, seed, step, index, flip, image_size) -> {"image": float32 [b, ...][, "label"]}``
    method,
    which :func:`get_batch` calls in place of decoding images.
    """

    info: DatasetInfo

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


class ArraySource:
    """In-memory source over ``images: uint8 [N, H, W, C]`` and ``labels: int [N]``."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        num_classes: int | None = None,
        name: str = "arrays",
        split: str = "train",
    ):
        images = np.asarray(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != images.shape[:1]:
                raise ValueError(
                    f"labels must have shape [N]={images.shape[:1]}, got {labels.shape}"
                )
            if num_classes is None:
                num_classes = int(labels.max()) + 1
        self.images = images
        self.labels = labels
        self.info = DatasetInfo(
            name=name,
            split=split,
            image_shape=tuple(images.shape[1:]),
            num_examples=len(images),
            num_classes=num_classes if labels is not None else None,
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = {"image": self.images[index]}
        if self.labels is not None:
            example["label"] = int(self.labels[index])
        return example


class TfdsSource:
    """Wraps a ``tfds.data_source`` split, keeping only ``image`` (and ``label``)."""

    def __init__(self, data_source: Any, info: DatasetInfo):
        self._data_source = data_source
        self.info = info

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._data_source[int(index)]
        example = {"image": np.asarray(record["image"], dtype=np.uint8)}
        if self.info.num_classes is not None:
            example["label"] = int(record["label"])
        return example


def load_digits() -> ArraySource:
    """scikit-learn's 8x8 digits as uint8 [1797, 8, 8, 1] (``round(v * 255 / 16)``)."""
    import sklearn.datasets  # imported here: heavy, and only this dataset needs it

    digits = sklearn.datasets.load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return ArraySource(images, digits.target, num_classes=10, name=DIGITS)


def from_uint8(images) -> np.ndarray:
    """uint8 images in ``[0, 255]`` -> float32 in ``[-1, 1]``: ``x / 127.5 - 1`` (in float32), any shape
    (``[N, H, W, C]`` for the models). The batches of :func:`~jaxdiff.data.get_batch` are made by it;
    :func:`~jaxdiff.data.to_uint8` inverts it exactly: ``to_uint8(from_uint8(u)) == u`` for every uint8 ``u``.

    ``ValueError`` unless ``images`` is uint8 (float images are already in the model's range, or
    need a conversion of their own)."""
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {arr.dtype} (float images in [-1, 1] "
                         f"need no conversion)")
    return arr.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(images) -> np.ndarray:
    """Float images in ``[-1, 1]`` (any shape; samples ``[N, H, W, C]``) -> uint8 ``[0, 255]``, ready to save.

    The rule: ``(x + 1) * 127.5`` in float32, rounded to the nearest integer (halves to even, NumPy's
    ``rint``: ``0.0 -> 127.5 -> 128``), clipped to ``[0, 255]``; the inverse of :func:`~jaxdiff.data.from_uint8`.
    """
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def prepare_command(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """The shell commands that prepare TFDS dataset ``name`` for :func:`make_source`."""
    where = f" --data_dir {data_dir}" if data_dir is not None else ""
    return f"pip install -e '.[prepare]'  &&  python -m jaxdiff.prepare {name}{where}"


def make_source(
    name: str = DIGITS, split: str = "train", data_dir: str | os.PathLike | None = None
) -> Source:
    """Returns the source for dataset ``name`` (``"digits"`` or a TFDS image dataset).

    Raises ValueError for an unknown name or a dataset without an ``image`` feature, and
    FileNotFoundError (with the command to run) for a TFDS dataset not prepared in
    ``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). Never downloads.
    """
    if name == DIGITS:
        if split != "train":
            raise ValueError(f"split {split!r}: dataset 'digits' has only split 'train'")
        return load_digits()
    import tensorflow_datasets as tfds  # here: heavy, and only TFDS datasets need it

    # "name[/config][:version]"; builder_cls only looks in the registry (no network).
    try:
        tfds.builder_cls(name.split("/")[0].split(":")[0])
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"dataset name {name!r} is unknown: use 'digits' or a TFDS image dataset "
            "such as mnist, cifar10, celeb_a"
        ) from None
    builder = tfds.builder(name, data_dir=data_dir)
    features = builder.info.features
    if "image" not in features or not isinstance(features["image"], tfds.features.Image):
        raise ValueError(f"dataset name {name!r}: the dataset has no 'image' feature")
    try:
        data_source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as error:  # tfds raises NotImplementedError for a missing dataset
        if builder.is_prepared():
            raise  # e.g. prepared as TFRECORD: tfds's own message says what to do
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. Preparing needs "
            f"TensorFlow and a download, once:  {prepare_command(name, data_dir)}"
        ) from error
    label = features["label"] if "label" in features else None
    info = DatasetInfo(
        name=name,
        split=split,
        image_shape=tuple(features["image"].shape),
        num_examples=len(data_source),
        num_classes=getattr(label, "num_classes", None),
    )
    return TfdsSource(data_source, info)


# ---------------------------------------------------------------------------- batches


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_hash(seed: int, step: int, index: np.ndarray) -> np.ndarray:
    """uint64 [k] hash of (seed, step, index [k]): per-example randomness without state."""
    h = _splitmix64(np.asarray([seed], dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(step))
    return _splitmix64(h ^ np.asarray(index, dtype=np.uint64))


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """int64 [n]: the order in which epoch ``epoch`` visits the examples."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def stream_indices(positions: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Source indices [k] of stream positions [k] (epoch = position // n)."""
    epochs, offsets = np.divmod(np.asarray(positions, dtype=np.int64), n)
    indices = np.empty_like(offsets)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        indices[where] = _epoch_order(seed, int(epoch), n)[offsets[where]]
    return indices


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 [H, W, C] -> [size, size, C]: center square crop, then bicubic resize."""
    h, w, c = image.shape
    if (h, w) == (size, size):
        return image
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    pil = Image.fromarray(square[..., 0] if c == 1 else square)
    return np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC)).reshape(size, size, c)


def _standardize(example: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    image = np.asarray(example["image"], dtype=np.uint8)
    if image_size is not None:
        image = _resize(image, image_size)
    return {**example, "image": image}


def read_images(source: Source, indices, *, image_size: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``(images uint8 [k, H, W, C], labels int32 [k] or None)`` of source ``indices`` ``[k]``, each image as
    :func:`get_batch` prepares it (with ``image_size``: a center square crop and a bicubic resize; no flip).
    ``ValueError`` for images of different shapes."""
    examples = [_standardize(source[int(i)], image_size) for i in indices]
    shapes = {example["image"].shape for example in examples}
    if len(shapes) > 1:
        raise ValueError(f"images of {source.info.name!r} have different shapes {sorted(shapes)}: "
                         "pass image_size to resize them")
    labels = None
    if source.info.num_classes is not None:
        labels = np.asarray([example["label"] for example in examples], np.int32)
    return np.stack([example["image"] for example in examples]), labels


def _check_batch_args(
    source: Source, step: int, global_batch_size: int, seed: int, process_index: int,
    process_count: int, image_size: int | None,
) -> None:
    """Raises ValueError naming the argument; value checks at the input boundary."""
    if len(source) == 0:
        raise ValueError(f"source {source.info.name!r} is empty")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")


def get_batch(
    source: Source,
    step: int,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
    image_size: int | None = None,
) -> dict[str, np.ndarray]:
    """This process's shard of the global batch at ``step`` (a pure function).

    Returns, with ``b = global_batch_size // process_count``:
      ``image``: float32 [b, H, W, C] in [-1, 1] (:func:`~jaxdiff.data.from_uint8`; H = W = image_size
      when given, after a center crop to a square and a bicubic resize);
      ``label``: int32 [b] (only when the source has labels);
      ``index``: int32 [b], each example's index in the global batch (0..B-1).
    """
    _check_batch_args(
        source, step, global_batch_size, seed, process_index, process_count, image_size
    )
    local = global_batch_size // process_count
    index = process_index * local + np.arange(local, dtype=np.int64)
    positions = step * global_batch_size + index
    indices = stream_indices(positions, len(source), seed)
    flip = (example_hash(seed, step, index) >> np.uint64(63)).astype(bool) if random_flip else None
    if hasattr(source, "model_inputs"):  # stored model inputs (jaxdiff.latents.LatentSource), not uint8 images
        batch = source.model_inputs(indices, seed=seed, step=step, index=index, flip=flip, image_size=image_size)
        return {**batch, "index": index.astype(np.int32)}
    examples = [_standardize(source[int(i)], image_size) for i in indices]
    shapes = {example["image"].shape for example in examples}
    if len(shapes) > 1:
        raise ValueError(
            f"images of {source.info.name!r} have different shapes {sorted(shapes)}: "
            "pass image_size to resize them"
        )
    images = np.stack([example["image"] for example in examples])  # uint8 [b, H, W, C]
    if random_flip:
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    batch = {
        "image": from_uint8(images),
        "index": index.astype(np.int32),
    }
    if source.info.num_classes is not None:
        batch["label"] = np.asarray([example["label"] for example in examples], np.int32)
    return batch


def batch_iterator(
    source: Source,
    start_step: int = 0,
    num_steps: int | None = None,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    random_flip: bool = False,
    image_size: int | None = None,
    prefetch: int = 2,
) -> BatchIterator:
    """Yields ``(step, get_batch(source, step, ...))`` for ``num_steps`` steps from ``start_step``.

    Runs forever when ``num_steps`` is None. Resuming at step k yields exactly the batches
    an uninterrupted run sees from step k on. Arguments are checked here, before the
    background thread starts.
    """
    _check_batch_args(
        source, start_step, global_batch_size, seed, process_index, process_count, image_size
    )
    make_batch = functools.partial(
        get_batch,
        source,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        random_flip=random_flip,
        image_size=image_size,
    )
    if num_steps is None:
        steps = itertools.count(start_step)
    else:
        steps = iter(range(start_step, start_step + num_steps))
    return BatchIterator(make_batch, steps, prefetch)

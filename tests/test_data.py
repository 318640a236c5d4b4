"""Tests for jaxdiff.data: sources, deterministic sharded batches, flips, prefetching."""

import numpy as np
import pytest
import scipy.stats
import sklearn.datasets
import tensorflow_datasets as tfds
from PIL import Image

from jaxdiff import data


def _sorted_rows(images, labels):
    """Rows (label, pixels...) in lexicographic order: compares batches as multisets."""
    rows = np.concatenate([labels[:, None], images.reshape(len(images), -1)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def _id_source(n, shape=(4, 5, 3), seed=0):
    """Random (so never mirror-symmetric) images whose label is the example's id."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    return data.ArraySource(images, np.arange(n))


# ------------------------------------------------------------------------------ sources


def test_digits_match_sklearn():
    source = data.make_source("digits")
    assert source.info == data.DatasetInfo("digits", "train", (8, 8, 1), 1797, 10)
    assert len(source) == 1797
    raw = sklearn.datasets.load_digits()
    expected = np.rint(raw.images.astype(np.float64) * 255 / 16) / 127.5 - 1  # [N, 8, 8]
    # One global batch of n examples is exactly one epoch: every example once.
    batch = data.get_batch(source, 0, global_batch_size=1797, seed=3)
    assert batch["image"].shape == (1797, 8, 8, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) == set(range(10))
    assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
    np.testing.assert_allclose(
        _sorted_rows(batch["image"].astype(np.float64), batch["label"]),
        _sorted_rows(expected, raw.target),
        atol=1e-6,
    )


def test_digits_has_only_train_split():
    with pytest.raises(ValueError, match="split"):
        data.make_source("digits", split="test")


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_tfds_source_with_mock_data(name, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.make_source(name, data_dir=tmp_path)
        assert source.info == data.DatasetInfo(name, "train", shape, 12, 10)
        batch = data.get_batch(source, 0, global_batch_size=12, seed=0)
        reference = tfds.data_source(name, split="train", download=False)
        raw = [reference[i] for i in range(12)]
    assert batch["image"].shape == (12, *shape) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    assert -1 <= batch["image"].min() and batch["image"].max() <= 1
    assert ((0 <= batch["label"]) & (batch["label"] < 10)).all()
    expected = np.stack([ex["image"] for ex in raw]).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(
        _sorted_rows(batch["image"].astype(np.float64), batch["label"]),
        _sorted_rows(expected, np.array([ex["label"] for ex in raw])),
        atol=1e-6,
    )


def test_unlabeled_tfds_source_resized(tmp_path):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.make_source("celeb_a", data_dir=tmp_path)
        batch = data.get_batch(source, 0, global_batch_size=6, seed=0, image_size=16)
        raw = [source[i]["image"] for i in range(6)]
    assert source.info.num_classes is None and source.info.image_shape == (218, 178, 3)
    assert set(batch) == {"image", "index"} and batch["image"].shape == (6, 16, 16, 3)
    # Reference: center 178x178 crop (rows 20..197), then PIL bicubic.
    expected = [
        np.asarray(Image.fromarray(im[20:198]).resize((16, 16), Image.BICUBIC)) for im in raw
    ]
    expected = np.stack(expected).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(
        _sorted_rows(batch["image"].astype(np.float64), np.zeros(6)),
        _sorted_rows(expected, np.zeros(6)),
        atol=1e-6,
    )


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="dataset name 'xyz' is unknown"):
        data.make_source("xyz")


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        data.make_source("mnist", data_dir=tmp_path)
    assert "pip install -e '.[prepare]'" in str(error.value)
    assert f"python -m jaxdiff.prepare mnist --data_dir {tmp_path}" in str(error.value)


# ---------------------------------------------------------------------------- batches


def test_same_seed_and_step_same_batch():
    source = _id_source(50)
    kwargs = dict(global_batch_size=8, random_flip=True)
    a = data.get_batch(source, 7, seed=1, **kwargs)
    b = data.get_batch(source, 7, seed=1, **kwargs)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    c = data.get_batch(source, 7, seed=2, **kwargs)
    assert not np.array_equal(a["label"], c["label"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_union_is_global_batch(process_count):
    source = _id_source(20)  # B = 8 does not divide 20: steps straddle epochs
    kwargs = dict(global_batch_size=8, seed=5, random_flip=True)
    for step in range(6):
        whole = data.get_batch(source, step, **kwargs)
        shards = [
            data.get_batch(source, step, process_index=p, process_count=process_count, **kwargs)
            for p in range(process_count)
        ]
        assert all(len(s["index"]) == 8 // process_count for s in shards)
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), whole[key])
        np.testing.assert_array_equal(whole["index"], np.arange(8))


def test_each_epoch_covers_every_example_once():
    n, batch_size = 60, 12
    source = _id_source(n)
    labels = [
        data.get_batch(source, step, global_batch_size=batch_size, seed=0)["label"]
        for step in range(2 * n // batch_size)
    ]
    epoch0, epoch1 = np.concatenate(labels[:5]), np.concatenate(labels[5:])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1)
    assert not np.array_equal(epoch0, np.arange(n))  # shuffled


def test_batches_straddle_epochs_without_dropping():
    source = _id_source(10)
    stream = np.concatenate(
        [data.get_batch(source, s, global_batch_size=4, seed=9)["label"] for s in range(5)]
    )
    np.testing.assert_array_equal(np.sort(stream[:10]), np.arange(10))
    np.testing.assert_array_equal(np.sort(stream[10:]), np.arange(10))
    assert not np.array_equal(stream[:10], stream[10:])


def _flips(source, step, seed):
    """bool [n]: whether the example at each index of the full batch at step is mirrored."""
    n = len(source)
    plain = data.get_batch(source, step, global_batch_size=n, seed=seed)
    flipped = data.get_batch(source, step, global_batch_size=n, seed=seed, random_flip=True)
    np.testing.assert_array_equal(plain["label"], flipped["label"])
    same = (flipped["image"] == plain["image"]).all(axis=(1, 2, 3))
    mirrored = (flipped["image"] == plain["image"][:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same ^ mirrored).all()  # each image is itself or its mirror (W axis), never both
    return mirrored


def test_random_flip_mirrors_about_half():
    n = 400
    source = _id_source(n)
    flips = _flips(source, 3, seed=11)
    assert scipy.stats.binomtest(int(flips.sum()), n, 0.5).pvalue > 1e-3
    # Flips are drawn afresh for each step and seed, not tied to the batch index.
    assert not np.array_equal(flips, _flips(source, 4, seed=11))
    assert not np.array_equal(flips, _flips(source, 3, seed=12))


def test_resize_digits_matches_pil():
    source = data.make_source("digits")
    batch = data.get_batch(source, 0, global_batch_size=4, seed=0, image_size=16)
    assert batch["image"].shape == (4, 16, 16, 1)
    raw = sklearn.datasets.load_digits()
    images = np.rint(raw.images * 255 / 16).astype(np.uint8)
    for image, label in zip(batch["image"], batch["label"]):
        resized = [
            np.asarray(Image.fromarray(im).resize((16, 16), Image.BICUBIC)) / 127.5 - 1
            for im in images[raw.target == label]
        ]
        assert any(np.allclose(image[..., 0], r, atol=1e-6) for r in resized)


def test_images_of_different_sizes_need_image_size():
    class Ragged:
        info = data.DatasetInfo("ragged", "train", (None, None, 1), 2, None)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": np.zeros((4 + 2 * i, 6, 1), np.uint8)}

    with pytest.raises(ValueError, match="image_size"):
        data.get_batch(Ragged(), 0, global_batch_size=2, seed=0)
    batch = data.get_batch(Ragged(), 0, global_batch_size=2, seed=0, image_size=3)
    assert batch["image"].shape == (2, 3, 3, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(global_batch_size=6, process_count=4), "not divisible by process_count=4"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=4, process_index=2, process_count=2), "process_index"),
        (dict(global_batch_size=4, seed=-1), "seed"),
    ],
)
def test_bad_batch_arguments(kwargs, match):
    kwargs = {"seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.get_batch(_id_source(10), 0, **kwargs)
    with pytest.raises(ValueError, match=match):
        data.batch_iterator(_id_source(10), 0, 1, **kwargs)


# --------------------------------------------------------------------------- iterator


def test_iterator_matches_get_batch_and_resumes():
    source = _id_source(30)
    kwargs = dict(global_batch_size=8, seed=4, random_flip=True, process_index=1, process_count=2)
    with data.batch_iterator(source, 0, 9, **kwargs) as iterator:
        full = list(iterator)
    assert [step for step, _ in full] == list(range(9))
    with data.batch_iterator(source, 5, 4, prefetch=1, **kwargs) as iterator:
        resumed = list(iterator)
    for (step, batch), (step2, batch2) in zip(full[5:], resumed, strict=True):
        expected = data.get_batch(source, step, **kwargs)
        assert step == step2
        for key in expected:
            np.testing.assert_array_equal(batch[key], expected[key])
            np.testing.assert_array_equal(batch2[key], expected[key])


def test_iterator_stops_its_thread():
    iterator = data.batch_iterator(_id_source(30), 0, None, global_batch_size=4, seed=0)
    assert next(iterator)[0] == 0 and next(iterator)[0] == 1
    iterator.close()  # the producer is blocked on a full queue: close must still return
    assert not iterator._thread.is_alive()
    with pytest.raises(StopIteration):
        next(iterator)


def test_iterator_reraises_errors():
    class Broken(data.ArraySource):
        def __getitem__(self, index):
            raise RuntimeError("disk on fire")

    images = np.zeros((4, 2, 2, 1), np.uint8)
    with data.batch_iterator(Broken(images), 0, 3, global_batch_size=2, seed=0) as iterator:
        with pytest.raises(RuntimeError, match="disk on fire"):
            next(iterator)
        assert not iterator._thread.is_alive()


# ------------------------------------------------------------------------------ uint8 <-> [-1, 1]


def test_from_uint8_and_to_uint8_invert_each_other_on_every_level():
    import jaxdiff
    from jaxdiff.training import images

    u = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = jaxdiff.from_uint8(u)
    assert x.dtype == np.float32 and x.shape == u.shape
    np.testing.assert_allclose(x, u.astype(np.float64) / 127.5 - 1.0, rtol=0, atol=6e-8)  # float32 of k/127.5 - 1
    assert x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(jaxdiff.to_uint8(x), u)
    assert jaxdiff.to_uint8 is images.to_uint8 is data.to_uint8 and jaxdiff.from_uint8 is data.from_uint8


def test_to_uint8_rounds_to_the_nearest_level_and_clips():
    # 0.0 -> 127.5 exactly: NumPy's rint rounds the half to the even 128.
    x = np.array([-2.0, -1.0, -1.0 + 0.49 / 127.5, -1.0 + 0.51 / 127.5, 0.0, 1.0 - 0.51 / 127.5, 1.0, 3.0, -np.inf,
                  np.inf], np.float32)
    np.testing.assert_array_equal(data.to_uint8(x), [0, 0, 0, 1, 128, 254, 255, 255, 0, 255])
    # Away from the halves: floor((x + 1) * 127.5 + 1/2) in float64.
    y = np.random.default_rng(0).uniform(-1.2, 1.2, 10000)
    y = y[np.abs(np.modf((y + 1) * 127.5)[0] - 0.5) > 1e-3]
    want = np.clip(np.floor((y + 1) * 127.5 + 0.5), 0, 255)
    np.testing.assert_array_equal(data.to_uint8(y.astype(np.float32)), want)


def test_from_uint8_refuses_float_images():
    with pytest.raises(ValueError, match=r"images must be uint8 in \[0, 255\], got dtype float32"):
        data.from_uint8(np.zeros((1, 8, 8, 1), np.float32))

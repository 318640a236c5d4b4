"""Sample quality of a trained model: FID (or the digits FD), KID and precision/recall of its samples.

The protocol (EDM's, Karras et al. 2022): ``num_samples`` images (50,000 for published
numbers) from the EMA parameters, class labels balanced (:func:`jaxdiff.training.images.grid_labels`),
one seed per run; several seeds give the min and mean.

* Samples are drawn by the run's sampling function (``Run.sampling``: the same one as the
  training job's sample grids and ``sample_workdir``), sharded over the devices
  (:meth:`DataParallel.compile_batched`) batch by batch with a progress bar. Example ``i``
  draws its noise from ``fold_in(key(seed), i)`` alone (``Sampling.per_example``), so the
  samples do not depend on the batch size or the number of devices.
* Samples are rounded to uint8 as a saved PNG would be, passed through the feature network
  and streamed into float64 statistics (:func:`jaxdiff.metrics.fid.update_statistics`): no
  more than one batch of images is in memory. The features of the first ``keep`` samples
  (default 10,000) are kept for KID and precision/recall, which need features, not statistics.
* Feature networks (:func:`load_feature_network`): ``"inception"``, the FID Inception-v3 from a
  safetensors file (:mod:`jaxdiff.metrics.inception`), or ``"digits"``, the shipped offline
  classifier of 8x8 digits (:mod:`jaxdiff.metrics.digits`).
* Reference (:func:`load_reference`): FID against the statistics of a ``.npz`` file
  (``python -m jaxdiff.metrics.stats``; checked to come from the same weights), or, without one,
  against the first ``max_images`` images of the run's dataset (epoch-0 order of seed 0). KID
  and precision/recall use those dataset images' features (a stats file holds none). The
  digits network's reference is its 360 held-out digits, with the floor of
  :func:`jaxdiff.metrics.digits.digits_fd`: the distance real digits of the other split reach
  with the same count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxdiff import data
from jaxdiff.metrics import digits, fid, inception
from jaxdiff.metrics.digits import check_digits_shape
from jaxdiff.metrics.stats import FEATURES, load_features
from jaxdiff.training import images as imgs
from jaxdiff.training.parallel import DataParallel
from jaxdiff.training.sampling import Sampling

__all__ = ["FEATURES", "FeatureNetwork", "Generated", "Reference", "evaluate_quality",
           "generated_features", "load_feature_network", "load_reference", "quality_metrics", "training_evaluator",
           "TrainingEvaluator"]

DIMS = {"inception": inception.FEATURE_DIM, "digits": digits.FEATURE_DIM}
FD_NAMES = {"inception": "fid", "digits": "digits_fd"}  # the result key of the Frechet distance


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
    """``fn``: float images ``[N, H, W, C]`` in [-1, 1] -> features ``[N, dim]``."""

    name: str  # "inception" or "digits"
    fn: Callable[[np.ndarray], np.ndarray]
    dim: int
    sha256: str  # of the weights file


def _digits_input(fn: Callable) -> Callable:
    """``fn`` of 8x8x1 images -> the same of ``[N, 8k, 8k, 1]`` images, average-pooled ``k x k`` first."""

    def pooled(images):
        images = np.asarray(images)
        k = check_digits_shape(images.shape[1:])
        if k > 1:
            n = images.shape[0]
            images = images.reshape(n, 8, k, 8, k, 1).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)
        return fn(images)

    return pooled


def load_feature_network(features: str, inception_path: str | None = None) -> FeatureNetwork:
    """The feature network ``features`` ("inception": needs ``inception_path``; "digits": the shipped weights,
    which also take ``8k x 8k x 1`` images, average-pooled to 8x8: :func:`check_digits_shape`).

    FileNotFoundError / ValueError naming the weights file when it is missing or is not the network.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    fn, sha = load_features(features, inception_path if features == "inception" else None)
    return FeatureNetwork(features, _digits_input(fn) if features == "digits" else fn, DIMS[features], sha)


@dataclasses.dataclass(frozen=True)
class Reference:
    """What samples are compared with: statistics for the FD, features for KID and precision/recall."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int  # images behind mu and sigma
    features: np.ndarray | None  # [M, D] real features, or None (no KID / precision / recall)
    description: str
    floor_features: np.ndarray | None = None  # digits only: the other split's features, for the floor


def _dataset_features(source: data.Source, network: FeatureNetwork, max_images: int, *, image_size=None,
                      batch_size: int = 250) -> np.ndarray:
    """Features ``[min(len(source), max_images), D]`` of the epoch-0 order of seed 0, read batch by batch."""
    count = min(len(source), max_images)
    out = []
    with data.batch_iterator(source, 0, math.ceil(count / batch_size), global_batch_size=batch_size, seed=0,
                             image_size=image_size) as batches:
        for step, batch in batches:
            out.append(np.asarray(network.fn(batch["image"][: count - step * batch_size])))
    return np.concatenate(out)


def load_reference(network: FeatureNetwork, *, ref_stats: str | None = None, source: data.Source | None = None,
                   max_images: int = 10_000, image_size: int | None = None) -> Reference:
    """The reference of ``network``: see the module docstring.

    ``ref_stats``: a ``.npz`` of :func:`jaxdiff.metrics.fid.save_stats` made with the same weights
    (ValueError naming the file otherwise). ``source``: the dataset whose first ``max_images``
    images give KID / precision-recall features (and the statistics, without ``ref_stats``);
    ``max_images=0`` skips them. Ignored by the digits network without ``ref_stats``.
    """
    stats = None
    if ref_stats:
        stats = fid.load_stats(ref_stats, dim=network.dim)
        if stats.weights_sha256 is None:
            raise ValueError(f"stats file {ref_stats} records no weights hash (statistics of a network of one's own"
                             f"{f', {stats.network!r}' if stats.network else ''}), so it cannot be checked against "
                             f"the {network.name} network; make it with python -m jaxdiff.metrics.stats")
        if stats.weights_sha256 != network.sha256:
            raise ValueError(f"stats file {ref_stats} was computed with other {network.name} weights (sha256 "
                             f"{stats.weights_sha256[:12]}..., the network's is {network.sha256[:12]}...)")
    if network.name == "digits" and stats is None:
        split = digits.digits_split()
        held = network.fn(split["heldout_images"])
        mu, sigma = fid.feature_statistics(held)
        return Reference(mu, sigma, len(held), held, f"the {len(held)} held-out digits",
                         floor_features=network.fn(split["train_images"]))
    if max_images < 0:
        raise ValueError(f"max_images must be >= 0, got {max_images}")
    feats = None
    if source is not None and max_images > 0:
        feats = _dataset_features(source, network, max_images, image_size=image_size)
    if stats is not None:
        return Reference(stats.mu, stats.sigma, stats.count, feats, f"{ref_stats} ({stats.count} images)")
    if feats is None or len(feats) < 2:
        raise ValueError(f"features {network.name!r} need reference statistics (ref_stats) or dataset images")
    mu, sigma = fid.feature_statistics(feats)
    return Reference(mu, sigma, len(feats), feats, f"the first {len(feats)} images of {source.info.name}")


@dataclasses.dataclass(frozen=True)
class Generated:
    """Statistics of ``count`` generated samples and the features of the first ``len(features)``."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int
    features: np.ndarray  # [min(count, keep), D]


def generated_features(sampling: Sampling, params, network: FeatureNetwork, *, num_samples: int, seed: int,
                       batch_size: int = 250, keep: int = 10_000, devices: Sequence[jax.Device] | None = None,
                       progress: bool = True, autoencoder=None) -> Generated:
    """Generates ``num_samples`` images on ``devices`` (default: this process's) and streams their features.

    ``sampling``: the run's sampling function (``Run.sampling``); example ``i`` is
    ``sampling.per_example`` of ``fold_in(key(seed), i)`` with label ``grid_labels(...)[i]``.
    ``autoencoder``: a latent run's (``Run.autoencoder``, :class:`jaxdiff.latents.Autoencoder`), which
    decodes the samples into images in the same sharded call; ``None``: the samples are images.
    ``batch_size`` is rounded up to a multiple of the device count; the result does not depend
    on either (up to float rounding).
    """
    if num_samples < 2 or batch_size < 1 or keep < 0:
        raise ValueError(f"num_samples must be >= 2, batch_size >= 1 and keep >= 0; got {num_samples}, "
                         f"{batch_size}, {keep}")
    par = DataParallel("sharding", devices=jax.local_devices() if devices is None else devices)
    b = -(-min(batch_size, num_samples) // par.num_devices) * par.num_devices

    def draw(replicated, idx, y):
        out = sampling.per_example(replicated[0], replicated[1], idx, y)
        return out if autoencoder is None else autoencoder.decode(replicated[2], out)

    fn = par.compile_batched(draw)
    replicated = par.put_replicated((params, jax.random.key(seed), None if autoencoder is None else autoencoder.params))
    labels = imgs.grid_labels(num_samples, sampling.num_classes)
    acc, kept = fid.init_statistics(network.dim), []
    for start in tqdm(range(0, num_samples, b), desc=f"sample + {network.name} features", unit="batch",
                      disable=not progress):
        n = min(b, num_samples - start)
        idx = np.arange(start, start + b, dtype=np.int32)  # past num_samples: padding, dropped below
        out = np.asarray(fn(replicated, idx, labels[np.minimum(idx, num_samples - 1)]))[:n]
        if not np.all(np.isfinite(out)):
            raise FloatingPointError(f"samples {start}..{start + n - 1} hold non-finite values")
        feats = np.asarray(network.fn(data.from_uint8(imgs.to_uint8(out))))
        acc = fid.update_statistics(acc, feats)
        if acc.count - n < keep:
            kept.append(feats[: keep - (acc.count - n)])
    mu, sigma = fid.finalize_statistics(acc)
    return Generated(mu, sigma, acc.count, np.concatenate(kept) if kept else np.zeros((0, network.dim), np.float32))


def quality_metrics(generated: Generated, reference: Reference, network: FeatureNetwork, *,
                    kid_subsets: int = 100) -> dict:
    """``{fid | digits_fd, [floor], [kid, kid_std, precision, recall]}`` of ``generated`` against ``reference``.

    KID (subsets of up to 1,000) and precision/recall (k=3) need reference features and more
    than 3 kept features each; they are left out otherwise. The digits ``floor`` is the FD of
    ``min(count, 1437)`` real digits of the classifier's training split (``default_rng(0)``).
    """
    out = {FD_NAMES[network.name]: fid.frechet_distance_from_stats(generated.mu, generated.sigma, reference.mu,
                                                                   reference.sigma)}
    if reference.floor_features is not None:
        other = reference.floor_features
        m = min(generated.count, len(other))
        subset = other[np.random.default_rng(0).choice(len(other), m, replace=False)]
        out["floor"] = fid.frechet_distance_from_stats(*fid.feature_statistics(subset), reference.mu, reference.sigma)
    if reference.features is not None and min(len(reference.features), len(generated.features)) > 3:
        out["kid"], out["kid_std"] = fid.kernel_inception_distance(generated.features, reference.features,
                                                                   num_subsets=kid_subsets)
        out["precision"], out["recall"] = fid.precision_recall(reference.features, generated.features)
    return out


def _default_features(image_shape, dataset: str) -> str:
    """digits for 8x8x1 images and for the digits dataset at any size the digits network pools (a latent run on
    upsampled digits); inception otherwise."""
    if tuple(image_shape) == (8, 8, 1):
        return "digits"
    try:
        check_digits_shape(image_shape)
    except ValueError:
        return "inception"
    return "digits" if dataset == data.DIGITS else "inception"


def _check_files(inception_path: str | None, ref_stats: str | None) -> None:
    for what, path in (("Inception weights", inception_path), ("reference stats", ref_stats)):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"{what} file {path} does not exist")


def evaluate_quality(workdir: str, *, features: str | None = None, inception_path: str | None = None,
                     ref_stats: str | None = None, num_samples: int = 50_000, seeds: Sequence[int] = (0,),
                     sampler: str | None = None, num_steps: int | None = None, eta: float | None = None,
                     guidance_scale: float | None = None, batch_size: int = 250, keep: int = 10_000,
                     reference_images: int = 10_000, kid_subsets: int = 100, progress: bool = True) -> dict:
    """Sample quality of ``workdir``'s EMA model, one run of ``num_samples`` per seed.

    ``features``: "inception" or "digits" (default: digits for 8x8x1 images and the digits dataset at any
    ``8k x 8k x 1`` size, else inception).
    Every input (files, feature dimension, sampler options) is checked before any sample is
    drawn. Returns the settings, ``per_seed`` results (:func:`quality_metrics` plus ``seed``) and
    their ``min`` and ``mean`` over seeds.
    """
    from jaxdiff.training.workdir import load_workdir  # the workdir loader restores orbax checkpoints

    if not seeds:
        raise ValueError("seeds must name at least one seed")
    if num_samples < 4:
        raise ValueError(f"num_samples must be >= 4, got {num_samples}")
    if features is not None and features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}")
    _check_files(inception_path, ref_stats)
    wd = load_workdir(workdir)
    run = wd.run
    features = features or _default_features(run.output_shape, run.source.info.name)
    if features == "digits":
        try:
            check_digits_shape(run.output_shape)
        except ValueError as error:
            raise ValueError(f"features 'digits': {workdir}: {error}") from None
    sampling = run.sampling(sampler=sampler, num_steps=num_steps, eta=eta, guidance_scale=guidance_scale)
    network = load_feature_network(features, inception_path)
    reference = load_reference(network, ref_stats=ref_stats, source=run.image_source, max_images=reference_images,
                               image_size=run.image_size)
    per_seed = []
    for seed in seeds:
        gen = generated_features(sampling, wd.ema_params, network, num_samples=num_samples, seed=int(seed),
                                 batch_size=batch_size, keep=keep, progress=progress, autoencoder=run.autoencoder)
        per_seed.append({"seed": int(seed), **quality_metrics(gen, reference, network, kid_subsets=kid_subsets)})
    names = [k for k in per_seed[0] if k != "seed"]
    return {"features": features, "reference": reference.description, "num_samples": num_samples,
            "step": wd.step, **sampling.settings,
            "per_seed": per_seed, "min": {k: min(r[k] for r in per_seed) for k in names},
            "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in names}}


@dataclasses.dataclass(frozen=True)
class TrainingEvaluator:
    """The training job's sample-quality evaluation (``config.eval``), its network and reference loaded once."""

    every: int  # evaluate every this many steps (0: never)
    num_samples: int
    final_samples: int  # samples of the evaluation at the end of the run (0: none)
    evaluate: Callable[[object, int], dict]  # (ema_params, num_samples) -> {"eval/NAME": value}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def final(self, ema_params, step: int, workdir: str) -> dict:
        """Evaluates ``final_samples`` samples, prints the result, writes ``workdir/eval_final.json``."""
        metrics = self.evaluate(ema_params, self.final_samples)
        result = {"step": int(step), "num_samples": self.final_samples, **metrics}
        with open(os.path.join(workdir, "eval_final.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in metrics.items())
        tqdm.write(f"final sample quality ({self.final_samples} samples): {shown}")
        return metrics


def training_evaluator(config, run) -> TrainingEvaluator | None:
    """The evaluator of ``config.eval`` for ``run`` (:func:`jaxdiff.training.setup.resolve`), or None when
    ``eval.every`` and ``eval.final_samples`` are 0. Loads the feature network and its reference now
    (settings were checked by :func:`jaxdiff.training.setup.validate_config`). Samples with
    ``config.eval.sampler`` / ``steps`` (empty / 0: ``config.sample``'s) and seed ``config.seed``,
    so evaluations of successive steps share their noise."""
    ev = config.get("eval")
    if ev is None or (ev.every == 0 and ev.final_samples == 0):
        return None
    sampling = run.sampling(sampler=ev.sampler or None, num_steps=ev.steps or None, prefix="config.eval.")
    network = load_feature_network(ev.features, ev.inception or None)
    keep = min(max(ev.num_samples, ev.final_samples), 10_000)
    reference = load_reference(network, ref_stats=ev.ref_stats or None, source=run.image_source, max_images=keep,
                               image_size=run.image_size)
    autoencoder = run.autoencoder  # a latent run's samples are decoded (loaded once, here)

    def evaluate(ema_params, num_samples: int) -> dict:
        gen = generated_features(sampling, ema_params, network, num_samples=num_samples, seed=config.seed,
                                 batch_size=ev.batch_size, keep=keep, autoencoder=autoencoder)
        return {f"eval/{k}": v for k, v in quality_metrics(gen, reference, network, kid_subsets=10).items()}

    return TrainingEvaluator(ev.every, ev.num_samples, ev.final_samples, evaluate)

"""Sample-quality metrics on network features: FID, KID, precision/recall, and stats files.

Every function takes features ``[N, D]`` (NumPy or JAX arrays) from one feature network
(Inception pool3 for the published numbers, :mod:`jaxdiff.metrics.digits` offline):

* :func:`feature_statistics`: mean and unbiased covariance (``ddof=1``, as ``np.cov``) in
  float64, streamed over batches with Chan et al.'s pairwise update, so 50k features never
  sit in memory at once. Fewer features than dimensions (``N <= D``) give a rank-deficient
  covariance and a warning naming ``N`` and ``D``.
* :func:`frechet_distance` (Heusel et al. 2017): ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``,
  the quantity of pytorch-fid's ``calculate_frechet_distance``. ``tr (S1 S2)^1/2`` is computed
  as the sum of square roots of the eigenvalues of the symmetric ``S1^1/2 S2 S1^1/2`` (the
  same spectrum as ``S1 S2``) with ``numpy.linalg.eigh`` in float64: no ``scipy.linalg.sqrtm``,
  no imaginary parts, and singular covariances need no ``eps * I`` offset.
* :func:`kernel_inception_distance` (Binkowski et al. 2018): the unbiased MMD^2 with the
  kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over random subsets (as StyleGAN2-ADA and
  torch-fidelity compute it).
* :func:`precision_recall` (Kynkaanniemi et al. 2019): the fraction of one set inside the
  union of the other set's k-NN balls.
* :func:`save_stats` / :func:`load_stats`: reference statistics as ``.npz`` (no pickle).
* :func:`compute_fid`: the one function that takes images: FID of two uint8 image sets through the
  FID Inception (:mod:`jaxdiff.metrics.inception`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import tempfile
import warnings
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FeatureStats",
    "compute_fid",
    "StatsAccumulator",
    "feature_statistics",
    "finalize_statistics",
    "frechet_distance",
    "frechet_distance_from_stats",
    "init_statistics",
    "kernel_inception_distance",
    "load_stats",
    "precision_recall",
    "save_stats",
    "update_statistics",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_CHUNK = 8192  # rows of an in-memory array promoted to float64 at a time


def _as_features(name: str, features, *, min_rows: int = 2, dim: int | None = None) -> np.ndarray:
    """``features`` as a host array ``[N, D]``; ValueError naming ``name`` otherwise."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{name} must be features [N, D], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be real numbers, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got shape {x.shape}")
    if x.shape[1] < 1 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name} must have feature dimension {dim}, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds non-finite values")
    return x


# ------------------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class StatsAccumulator:
    """Running float64 moments of features seen so far (Chan, Golub & LeVeque 1979)."""

    count: int
    mean: np.ndarray  # [D] float64
    m2: np.ndarray  # [D, D] float64: sum of outer products of deviations from ``mean``


def init_statistics(dim: int) -> StatsAccumulator:
    """An empty accumulator for ``dim``-dimensional features."""
    if int(dim) < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return StatsAccumulator(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))


def update_statistics(acc: StatsAccumulator, features) -> StatsAccumulator:
    """``acc`` plus a batch ``features: [B, D]``: the pairwise (shifted) update, in float64.

    Each batch is centred on its own mean before its outer products are summed, and the
    batches are merged with ``M2 = M2_a + M2_b + delta delta^T n_a n_b / n``: no sum of raw
    squares, so no cancellation when the mean is large against the spread.
    """
    x = _as_features("features", features, min_rows=0, dim=acc.mean.shape[0]).astype(np.float64)
    n_b = x.shape[0]
    if n_b == 0:
        return acc
    mean_b = x.mean(axis=0)
    centred = x - mean_b
    m2_b = centred.T @ centred
    n = acc.count + n_b
    delta = mean_b - acc.mean
    mean = acc.mean + delta * (n_b / n)
    m2 = acc.m2 + m2_b + np.outer(delta, delta) * (acc.count * n_b / n)
    return StatsAccumulator(n, mean, m2)


def finalize_statistics(acc: StatsAccumulator) -> tuple[np.ndarray, np.ndarray]:
    """``(mu [D], sigma [D, D])``, float64; ``sigma`` unbiased (``ddof=1``).

    Warns (``UserWarning`` naming N and D) when ``N <= D``: the covariance is then singular, and
    every Frechet distance from it is far above the population's.
    """
    if acc.count < 2:
        raise ValueError(f"the covariance needs at least 2 features, got {acc.count}")
    dim = acc.mean.shape[0]
    if acc.count <= dim:
        warnings.warn(f"the covariance of N={acc.count} features in D={dim} dimensions is rank-deficient "
                      f"(rank <= N - 1 < D): a Frechet distance from it is mostly estimation error; use N > D "
                      f"samples (FID uses 50,000 for D = 2048)", stacklevel=2)
    m2 = (acc.m2 + acc.m2.T) / 2.0
    return acc.mean.copy(), m2 / (acc.count - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``features``.

    ``features``: one NumPy/JAX array ``[N, D]``, or an iterable of batches ``[B_i, D]``
    (consumed once, one batch in memory at a time). Equals ``np.mean(x, 0), np.cov(x, rowvar=False)``.
    """
    if isinstance(features, (np.ndarray, jax.Array)):
        x = _as_features("features", features)
        features = (x[i : i + _CHUNK] for i in range(0, len(x), _CHUNK))  # float64 copies of a chunk only
    if not isinstance(features, Iterable):
        raise TypeError(f"features must be an array [N, D] or an iterable of batches, got {type(features)}")
    acc = None
    for batch in features:
        if acc is None:
            acc = init_statistics(_as_features("features", batch, min_rows=0).shape[1])
        acc = update_statistics(acc, batch)
    if acc is None:
        raise ValueError("features is an empty iterable of batches")
    return finalize_statistics(acc)


# ------------------------------------------------------------------------ distances


def _check_stats(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
    out = []
    for name, mu, sigma in (("mu1/sigma1", mu1, sigma1), ("mu2/sigma2", mu2, sigma2)):
        mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(f"{name} must be [D] and [D, D], got {mu.shape} and {sigma.shape}")
        if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
            raise ValueError(f"{name} holds non-finite values")
        out += [mu, (sigma + sigma.T) / 2.0]
    if out[0].shape != out[2].shape:
        raise ValueError(f"mu1 and mu2 have different feature dimensions: {out[0].shape} vs {out[2].shape}")
    return tuple(out)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): ``mu: [D]``, ``sigma: [D, D]``.

    ``tr (S1 S2)^1/2 = sum_i sqrt(lambda_i(S1^1/2 S2 S1^1/2))``, float64 ``eigh`` throughout.
    """
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2.0)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def frechet_distance(features_a, features_b) -> float:
    """FID-style distance between feature sets ``[N_a, D]`` and ``[N_b, D]``."""
    a = _as_features("features_a", features_a)
    b = _as_features("features_b", features_b, dim=a.shape[1])
    return frechet_distance_from_stats(*feature_statistics(a), *feature_statistics(b))


def compute_fid(images_a, images_b, *, inception, batch_size: int | None = None) -> float:
    """FID of two image sets end to end: pytorch-fid's Inception pool3 features of each, then
    :func:`frechet_distance` (as :func:`jaxdiff.metrics.digits.digits_fd` is for the digits network).

    Args:
      images_a, images_b: uint8 ``[N, H, W, C]`` in ``[0, 255]`` (``C`` in {1, 3}; any size, resized
        to 299x299 as pytorch-fid does), ``N >= 2`` each; samples in ``[-1, 1]`` go through
        :func:`~jaxdiff.data.to_uint8` first. Checked before the network is loaded.
      inception: the FID Inception weights: a safetensors file made by
        ``python -m jaxdiff.metrics.convert_inception`` (read by
        :func:`~jaxdiff.metrics.inception.load_inception`; nothing is downloaded), or an
        :class:`~jaxdiff.metrics.inception.InceptionFeatures` already loaded.
      batch_size: images per network call when ``inception`` is a path (default 50; the
        features do not depend on it beyond float rounding).
    Returns: the FID, a float.
    """
    from jaxdiff.metrics import inception as inc  # the network, only for the images

    for name, images in (("images_a", images_a), ("images_b", images_b)):
        arr = np.asarray(images)
        if arr.dtype != np.uint8:
            raise ValueError(f"{name} must be uint8 [N, H, W, C] in [0, 255], the FID Inception's input (as "
                             f"pytorch-fid reads image files), got dtype {arr.dtype}: jaxdiff.to_uint8 converts "
                             f"samples in [-1, 1]")
        if inc.check_images(arr, name).shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 images (a covariance), got shape {arr.shape}")
    if isinstance(inception, inc.InceptionFeatures):
        if batch_size is not None:
            raise ValueError("batch_size applies to a weights path; the InceptionFeatures given has its own")
        network = inception
    else:
        network = inc.load_inception(inception, batch_size=50 if batch_size is None else batch_size)
    return frechet_distance(network(images_a), network(images_b))


@jax.jit
def _grams(x: jax.Array, y: jax.Array) -> jax.Array:
    """``[3, m, m]``: ``x x^T, y y^T, x y^T`` (float32, full-precision matmuls)."""
    return jnp.stack([jnp.matmul(x, x.T, precision=_HIGHEST), jnp.matmul(y, y.T, precision=_HIGHEST),
                      jnp.matmul(x, y.T, precision=_HIGHEST)])


def kernel_inception_distance(features_a, features_b, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 with ``k(x, y) = (x.y / D + 1)^3``: ``(mean, std)`` over random subsets.

    Subset ``s`` draws ``m = min(N_a, N_b, subset_size)`` rows of each set without replacement
    (``rng = np.random.default_rng(seed)``; per subset ``rng.choice(N_a, m)`` then
    ``rng.choice(N_b, m)``) and estimates
    ``sum_{i != j} k(a_i, a_j) / (m (m - 1)) + sum_{i != j} k(b_i, b_j) / (m (m - 1))
    - 2 sum_{i, j} k(a_i, b_j) / m^2``. The dot products run on the accelerator (float32,
    full precision), the kernel and its sums in float64. ``std`` is the population std.
    """
    a = _as_features("features_a", features_a)
    b = _as_features("features_b", features_b, dim=a.shape[1])
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m, d = min(len(a), len(b), subset_size), a.shape[1]
    rng = np.random.default_rng(seed)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    values = np.empty(num_subsets, np.float64)
    for s in range(num_subsets):
        ia, ib = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        kernel = (np.asarray(_grams(a32[ia], b32[ib]), np.float64) / d + 1.0) ** 3
        kaa, kbb, kab = kernel
        within = (kaa.sum() - np.trace(kaa) + kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        values[s] = within - 2.0 * kab.sum() / (m * m)
    return float(values.mean()), float(values.std())


@jax.jit
def _sq_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """``[B, M]`` squared Euclidean distances, clipped at 0 (inputs centred by the caller)."""
    xx = jnp.sum(x * x, axis=1, keepdims=True)
    yy = jnp.sum(y * y, axis=1)[None, :]
    return jnp.maximum(xx + yy - 2.0 * jnp.matmul(x, y.T, precision=_HIGHEST), 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_radius_sq(rows: jax.Array, manifold: jax.Array, k: int) -> jax.Array:
    """``[B]``: squared distance from each row to its k-th nearest other point of ``manifold``."""
    neg, _ = jax.lax.top_k(-_sq_distances(rows, manifold), k + 1)  # the row itself is the first
    return -neg[:, -1]


@jax.jit
def _covered(probes: jax.Array, manifold: jax.Array, radii_sq: jax.Array) -> jax.Array:
    """``[B]``: whether each probe lies in some ball ``|p - m_j| <= r_j``."""
    return jnp.any(_sq_distances(probes, manifold) <= radii_sq[None, :], axis=1)


def _batched(fn, rows: jax.Array, batch_size: int, *args) -> np.ndarray:
    """``fn(rows[i:i+b], *args)`` over row batches of one padded shape (one compilation)."""
    n = rows.shape[0]
    b = min(batch_size, n)
    padded = jnp.pad(rows, ((0, -n % b), (0, 0)))
    return np.concatenate([np.asarray(fn(padded[i : i + b], *args)) for i in range(0, n, b)])[:n]


def precision_recall(real_features, fake_features, *, k: int = 3, batch_size: int = 1000) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): ``(precision, recall)``.

    Each point of a set owns a ball whose radius is the distance to its ``k``-th nearest
    neighbour in that set (itself excluded). Precision is the fraction of fake points inside
    some real ball, recall the fraction of real points inside some fake ball (a point on a
    ball's boundary counts as inside). Distances are computed in float32 on features centred
    on the real mean, ``batch_size`` rows against a whole set at a time: memory
    ``batch_size * max(N_real, N_fake)``, never ``N^2``.
    """
    real = _as_features("real_features", real_features)
    fake = _as_features("fake_features", fake_features, dim=real.shape[1])
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for name, x in (("real_features", real), ("fake_features", fake)):
        if len(x) <= k:
            raise ValueError(f"{name} needs more than k={k} rows, got {len(x)}")
    centre = real.astype(np.float64).mean(axis=0)
    real32 = jnp.asarray(real - centre, jnp.float32)
    fake32 = jnp.asarray(fake - centre, jnp.float32)
    results = []
    for manifold, probes in ((real32, fake32), (fake32, real32)):
        radii_sq = jnp.asarray(_batched(functools.partial(_kth_radius_sq, k=k), manifold, batch_size, manifold))
        results.append(float(np.mean(_batched(_covered, probes, batch_size, manifold, radii_sq))))
    return results[0], results[1]


# ------------------------------------------------------------------------ stats files


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Reference statistics of a dataset through one feature network."""

    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int  # number of images
    weights_sha256: str | None  # SHA-256 of the feature network's weights file; None: not recorded
    network: str | None = None  # a free-form name of the feature network, if one was given


_STATS_KEYS = ("mu", "sigma", "count", "weights_sha256")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def save_stats(path: str | os.PathLike, mu, sigma, *, count: int, weights_sha256: str | None = None,
               overwrite: bool = False, network: str | None = None) -> None:
    """Writes ``mu [D]``, ``sigma [D, D]`` (float64), ``count`` and the network's identity to ``path`` (.npz).

    ``weights_sha256``: the lowercase hex SHA-256 of the feature network's weights file
    (:func:`jaxdiff.metrics.stats.file_sha256`). jaxdiff's own networks (FID Inception, digits)
    compare it with their weights before using the file (:mod:`jaxdiff.training.quality`), so
    ``python -m jaxdiff.metrics.stats`` always records it. For features of a network of one's
    own, give ``None`` (nothing is recorded and nothing can be checked) and, optionally,
    ``network``: a free-form name (``"my-resnet-v2"``) stored beside the statistics and returned
    by :func:`load_stats`.

    Raises ValueError for shapes other than ``[D]`` / ``[D, D]``, ``count < 2``, a
    ``weights_sha256`` that is not 64 lowercase hex digits or a ``network`` that is not a string;
    FileExistsError if ``path`` exists and not ``overwrite``. The file appears whole (written
    beside it, then renamed).
    """
    path = os.fspath(path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu and sigma must be [D] and [D, D], got {mu.shape} and {sigma.shape}")
    if int(count) != count or count < 2:
        raise ValueError(f"count must be an integer >= 2, got {count!r}")
    if weights_sha256 is not None and (not isinstance(weights_sha256, str) or not _SHA256.fullmatch(weights_sha256)):
        raise ValueError(f"weights_sha256 must be 64 lowercase hex digits (the weights file's SHA-256) or None "
                         f"(features of a network of one's own: name it with network=...), got {weights_sha256!r}")
    if network is not None and not isinstance(network, str):
        raise ValueError(f"network must be a string (a free-form name of the feature network) or None, "
                         f"got {network!r}")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"stats file {path} exists; pass overwrite=True to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(suffix=".npz.tmp", dir=directory)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        with os.fdopen(fd, "wb") as f:
            names = {} if network is None else {"network": np.array(network)}
            np.savez(f, mu=mu, sigma=sigma, count=np.int64(count), weights_sha256=np.array(weights_sha256 or ""),
                     **names)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_stats(path: str | os.PathLike, *, dim: int | None = None) -> FeatureStats:
    """Reads a file written by :func:`save_stats` (``allow_pickle=False``).

    ``weights_sha256`` and ``network`` are ``None`` where the file records none. Raises
    FileNotFoundError for a missing file and ValueError naming the file for a missing key or,
    when ``dim`` is given, a feature dimension other than ``dim``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stats file {path} does not exist")
    with np.load(path, allow_pickle=False) as f:
        missing = [key for key in _STATS_KEYS if key not in f.files]
        if missing:
            raise ValueError(f"stats file {path} lacks {missing} (holds {sorted(f.files)})")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        count, sha = int(f["count"]), str(f["weights_sha256"]) or None
        network = str(f["network"]) if "network" in f.files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"stats file {path}: mu and sigma must be [D] and [D, D], got {mu.shape} and {sigma.shape}")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"stats file {path} has feature dimension {mu.shape[0]}, expected dim={dim}")
    return FeatureStats(mu, sigma, count, sha, network)

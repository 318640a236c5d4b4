"""Tests for jaxdiff.metrics.fid against float64 NumPy/SciPy transcriptions of the papers' formulas.

* FID: pytorch-fid's ``calculate_frechet_distance`` (Heusel et al. 2017), transcribed with
  ``scipy.linalg.sqrtm``, its ``eps * I`` fallback and its imaginary-part check.
* KID: the unbiased MMD^2 of Binkowski et al. 2018, cubic polynomial kernel, explicit loops.
* Precision/recall: Kynkaanniemi et al. 2019 with a full distance matrix and ``np.partition``.
"""

import itertools
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxdiff.metrics import fid

# ------------------------------------------------------------------------ references


def reference_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, in float64."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # pytorch-fid silences it with disp=False (deprecated in SciPy 1.17)
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def stats(x):
    return np.mean(x, axis=0), np.cov(x, rowvar=False)


def reference_mmd2(x, y):
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, pair by pair over i != j."""
    m, d = x.shape
    k = lambda a, b: (a @ b / d + 1.0) ** 3
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def reference_precision_recall(real, fake, k):
    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    def coverage(manifold, probes):
        radii = np.partition(dist(manifold, manifold), k, axis=1)[:, k]  # index 0 is the point itself
        return np.mean((dist(probes, manifold) <= radii[None, :]).any(axis=1))

    return coverage(real, fake), coverage(fake, real)


def two_gaussians(seed=0, n1=300, n2=250, d=12):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n1, d)) @ rng.normal(size=(d, d)) * 0.5 + 1.0
    b = rng.normal(size=(n2, d)) @ rng.normal(size=(d, d)) * 0.4 - 0.3
    return a, b


# ------------------------------------------------------------------------ statistics


def test_streamed_statistics_equal_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 7)) * np.arange(1, 8) + 1e4  # a large mean: a naive sum of squares fails
    mu, sigma = fid.feature_statistics(x)
    np.testing.assert_allclose(mu, np.mean(x, 0), rtol=1e-13)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    cuts = [0, 1, 1, 130, 512, 999, 1000]  # uneven batches, an empty one, a single row
    pieces = [x[lo:hi].astype(np.float32 if i % 2 else np.float64) for i, (lo, hi) in enumerate(itertools.pairwise(cuts))]
    x32 = np.concatenate(pieces).astype(np.float64)  # what the batches hold
    batches = (jnp.asarray(p) if p.dtype == np.float32 else p for p in pieces)  # JAX and NumPy, consumed once
    mu_s, sigma_s = fid.feature_statistics(batches)
    assert mu_s.dtype == sigma_s.dtype == np.float64
    np.testing.assert_allclose(mu_s, np.mean(x32, 0), rtol=1e-13)
    np.testing.assert_allclose(sigma_s, np.cov(x32, rowvar=False), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------ FID


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_pytorch_fid_formula(seed):
    a, b = two_gaussians(seed)
    expected = reference_fid(*stats(a), *stats(b))
    assert expected > 1.0
    np.testing.assert_allclose(fid.frechet_distance(a, b), expected, rtol=1e-9)
    np.testing.assert_allclose(fid.frechet_distance_from_stats(*stats(a), *stats(b)), expected, rtol=1e-9)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)  # JAX arrays in, float64 inside
    expected32 = reference_fid(*stats(a32.astype(np.float64)), *stats(b32.astype(np.float64)))
    np.testing.assert_allclose(fid.frechet_distance(jnp.asarray(a32), jnp.asarray(b32)), expected32, rtol=1e-9)


@pytest.mark.filterwarnings("ignore:the covariance of N=.*rank-deficient")  # singular on purpose
def test_frechet_distance_with_singular_covariances_matches_pytorch_fid_formula():
    """Fewer samples than dimensions and dead ReLU units, as with Inception features of small sets."""
    rng = np.random.default_rng(12)
    mix = rng.normal(size=(48, 48)) / 7
    a = np.maximum(rng.normal(size=(40, 48)) @ mix, 0)
    b = np.maximum(rng.normal(size=(30, 48)) @ mix + 0.1, 0)
    a[:, :5] = b[:, :5] = 0
    np.testing.assert_allclose(fid.frechet_distance(a, b), reference_fid(*stats(a), *stats(b)), rtol=1e-6)


def test_frechet_distance_of_commuting_gaussians_is_analytic():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    np.testing.assert_allclose(fid.frechet_distance_from_stats(mu1, np.diag(v1), mu2, np.diag(v2)), expected,
                               rtol=1e-12)


@pytest.mark.filterwarnings("ignore:the covariance of N=.*rank-deficient")  # singular on purpose
@pytest.mark.parametrize("n, d", [(200, 10), (20, 64)])  # the second: singular covariance
def test_frechet_distance_of_a_set_with_itself_is_zero(n, d):
    x = np.random.default_rng(3).normal(size=(n, d)) * 3 + 5
    trace = np.trace(np.cov(x, rowvar=False))
    # The square root of the d - n + 1 zero eigenvalues turns round-off eps * trace into ~sqrt(eps * trace) each.
    tolerance = 1e-9 * trace if n > d else d * np.sqrt(1e-15 * trace)
    assert abs(fid.frechet_distance(x, x)) < tolerance
    assert abs(reference_fid(*stats(x), *stats(x))) < tolerance


def test_frechet_distance_of_two_halves_shrinks_with_n():
    """Two samples of one Gaussian: the FD is the estimator's bias, ~ d (d + 3) / (2 n) per unit variance."""
    rng = np.random.default_rng(4)
    d = 8
    mix = rng.normal(size=(d, d))
    fds = {}
    for n in (250, 4000):
        x = rng.normal(size=(2 * n, d)) @ mix
        fds[n] = fid.frechet_distance(x[:n], x[n:])
    scale = np.trace(mix.T @ mix)  # total variance
    assert 0 < fds[4000] < fds[250] / 4
    assert fds[250] < 0.2 * scale


# ------------------------------------------------------------------------ KID


def test_kid_on_whole_sets_matches_reference():
    a, b = two_gaussians(5, n1=40, n2=40, d=6)
    mean, std = fid.kernel_inception_distance(a, b, num_subsets=1, subset_size=1000)
    np.testing.assert_allclose(mean, reference_mmd2(a, b), rtol=1e-5)
    assert std == 0.0


def test_kid_subsets_match_reference():
    a, b = two_gaussians(6, n1=50, n2=35, d=6)
    mean, std = fid.kernel_inception_distance(a, b, num_subsets=4, subset_size=20, seed=7)
    rng = np.random.default_rng(7)
    values = []
    for _ in range(4):  # the documented draw: a's rows, then b's rows, per subset
        ia, ib = rng.choice(50, 20, replace=False), rng.choice(35, 20, replace=False)
        values.append(reference_mmd2(a[ia], b[ib]))
    np.testing.assert_allclose(mean, np.mean(values), rtol=1e-5)
    np.testing.assert_allclose(std, np.std(values), rtol=1e-4)


def test_kid_is_unbiased_near_zero_for_one_distribution():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(600, 16))
    same, same_std = fid.kernel_inception_distance(x[:300], x[300:], num_subsets=20, subset_size=200)
    shifted, _ = fid.kernel_inception_distance(x[:300], x[300:] + 0.5, num_subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * abs(same) and shifted > 0


# ------------------------------------------------------------------------ precision / recall


@pytest.mark.parametrize("k, batch_size", [(3, 32), (5, 1000)])
def test_precision_recall_match_reference(k, batch_size):
    rng = np.random.default_rng(9)
    real = rng.normal(size=(150, 10))
    fake = np.concatenate([rng.normal(size=(80, 10)) * 0.5, rng.normal(size=(40, 10)) + 4.0])
    expected = reference_precision_recall(real, fake, k)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    got = fid.precision_recall(jnp.asarray(real, jnp.float32), fake, k=k, batch_size=batch_size)
    np.testing.assert_allclose(got, expected, atol=1.5 / 150)  # at most one boundary point may flip in float32


def test_precision_recall_limits():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(60, 4))
    assert fid.precision_recall(x, x, k=3) == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


# ------------------------------------------------------------------------ bad inputs and files


@pytest.mark.parametrize("call, match", [
    (lambda x: fid.frechet_distance(x[0], x), "features_a"),
    (lambda x: fid.frechet_distance(x, x[:, :3]), "features_b"),
    (lambda x: fid.frechet_distance(x[:1], x), "features_a"),
    (lambda x: fid.frechet_distance(x, np.full_like(x, np.nan)), "features_b"),
    (lambda x: fid.frechet_distance_from_stats(x[0], np.eye(3), x[0], np.eye(5)), "mu1/sigma1"),
    (lambda x: fid.frechet_distance_from_stats(x[0], np.eye(5), x[0, :3], np.eye(3)), "mu1 and mu2"),
    (lambda x: fid.kernel_inception_distance(x, x, num_subsets=0), "num_subsets"),
    (lambda x: fid.kernel_inception_distance(x, x.astype(str)), "features_b"),
    (lambda x: fid.precision_recall(x[:3], x, k=3), "real_features"),
    (lambda x: fid.precision_recall(x, x, k=0), "k must"),
    (lambda x: fid.feature_statistics(iter([])), "empty"),
    (lambda x: fid.feature_statistics([x, x[:, :2]]), "dimension 5"),
])
def test_bad_inputs_name_the_argument(call, match):
    x = np.random.default_rng(0).normal(size=(10, 5))
    with pytest.raises(ValueError, match=match):
        call(x)


def test_stats_file_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(11)
    mu, sigma = stats(rng.normal(size=(50, 6)))
    sha = "ab" * 32
    path = tmp_path / "ref.npz"
    fid.save_stats(path, mu, sigma, count=50, weights_sha256=sha)
    loaded = fid.load_stats(path, dim=6)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, sigma)
    assert (loaded.count, loaded.weights_sha256) == (50, sha) and loaded.mu.dtype == np.float64
    with pytest.raises(FileExistsError, match="ref.npz"):
        fid.save_stats(path, mu, sigma, count=50, weights_sha256=sha)
    fid.save_stats(path, mu + 1, sigma, count=51, weights_sha256=sha, overwrite=True)
    assert fid.load_stats(path).count == 51
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="dim=2048"):
        fid.load_stats(path, dim=2048)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_stats(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="weights_sha256"):
        fid.save_stats(tmp_path / "b.npz", mu, sigma, count=50, weights_sha256="not-a-hash")
    with pytest.raises(ValueError, match="count"):
        fid.save_stats(tmp_path / "b.npz", mu, sigma, count=1, weights_sha256=sha)
    with pytest.raises(ValueError, match="network must be a string"):
        fid.save_stats(tmp_path / "b.npz", mu, sigma, count=50, network=3)
    assert loaded.network is None  # none given
    # Features of one's own network: no hash (None), optionally a free-form name.
    fid.save_stats(tmp_path / "own.npz", mu, sigma, count=50, network="my-resnet-v2")
    own = fid.load_stats(tmp_path / "own.npz", dim=6)
    assert (own.count, own.weights_sha256, own.network) == (50, None, "my-resnet-v2")
    np.testing.assert_array_equal(own.mu, mu)
    fid.save_stats(tmp_path / "anonymous.npz", mu, sigma, count=50)
    anonymous = fid.load_stats(tmp_path / "anonymous.npz")
    assert (anonymous.weights_sha256, anonymous.network) == (None, None)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's layout: no provenance
    with pytest.raises(ValueError, match=r"pytorch_fid.npz lacks \['count', 'weights_sha256'\]"):
        fid.load_stats(tmp_path / "pytorch_fid.npz")
    np.savez(tmp_path / "pickled.npz", mu=mu, sigma=sigma, count=50, weights_sha256=np.array([sha], object))
    with pytest.raises(ValueError, match="allow_pickle"):
        fid.load_stats(tmp_path / "pickled.npz")

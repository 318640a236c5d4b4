"""An exact "model" for checking samplers: a Gaussian mixture whose noised marginals are analytic.

If ``x0 ~ sum_k w_k N(mu_k, S_k)`` then ``x_t = a x0 + s eps`` (``a = sqrt(abar_t)``,
``s = sqrt(1 - abar_t)``) is again a mixture, ``sum_k w_k N(a mu_k, a^2 S_k + s^2 I)``, so the
score ``grad log p_t`` and the optimal ``eps = -s * score`` are known in closed form at every
(integer or fractional) ``t``. Samplers driven by this oracle must reproduce the mixture.

Shapes: data points are vectors ``[B, D]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion as d
from jaxdiff.schedules import Schedule

__all__ = ["GaussianMixture", "default_mixture"]


@flax.struct.dataclass
class GaussianMixture:
    """``sum_k weights[k] N(means[k], covs[k])``."""

    weights: jax.Array  # [K]
    means: jax.Array  # [K, D]
    covs: jax.Array  # [K, D, D]
    labels: jax.Array  # [K] int class of each component (for conditional oracles)

    @classmethod
    def create(cls, weights, means, covs, labels: Sequence[int] | None = None) -> GaussianMixture:
        weights = np.asarray(weights, np.float64)
        means = np.asarray(means, np.float64)
        covs = np.asarray(covs, np.float64)
        k, dim = means.shape
        if weights.shape != (k,) or covs.shape != (k, dim, dim):
            raise ValueError(f"weights {weights.shape}, means {means.shape}, covs {covs.shape} do not agree")
        if not np.isclose(weights.sum(), 1.0) or np.any(weights <= 0):
            raise ValueError(f"weights must be positive and sum to 1, got {weights}")
        labels = np.arange(k) if labels is None else np.asarray(labels)
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(f32(weights), f32(means), f32(covs), jnp.asarray(labels, jnp.int32))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, key, n: int, label=None) -> jax.Array:
        """``[n, D]`` exact samples (from the components of class ``label`` if given)."""
        k_c, k_z = jax.random.split(key)
        logits = jnp.log(self._class_weights(label))
        comp = jax.random.categorical(k_c, logits, shape=(n,))
        chol = jnp.linalg.cholesky(self.covs)[comp]
        z = jax.random.normal(k_z, (n, self.dim))
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol, z)

    def _class_weights(self, label):
        if label is None:
            return self.weights
        w = jnp.where(self.labels == label, self.weights, 0.0)
        return w / jnp.sum(w)

    def _noised_logpdf_terms(self, x, a, s, label=None):
        """Per-component ``log w_k + log N(x; a mu_k, a^2 S_k + s^2 I)`` and ``C_k^{-1}(x - a mu_k)``.

        x: ``[B, D]``; a, s: ``[B]``. Returns ``[B, K]`` and ``[B, K, D]``.
        """
        eye = jnp.eye(self.dim)[None, None]  # explicit rank: [1, 1, D, D]
        cov = a[:, None, None, None] ** 2 * self.covs[None] + s[:, None, None, None] ** 2 * eye  # [B,K,D,D]
        diff = x[:, None, :] - a[:, None, None] * self.means[None]  # [B,K,D]
        sol = jnp.linalg.solve(cov, diff[..., None])[..., 0]
        _, logdet = jnp.linalg.slogdet(cov)
        logw = jnp.log(jnp.maximum(self._class_weights(label), 1e-30))
        logpdf = logw[None] - 0.5 * (jnp.sum(diff * sol, -1) + logdet + self.dim * jnp.log(2 * jnp.pi))
        return logpdf, sol

    def log_prob(self, x, label=None) -> jax.Array:
        """``log p(x)`` of the clean mixture, ``[B]``."""
        one = jnp.ones(x.shape[:1])
        logpdf, _ = self._noised_logpdf_terms(x, one, 0.0 * one, label)
        return jax.nn.logsumexp(logpdf, axis=-1)

    def score(self, x, a, s, label=None) -> jax.Array:
        """``grad_x log p_t(x)`` of the VP-noised mixture at ``(a, s)`` ``[B]``: ``[B, D]``."""
        logpdf, sol = self._noised_logpdf_terms(x, a, s, label)
        resp = jax.nn.softmax(logpdf, axis=-1)
        return -jnp.einsum("bk,bkd->bd", resp, sol)

    def model_fn(self, schedule: Schedule, prediction: str = "epsilon"):
        """The exact network ``f(x_t [B, D], t [B]) -> [B, D]`` of the given parameterization.

        ``t`` may be int or float (fractional timesteps interpolate the log-SNR); ``x_t`` is in
        the schedule's coordinates (VE too).
        """
        return self.conditional_model_fn(schedule, prediction, labels=None)

    def conditional_model_fn(self, schedule: Schedule, prediction: str = "epsilon", labels=None, null_label=None):
        """Like :meth:`model_fn` for ``f(x_t, t, y)``: the components of class ``y[b]``.

        ``y == null_label`` is the unconditional model.
        """
        d.check_prediction(prediction)

        def eps_of(x_t, t, y):
            a, s = d.alpha_sigma(schedule, t)
            x = d.to_vp(schedule, x_t, t)
            if y is None:
                sc = self.score(x, a, s)
            else:
                def one(xi, ai, si, yi):
                    cond = self.score(xi[None], ai[None], si[None], yi)[0]
                    if null_label is None:
                        return cond
                    unc = self.score(xi[None], ai[None], si[None])[0]
                    return jnp.where(yi == null_label, unc, cond)
                sc = jax.vmap(one)(x, a, s, y)
            return -s[:, None] * sc

        def fn(x_t, t, y=None):
            t = jnp.asarray(t)
            eps = eps_of(x_t, t, labels if y is None else y)
            if prediction == "epsilon":
                return eps
            x0 = d.x0_from_eps(schedule, x_t, t, eps)
            if prediction == "x0":
                return x0
            if prediction == "v":
                return d.v_from_x0_eps(schedule, t, x0, eps)
            return d.score_from_eps(schedule, t, eps)

        return fn


def default_mixture(dim: int = 2) -> GaussianMixture:
    """A fixed, well-separated 3-component mixture in ``dim`` dimensions (used by tests and benchmarks)."""
    rng = np.random.default_rng(0)
    means = np.zeros((3, dim))
    means[0, 0], means[1, 0] = 2.0, -2.0
    if dim >= 2:
        means[2, 1] = 2.0
    else:
        means[2, 0] = 0.5
    covs = []
    for _ in range(3):
        m = rng.normal(size=(dim, dim)) * 0.15
        covs.append(m @ m.T + 0.1 * np.eye(dim))
    return GaussianMixture.create([0.5, 0.3, 0.2], means, covs)

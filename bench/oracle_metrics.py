"""Distances between samples and the Gaussian-mixture oracle (``jaxdiff.oracle``), shared by
``bench/oracle_table.py`` and ``bench/quality.py``.

* :func:`mmd2`: unbiased squared MMD (Gaussian kernel) against the *exact* mixture, whose
  kernel mean embedding is analytic: 0 in expectation for exact samples.
* :func:`sliced_w2`: the sliced 2-Wasserstein distance between two equal-size point sets.

And the budget rule both tables use: :func:`steps_for_budget`, the most steps of a sampler whose
network calls (``jaxdiff.samplers.nfe``, from the registry) fit a budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["mmd2", "sliced_w2", "steps_for_budget"]


def mmd2(x, mix, ell: float = 0.5, block: int = 1000) -> float:
    """Unbiased MMD^2 between samples ``x [n, D]`` and the mixture ``mix`` (Gaussian kernel of
    bandwidth ``ell``); the mixture terms exact, the sample term summed blockwise in float32."""
    n, dim = x.shape
    l2 = ell**2
    eye = jnp.eye(dim)

    def embed(diff, s):  # E k for a Gaussian difference of covariance s - ell^2 I
        quad = jnp.einsum("...i,ij,...j->...", diff, jnp.linalg.inv(s), diff)
        return ell**dim / jnp.sqrt(jnp.linalg.det(s)) * jnp.exp(-0.5 * quad)

    @jax.jit
    def pair_sum(xb, x):
        d2 = jnp.sum((xb[:, None, :] - x[None]) ** 2, -1)
        return jnp.sum(jnp.exp(-d2 / (2.0 * l2)))

    xx = sum(float(pair_sum(x[i:i + block], x)) for i in range(0, n, block)) - n  # drop the diagonal
    k = mix.weights.shape[0]
    xp = float(jnp.mean(sum(mix.weights[c] * embed(x - mix.means[c], l2 * eye + mix.covs[c]) for c in range(k))))
    pp = float(sum(mix.weights[a] * mix.weights[b]
                   * embed(mix.means[a] - mix.means[b], l2 * eye + mix.covs[a] + mix.covs[b])
                   for a in range(k) for b in range(k)))
    return xx / (n * (n - 1)) - 2.0 * xp + pp


def sliced_w2(x, y, dirs) -> float:
    """Sliced 2-Wasserstein distance between equal-size point sets ``x, y [n, D]`` over the
    directions ``dirs [L, D]`` (normalised here; e.g. Gaussian draws), in float64."""
    x, y, dirs = (np.asarray(v, np.float64) for v in (x, y, dirs))
    if x.shape != y.shape:
        raise ValueError(f"sliced_w2: x and y must have the same shape, got {x.shape} and {y.shape}")
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    px, py = np.sort(x @ dirs.T, axis=0), np.sort(y @ dirs.T, axis=0)
    return float(np.sqrt(np.mean((px - py) ** 2)))


def steps_for_budget(sampler: str, budget: int, options: dict | None = None) -> tuple[int, int] | None:
    """``(num_steps, nfe)``: the most steps of the fixed-step ``sampler`` (with ``options``) whose
    NFE is at most ``budget`` (e.g. ``heun``: ``(budget + 1) // 2`` steps); ``None`` if none fits."""
    from jaxdiff import samplers

    for n in range(budget, 0, -1):
        calls = int(samplers.nfe(sampler, n, **(options or {})))
        if calls <= budget:
            return n, calls
    return None


def budget_table(rows: list[dict], labels, budgets, fmt) -> list[list[str]]:
    """Table rows (exact samples first, then one per label) of ``fmt(row)`` per NFE budget.

    ``rows[0]`` is the exact samples' row; a cell notes the actual NFE where it differs from the budget.
    """
    table = [["exact samples"] + [fmt(rows[0])] * len(budgets)]
    for label in labels:
        cells = [label]
        for budget in budgets:
            r = next(r for r in rows if r["sampler"] == label and r["budget"] == budget)
            cells.append(fmt(r) + (f" ({r['nfe']})" if r["nfe"] != budget else ""))
        table.append(cells)
    return table

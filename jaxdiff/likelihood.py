"""Likelihoods: exact NLL through the probability-flow ODE, and the variational bound over a dataset.

**PF-ODE likelihood** (Song et al. 2021, sec. D.2; FFJORD's instantaneous change of variables).
The ODE of :mod:`jaxdiff.samplers.ode` in log-SNR time, ``dx/dlambda = f(lambda, x)`` on VP
coordinates, is integrated from the data end ``lambda_0 = log_snr[0]`` to the prior end
``lambda_1 = log_snr[T-1]`` together with ``delta' = div f``. Along a trajectory
``d log p_lambda(x(lambda))/dlambda = -div f``, so

    log p_0(x(lambda_0)) = log N(x(lambda_1); 0, I) + delta(lambda_1),
    delta(lambda_1) = int_{lambda_0}^{lambda_1} div f dlambda.

The divergence is exact (``trace="exact"``: one forward-mode derivative per dimension, for
small ``D``) or Hutchinson's estimate ``z^T (df/dx) z`` with one probe ``z`` (Rademacher or
Gaussian) drawn from ``key`` and held fixed over the whole integration.

Which density: the ODE starts at ``t = 0``, where ``x_vp = alpha_0 x``; the density returned
is that of ``x = x_vp / alpha_0``, i.e. ``log p(x) = log p_vp(alpha_0 x) + D log alpha_0`` -- the
model's density of the data blurred by ``sigma_0 = schedule.sigmas[0]`` (0.01 for the linear
schedule), the smallest noise level the discrete model knows.

**Bits per dimension of 8-bit data.** Pixels ``k in {0..255}`` are mapped to ``x = k/127.5 - 1``
(as :mod:`jaxdiff.data` does), so neighbouring levels are ``w = 2/255 = 1/127.5`` apart. With
uniform dequantization ``x~ = x + w u``, ``u ~ U[0, 1)^D``, the bins ``[x, x + w)`` are disjoint,
so ``P(k) = int_bin p(x~) dx~`` is a distribution on the pixel values and by Jensen

    -log P(k) <= E_u[-log p(x + w u)] - D log w = E_u[nll(x~)] + D log 127.5,

so ``bpd = (E[nll(x~)] / D + log 127.5) / log 2`` is an upper bound on the discrete model's
bits/dim (estimated with ``num_dequant`` draws of ``u``). Data scaled differently (e.g.
``(k + u)/256`` to ``[0, 1]``) has a different constant: ``log(1/w)`` for its bin width ``w``.

**Variational bound** over a dataset: :func:`variational_bound_bpd` runs
:func:`jaxdiff.losses.variational_bound` batch by batch (one compiled program per batch shape)
and averages the per-example bits/dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxdiff import checks, losses
from jaxdiff.samplers.ode import pf_ode_drift, solve_ode
from jaxdiff.schedules import Schedule

__all__ = ["TRACES", "PROBES", "ode_nll", "ode_bpd", "dequantize", "variational_bound_bpd"]

TRACES = ("hutchinson", "exact")
PROBES = ("rademacher", "gaussian")
LOG_LEVEL_SPACING = float(np.log(127.5))  # -log(2/255): bin width of x = k/127.5 - 1


def _divergence_fn(f: Callable, trace: str, probe: jax.Array | None):
    """``div(lam, x) -> (f(lam, x) [B, ...], div_x f [B])`` for a per-example ``f``."""

    def div(lam, x):
        g = lambda y: f(lam, y)
        if trace == "hutchinson":
            fx, jz = jax.jvp(g, (x,), (probe,))
            return fx, jnp.sum((probe * jz).reshape(x.shape[0], -1), axis=-1)
        dim = x[0].size
        basis = jnp.eye(dim, dtype=x.dtype).reshape((dim,) + x.shape[1:])

        def column(e):  # J e_j for every example at once (the Jacobian is block diagonal)
            return jax.jvp(g, (x,), (jnp.broadcast_to(e, x.shape),))[1].reshape(x.shape[0], dim)

        cols = jax.lax.map(column, basis)  # [D, B, D]: cols[j, b] = (J_b e_j)
        return g(x), jnp.einsum("jbj->b", cols)

    return div


def ode_nll(schedule: Schedule, model_fn: Callable, x, key=None, *, prediction: str = "epsilon",
            trace: str = "hutchinson", probe: str = "rademacher", rtol=1e-5, atol=1e-5, solver: str = "tsit5",
            max_steps: int = 4096) -> dict:
    """Negative log-likelihood (nats, per example) of ``x`` ``[B, ...]`` under the PF-ODE.

    ``model_fn(x_t, t [B] float) -> [B, ...]``. ``key`` draws the Hutchinson probe (not needed
    for ``trace="exact"``). ``rtol``/``atol`` may be traced.

    Returns ``{"nll": [B], "prior_logp": [B], "delta": [B], "nfe": int32}``. Each vector-field
    evaluation costs one network call plus one forward-mode derivative (``D`` of them exact); NFE
    counts vector-field evaluations (``1 + 6 * solver steps``).

    A concrete ``x`` must be finite (``ValueError``: a NaN would otherwise surface as the solver
    running out of steps); a traced non-finite ``x`` gives a non-finite ``nll``.
    """
    if trace not in TRACES:
        raise ValueError(f"trace must be one of {TRACES}, got {trace!r}")
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}")
    checks.check_finite(x, "x")
    x = jnp.asarray(x, jnp.float32)
    T = schedule.num_timesteps
    b, dim = x.shape[0], x[0].size
    z = None
    if trace == "hutchinson":
        if key is None:
            raise ValueError("trace='hutchinson' needs a key for the probe")
        checks.check_key(key)
        z = (jax.random.rademacher(key, x.shape, jnp.float32) if probe == "rademacher"
             else jax.random.normal(key, x.shape, jnp.float32))
    div = _divergence_fn(pf_ode_drift(schedule, model_fn, prediction), trace, z)

    def field(lam, state):
        xs, _ = state
        fx, dv = div(lam, xs)
        return fx, dv

    lam0, lam1 = schedule.log_snr[0], schedule.log_snr[T - 1]
    alpha0 = jnp.sqrt(jax.nn.sigmoid(lam0))
    state0 = (alpha0 * x, jnp.zeros((b,), jnp.float32))
    (x1, delta), steps = solve_ode(field, state0, lam0, lam1, rtol=rtol, atol=atol, solver=solver,
                                   max_steps=max_steps)
    flat = x1.reshape(b, -1)
    prior_logp = -0.5 * jnp.sum(flat**2, axis=-1) - 0.5 * dim * jnp.log(2.0 * jnp.pi)
    nll = -(prior_logp + delta) - dim * jnp.log(alpha0)
    return {"nll": nll, "prior_logp": prior_logp, "delta": delta, "nfe": 1 + 6 * steps}


def dequantize(x, key) -> jax.Array:
    """``x + (2/255) u``, ``u ~ U[0, 1)``: uniform dequantization of ``x = k/127.5 - 1``, ``k in {0..255}``."""
    return x + (2.0 / 255.0) * jax.random.uniform(key, jnp.shape(x), jnp.float32)


def ode_bpd(schedule: Schedule, model_fn: Callable, x, key, *, num_dequant: int = 1, **nll_kwargs) -> dict:
    """Bits/dim of 8-bit data ``x = k/127.5 - 1`` ``[B, ...]`` with uniform dequantization (module docstring).

    ``bpd = (mean_u nll(x + (2/255) u) / D + log 127.5) / log 2``, averaged over ``num_dequant``
    (static) dequantization draws, which are solved as one ODE batch of ``num_dequant * B``
    points; ``nll_kwargs`` go to :func:`ode_nll`.
    Returns ``{"bpd": [B], "nll": [B] (mean nats of the dequantized data), "nfe": int32}``.
    """
    if not isinstance(num_dequant, int) or num_dequant < 1:
        raise ValueError(f"num_dequant must be a positive int, got {num_dequant!r}")
    checks.check_finite(x, "x")
    checks.check_key(key)
    x = jnp.asarray(x, jnp.float32)
    b, dim = x.shape[0], x[0].size
    k_u, k_z = jax.random.split(key)
    x_rep = jnp.broadcast_to(x[None], (num_dequant,) + x.shape).reshape((num_dequant * b,) + x.shape[1:])
    out = ode_nll(schedule, model_fn, dequantize(x_rep, k_u), k_z, **nll_kwargs)
    nll = jnp.mean(out["nll"].reshape(num_dequant, b), axis=0)
    return {"bpd": (nll / dim + LOG_LEVEL_SPACING) / np.log(2.0), "nll": nll, "nfe": out["nfe"]}


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction", "variance", "clip_x0"))
def _bound_sums(schedule, model_fn, x0, key, *, prediction, variance, clip_x0):
    """Per-batch sums of the bound's total, prior and per-term bits/dim (compiled once per shape and model)."""
    out = losses.variational_bound(schedule, model_fn, x0, key, prediction=prediction, variance=variance,
                                   clip_x0=clip_x0)
    return jnp.sum(out["total_bpd"]), jnp.sum(out["prior_bpd"]), jnp.sum(out["terms_bpd"], axis=0)


def variational_bound_bpd(schedule: Schedule, model_fn: Callable, data, key, *, batch_size: int | None = None,
                          prediction: str = "epsilon", variance: str = "fixed_small", clip_x0: bool = False,
                          progress: bool = False) -> dict:
    """The variational bound in bits/dim averaged over a dataset.

    Args:
      data: an array ``[N, ...]`` in ``[-1, 1]`` (split into batches of ``batch_size``), or an
        iterable of such batches (e.g. a data loader's numpy batches).
      key: batch ``j`` uses ``fold_in(key, j)`` for its noise.
      model_fn: ``model_fn(x_t, t [B] int32) -> [B, ...]`` (``2C`` channels for ``learned_range``).
    Returns ``{"bpd", "prior_bpd": floats, "terms_bpd": [T] mean per term, "num_examples": int}``.
    Each batch costs ``T`` network calls (:func:`jaxdiff.losses.variational_bound`). ``progress``:
    a progress bar on stderr (``"bits/dim (bound)"``), one step per batch once it is computed.
    """
    checks.check_key(key)
    if hasattr(data, "shape"):
        n = data.shape[0]
        bs = n if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batches: Iterable = (data[i:i + bs] for i in range(0, n, bs))
        num_batches = -(-n // bs)
    else:
        batches, num_batches = data, (len(data) if hasattr(data, "__len__") else None)
    batches = tqdm(batches, desc="bits/dim (bound)", unit="batch", total=num_batches, disable=not progress)

    total = prior = terms = 0.0
    count = 0
    for j, batch in enumerate(batches):
        batch = jnp.asarray(batch, jnp.float32)
        t_sum, p_sum, term_sum = _bound_sums(schedule, model_fn, batch, jax.random.fold_in(key, j),
                                             prediction=prediction, variance=variance, clip_x0=clip_x0)
        total, prior, terms = total + t_sum, prior + p_sum, terms + term_sum
        if progress:  # the bar counts computed batches, not dispatched ones
            jax.block_until_ready(total)
        count += batch.shape[0]
    if count == 0:
        raise ValueError("data is empty")
    return {"bpd": float(total) / count, "prior_bpd": float(prior) / count, "terms_bpd": terms / count,
            "num_examples": count}

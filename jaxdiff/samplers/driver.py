"""One entry point for every sampler, and the registry of samplers (one explicit dict).

Every sampler is a whole reverse chain as one ``lax`` loop (one XLA program). The number of
steps, ``eta``, the ODE tolerances, and any guidance scale closed over by a model_fn wrapper
(:mod:`jaxdiff.guidance`) may be traced values: under ``jax.jit`` changing them does not
recompile (the loops are ``while_loop``s with a dynamic trip count and each grid is computed
inside the loop from ``(i, n)``). ``jax.vmap`` over ``key`` draws independent chains.

NFE (network evaluations, i.e. calls of ``model_fn``) for ``n = num_steps``:

===================  =====================  ============================================
sampler              NFE                    default ``n``
===================  =====================  ============================================
``ddpm``             ``n``                  ``T``
``ddim``             ``n``                  ``min(50, T)``
``dpm_solver++``     ``n`` (+1 if           20 (``order=2``, "2M"; ``dpm++2m`` is an alias)
                     ``denoise_final``)
``euler``            ``n``                  50
``heun``             ``2n - 1``             25 (the last step, onto sigma = 0, is Euler)
``euler_ancestral``  ``n``                  50
``pc``               ``n (M + 1)``          ``T`` (``M = num_corrector_steps``, default 1)
``ode``              adaptive, reported     (no ``num_steps``; ``rtol``/``atol``)
===================  =====================  ============================================

:func:`sample_with_info` returns ``(x, {"nfe": ...})``; :func:`nfe` gives the count of the
fixed-step samplers without running them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxdiff import diffusion as d
from jaxdiff.losses import VARIANCES
from jaxdiff.samplers import dpm_solver, karras, ode, pc
from jaxdiff.samplers.common import check_num_steps, prior_sample, run_loop, spaced_timesteps
from jaxdiff.samplers.ddim import ddim_step
from jaxdiff.samplers.ddpm import ddpm_step_between
from jaxdiff.schedules import Schedule

__all__ = ["Sampler", "SAMPLERS", "spaced_timesteps", "run_loop", "prior_sample", "sample",
           "sample_with_info", "nfe", "ddpm_loop", "ddim_loop"]


def _one_per_step(num_steps):
    return num_steps


def ddpm_loop(schedule: Schedule, model_fn: Callable, x_T, key, *, num_steps=None, variance: str = "fixed_small",
              prediction: str = "epsilon", clip_x0: bool = False):
    """Ancestral sampling on ``n`` evenly spaced timesteps (respaced when ``n < T``). ``(x0, nfe = n)``."""
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    T = schedule.num_timesteps
    num_steps = check_num_steps(T if num_steps is None else num_steps, upper=T)
    b = x_T.shape[0]

    def body(i, x):
        t, t_prev = spaced_timesteps(T, num_steps, i)
        tb, tpb = jnp.full((b,), t), jnp.full((b,), t_prev)
        z = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return ddpm_step_between(schedule, model_fn(x, tb), x, tb, tpb, z, prediction=prediction,
                                 variance=variance, clip_x0=clip_x0)

    return run_loop(body, x_T, num_steps), _one_per_step(num_steps)


def ddim_loop(schedule: Schedule, model_fn: Callable, x_T, key, *, num_steps=None, eta=0.0,
              prediction: str = "epsilon", clip_x0: bool = False):
    """DDIM(eta) on ``n`` evenly spaced timesteps; ``eta`` may be traced. ``(x0, nfe = n)``."""
    T = schedule.num_timesteps
    num_steps = check_num_steps(min(50, T) if num_steps is None else num_steps, upper=T)
    b = x_T.shape[0]

    def body(i, x):
        t, t_prev = spaced_timesteps(T, num_steps, i)
        tb, tpb = jnp.full((b,), t), jnp.full((b,), t_prev)
        return ddim_step(schedule, model_fn(x, tb), x, tb, tpb, jax.random.fold_in(key, i), eta=eta,
                         prediction=prediction, clip_x0=clip_x0)

    return run_loop(body, x_T, num_steps), _one_per_step(num_steps)


class Sampler(NamedTuple):
    """A registry entry.

    ``run(schedule, model_fn, x_T, key, *, num_steps, prediction, clip_x0, **options) -> (x0, nfe)``;
    ``nfe(num_steps, **options)`` for fixed-step samplers, ``None`` for adaptive ones.
    """

    run: Callable
    nfe: Callable | None


#: Every sampler by name, with its loop, its options and its NFE rule.
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm_loop, _one_per_step),
    "ddim": Sampler(ddim_loop, _one_per_step),
    "dpm_solver++": Sampler(dpm_solver.dpm_solver_pp, dpm_solver.dpm_solver_nfe),
    "dpm++2m": Sampler(functools.partial(dpm_solver.dpm_solver_pp, order=2), dpm_solver.dpm_solver_nfe),
    "euler": Sampler(karras.euler, karras.euler_nfe),
    "heun": Sampler(karras.heun, karras.heun_nfe),
    "euler_ancestral": Sampler(karras.euler_ancestral, karras.euler_nfe),
    "pc": Sampler(pc.predictor_corrector, pc.pc_nfe),
    "ode": Sampler(ode.probability_flow, None),
}

_COMMON = ("num_steps", "prediction", "clip_x0")


def _get(sampler: str) -> Sampler:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    return SAMPLERS[sampler]


def _options_of(fn: Callable) -> tuple[str, ...]:
    params = inspect.signature(fn).parameters
    return tuple(k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _COMMON)


def _check_options(sampler: str, fn: Callable, options: dict) -> None:
    allowed = _options_of(fn)
    bad = [k for k in options if k not in allowed]
    if bad:
        raise ValueError(f"sampler {sampler!r} does not take option(s) {bad}; it takes {list(allowed)}")


def nfe(sampler: str, num_steps, **options):
    """Network evaluations of a fixed-step sampler for ``num_steps`` (e.g. ``heun``: ``2n - 1``).

    ``options`` are those that change the count (``num_corrector_steps`` for ``pc``). For
    ``"ode"`` the count is only known after solving: use :func:`sample_with_info`.
    """
    spec = _get(sampler)
    if spec.nfe is None:
        raise ValueError(f"sampler {sampler!r} is adaptive: its NFE is returned by sample_with_info")
    known = {k: v for k, v in options.items() if k in inspect.signature(spec.nfe).parameters}
    return spec.nfe(num_steps, **known)


def sample_with_info(schedule: Schedule, model_fn: Callable, key, shape, *, sampler: str = "ddim",
                     num_steps=None, eta=None, prediction: str = "epsilon", variance: str | None = None,
                     clip_x0: bool = False, x_T=None, **options):
    """Like :func:`sample`, returning ``(samples, {"nfe": int32 scalar})``."""
    spec = _get(sampler)
    d.check_prediction(prediction)
    takes = _options_of(spec.run)
    # eta / variance are common arguments: forwarded to the samplers that take them. Elsewhere
    # they are ignored if they are their historical defaults (eta=0, "fixed_small") or traced
    # (value unknown, e.g. one jitted generate function serving every sampler); other values raise.
    for name, value, inert in (("eta", eta, 0.0), ("variance", variance, "fixed_small")):
        if value is None:
            continue
        if name in takes:
            options[name] = value
        elif isinstance(value, (int, float, str)) and value != inert:
            raise ValueError(f"sampler {sampler!r} does not take {name} (got {name}={value!r})")
    _check_options(sampler, spec.run, options)
    if num_steps is not None and "num_steps" not in inspect.signature(spec.run).parameters:
        raise ValueError(f"sampler {sampler!r} is adaptive and takes no num_steps (set rtol/atol)")
    k_init, k_steps = jax.random.split(key)
    x = prior_sample(schedule, k_init, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape} but shape is {tuple(shape)}")
    kwargs = dict(prediction=prediction, clip_x0=clip_x0, **options)
    if num_steps is not None:
        kwargs["num_steps"] = num_steps
    x, count = spec.run(schedule, model_fn, x, k_steps, **kwargs)
    return x, {"nfe": jnp.asarray(count, jnp.int32)}


def sample(schedule: Schedule, model_fn: Callable, key, shape, *, sampler: str = "ddim", num_steps=None,
           eta=None, prediction: str = "epsilon", variance: str | None = None, clip_x0: bool = False,
           x_T=None, **options) -> jax.Array:
    """Runs a reverse chain from the prior to data in one compiled loop.

    Args:
      model_fn: ``model_fn(x_t [B, ...], t [B]) -> [B, ...]`` of ``prediction`` (``2C`` channels
        for ``variance="learned_range"``, ddpm only). ``t`` is int32 for ddpm/ddim/pc and a
        fractional float32 timestep on the ``[0, T-1]`` scale for the continuous samplers.
        Wrap it with :mod:`jaxdiff.guidance` for guidance or inpainting.
      key: a PRNG key (``vmap`` over keys for independent chains).
      shape: static ``(B, ...)``.
      sampler: a key of :data:`SAMPLERS` (see the module docstring for NFE and defaults).
      num_steps: steps (may be traced); not for ``"ode"``.
      eta: DDIM's eta (``ddim``, default 0) or the ancestral noise scale (``euler_ancestral``,
        default 1); may be traced. Other samplers ignore ``eta=0`` and a traced ``eta`` and
        reject any other Python number.
      variance: ``ddpm``'s reverse variance (default ``"fixed_small"``) or ``pc``'s predictor
        variance (default ``"fixed_large"``); ignored elsewhere if ``"fixed_small"``.
      x_T: optional start ``[B, ...]`` (schedule coordinates at ``t = T-1``) instead of a prior draw.
      options: sampler-specific: ``order``/``spacing`` (dpm_solver++), ``rho`` (karras),
        ``snr``/``num_corrector_steps`` (pc), ``rtol``/``atol``/``solver``/``max_steps`` (ode).
    Returns: samples ``[B, ...]`` (float32; clip/quantize them for images).
    """
    return sample_with_info(schedule, model_fn, key, shape, sampler=sampler, num_steps=num_steps, eta=eta,
                            prediction=prediction, variance=variance, clip_x0=clip_x0, x_T=x_T, **options)[0]

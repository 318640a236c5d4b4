"""One entry point for every sampler: :func:`sample` and :func:`sample_with_info`.

Every sampler is a whole reverse chain as one ``lax`` loop (one XLA program). The number of
steps, ``eta``, the ODE tolerances, and any guidance scale closed over by a model_fn wrapper
(:mod:`jaxdiff.guidance`) may be traced values: under ``jax.jit`` changing them does not
recompile (the loops are ``while_loop``s with a dynamic trip count and each grid is computed
inside the loop from ``(i, n)``). ``jax.vmap`` over ``key`` draws independent chains.

What each sampler accepts (its options, default steps and NFE) is in
:mod:`jaxdiff.samplers.registry`; this module only draws the prior and forwards:
:func:`sample_denoiser` for any :class:`~jaxdiff.denoiser.Denoiser` (what the training job
calls), :func:`sample` / :func:`sample_with_info` for a network on a discrete schedule.

**Dtypes.** A chain runs in float32 whatever the model returns: every sampler casts each step's
result to the loop carry's dtype, float32 (:func:`jaxdiff.samplers.common.run_loop`, the one loop
helper; the ODE's vector field likewise), and the samples come back float32. So a model that
computes in float64 (under ``jax_enable_x64``) or bfloat16 samples as its float32 version does,
up to the rounding of its output.

**Checked first.** ``shape`` must be a tuple ``(B, ...)`` of positive ints with the batch axis
first (``(64, 2)`` for 64 points of 2-D data, never ``(64,)``), ``model_fn`` callable
(``TypeError``), and the model's output must have the shape of its input (``2C`` channels for
``variance="learned_range"``): checked on its first call, at trace time, with a ``ValueError``
naming ``model_fn`` (``denoiser.fn`` for :func:`sample_denoiser`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff import diffusion as d
from jaxdiff.denoiser import Denoiser, eps_denoiser, mean_channels
from jaxdiff.samplers import registry
from jaxdiff.samplers.common import prior_sample
from jaxdiff.schedules import Schedule

__all__ = ["sample", "sample_with_info", "sample_denoiser"]


def sample_with_info(schedule: Schedule, model_fn: Callable, key, shape, *, sampler: str = "ddim",
                     num_steps=None, prediction: str = "epsilon", clip_x0: bool = False, x_T=None,
                     **options):
    """Like :func:`sample`, returning ``(samples, {"nfe": int32 scalar})``."""
    spec = registry.check(sampler, num_steps=num_steps, num_timesteps=schedule.num_timesteps, options=options)
    d.check_prediction(prediction)
    checks.check_key(key)
    shape = checks.check_shape(shape)
    model_fn = checks.shape_checked(checks.check_callable(model_fn, "model_fn"), "model_fn",
                                    channels=2 if options.get("variance") == "learned_range" else 1)
    k_init, k_steps = jax.random.split(key)
    x = prior_sample(schedule, k_init, shape) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if x.shape != tuple(shape):
        raise ValueError(f"x_T has shape {x.shape} but shape is {tuple(shape)}")
    n = None if spec.adaptive else (registry.default_num_steps(sampler, schedule.num_timesteps)
                                    if num_steps is None else num_steps)
    if not spec.discrete:
        den = eps_denoiser(schedule, model_fn, prediction, clip_x0)
        u = d.to_vp(schedule, x, jnp.full((shape[0],), schedule.num_timesteps - 1, jnp.int32))
        x, count = spec.run(den, u, k_steps, num_steps=n, **options)
        return _result(x, count)
    kwargs = dict(prediction=prediction, clip_x0=clip_x0, **options)
    if n is not None:
        kwargs["num_steps"] = n
    x, count = spec.run(schedule, model_fn, x, k_steps, **kwargs)
    return _result(x, count)


def _result(x, count):
    """``(samples as float32, {"nfe": int32})``: the documented dtype, whatever the model's."""
    return jnp.asarray(x).astype(jnp.float32), {"nfe": jnp.asarray(count, jnp.int32)}


def sample_denoiser(denoiser: Denoiser, key, shape, *, sampler: str, num_steps=None, x_T=None, **options):
    """Draws ``shape`` samples of any :class:`~jaxdiff.denoiser.Denoiser`: ``(x0 [B, ...], {"nfe": int32})``.

    ``sampler``: a registry name; the Karras-grid samplers run on every Denoiser, the others on
    its discrete view (``denoiser.discrete``). ``num_steps`` ``None``: the sampler's default.
    ``x_T``: optional unit-normal start ``[B, ...]`` (the prior draw in the schedule's coordinates
    for a discrete sampler). The sampler's ``options`` are forwarded and checked.
    """
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a jaxdiff.denoiser.Denoiser (e.g. eps_denoiser(schedule, model_fn)), "
                        f"got {type(denoiser).__name__}")
    checks.check_callable(denoiser.fn, "denoiser.fn")
    spec = registry.check(sampler, views=denoiser.views, num_steps=num_steps, options=options,
                          num_timesteps=denoiser.schedule.num_timesteps if denoiser.discrete else None)
    if spec.discrete:
        model_fn, options = denoiser.model_fn, dict(options)
        if denoiser.learned_variance and spec.learned_variance:
            options.setdefault("variance", "learned_range")
        if denoiser.learned_variance and options.get("variance") != "learned_range":
            model_fn = mean_channels(model_fn)  # a fixed variance (or a sampler without one) uses the mean only
        return sample_with_info(denoiser.schedule, model_fn, key, shape, sampler=sampler, num_steps=num_steps,
                                prediction=denoiser.prediction, clip_x0=denoiser.clip_x0, x_T=x_T, **options)
    checks.check_key(key)
    shape = checks.check_shape(shape)
    denoiser = dataclasses.replace(denoiser, fn=checks.shape_checked(denoiser.fn, "denoiser.fn"))
    k_init, k_steps = jax.random.split(key)
    u = jax.random.normal(k_init, shape, jnp.float32) if x_T is None else jnp.asarray(x_T, jnp.float32)
    if u.shape != tuple(shape):
        raise ValueError(f"x_T has shape {u.shape} but shape is {tuple(shape)}")
    n = spec.steps_default if num_steps is None else num_steps
    x, count = spec.run(denoiser, u, k_steps, num_steps=n, **options)
    return _result(x, count)


def sample(schedule: Schedule, model_fn: Callable, key, shape, *, sampler: str = "ddim", num_steps=None,
           prediction: str = "epsilon", clip_x0: bool = False, x_T=None, **options) -> jax.Array:
    """Runs a reverse chain from the prior to data in one compiled loop.

    Args:
      schedule: the discrete schedule the model was trained on (VP or VE).
      model_fn: ``model_fn(x_t [B, ...], t [B]) -> [B, ...]`` of ``prediction`` (``2C`` channels
        for ``variance="learned_range"``, ddpm only). ``t`` is int32 for ddpm/ddim/pc and a
        fractional float32 timestep on the ``[0, T-1]`` scale for the continuous samplers.
        Wrap it with :mod:`jaxdiff.guidance` for guidance or inpainting.
      key: a PRNG key (``vmap`` over keys for independent chains).
      shape: static ``(B, ...)``.
      sampler: a name in :data:`jaxdiff.samplers.SAMPLERS` (see :mod:`jaxdiff.samplers.registry`
        for each one's NFE, default steps and options).
      num_steps: steps (may be traced; default: the sampler's); not for ``"ode"``. A concrete
        value below 1 raises; a traced one below 1 gives NaN samples and NFE 0
        (:mod:`jaxdiff.samplers.common`).
      prediction: what the network predicts: ``"epsilon"``, ``"x0"``, ``"v"`` or ``"score"``.
      clip_x0: clip every ``x0`` estimate to ``[-1, 1]`` (image data).
      x_T: optional start ``[B, ...]`` (schedule coordinates at ``t = T-1``) instead of a prior draw.
      options: the sampler's own options, e.g. ``eta`` (``ddim``, ``euler_ancestral``; may be
        traced), ``variance`` (``ddpm``, ``pc``), ``order``/``spacing`` (``dpm_solver++``),
        ``rho`` (Karras grid), ``snr``/``num_corrector_steps`` (``pc``),
        ``rtol``/``atol``/``solver``/``max_steps`` (``ode``). An option the sampler does not
        take raises ``ValueError``.
    Returns: samples ``[B, ...]`` (float32; clip/quantize them for images).
    """
    return sample_with_info(schedule, model_fn, key, shape, sampler=sampler, num_steps=num_steps,
                            prediction=prediction, clip_x0=clip_x0, x_T=x_T, **options)[0]

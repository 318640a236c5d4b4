"""The registry of samplers: one entry per name, and the one place that knows what each accepts.

Every layer that takes a sampler name asks this module: :func:`jaxdiff.samplers.sample` (which
options to forward, the NFE), an objective's ``check_sampler`` (the training job's grids, FID and
``jaxdiff-sample``: the names, the step bounds, the options).

A sampler's *options* are the keyword-only parameters of its ``run`` function other than the
common ones (``num_steps``, ``prediction``, ``clip_x0``); their defaults are the signature's
defaults, read once here, so a sampler's options are written in exactly one place: its own
signature. The same holds for the default number of steps (``None`` there means ``T``).

====================  =====================  ===============  ===========  ==================
name                  NFE for ``n`` steps    default ``n``    ``n`` <= T   needs
====================  =====================  ===============  ===========  ==================
``ddpm``              ``n``                  ``T``            yes          discrete
``ddim``              ``n``                  50               yes          discrete
``dpm_solver++``      ``n`` (+1 if           20               no           discrete
                      ``denoise_final``)
``dpm++2m``           as ``dpm_solver++``    20               no           discrete
``pc``                ``n (M + 1)``          ``T``            yes          discrete
``ode``               adaptive, reported     (tolerances)     --           discrete
``euler``             ``n``                  50               --           denoiser
``heun``              ``2n - 1``             25               --           denoiser
``euler_ancestral``   ``n``                  50               --           denoiser
``edm``               ``2n - 1``             18               --           denoiser
``meanflow``          ``n``                  1                --           average_velocity
``consistency``       ``n``                  1                --           consistency
====================  =====================  ===============  ===========  ==================

Four kinds of sampler, one model contract (:class:`jaxdiff.denoiser.Denoiser`):

* *denoiser*: the Karras-grid samplers of :mod:`jaxdiff.samplers.karras` run on every Denoiser
  (a schedule model, a flow-matching velocity, an EDM denoiser):
  ``run(denoiser, x_T, key, *, num_steps, **options) -> (x0, nfe)`` with ``x_T`` a unit normal.
  ``edm`` is ``heun`` with EDM's 18 steps (EDM Algorithm 2 with its churn options).
* *discrete*: the samplers on a schedule's timesteps need the Denoiser's discrete view (a
  network trained on a discrete schedule):
  ``run(schedule, model_fn, x_T, key, *, [num_steps,] prediction, clip_x0, **options) -> (x0, nfe)``
  with ``x_T`` the prior draw in the schedule's coordinates.
* *average_velocity*: the few-step samplers of an average-velocity model ``u(z, r, t)``
  (MeanFlow, :mod:`jaxdiff.meanflow`): ``run(denoiser, x_T, key, *, num_steps) -> (x0, nfe)``.
* *consistency*: multistep sampling of a consistency function (:mod:`jaxdiff.consistency`),
  the same ``run`` contract.

Each sampler *needs* one of the Denoiser's :data:`~jaxdiff.samplers.registry.VIEWS`. The
registry knows sampler names only; an objective says which views its models have
(:attr:`jaxdiff.objectives.Objective.views`) and :func:`names` / :func:`check` take that.

``n`` below 1: a concrete value raises ``ValueError`` (here and in every sampler); a traced one
cannot be checked, and every fixed-step sampler then returns NaN samples and reports NFE 0
(:func:`jaxdiff.samplers.common.steps_result`, the one place that implements it).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

from jaxdiff.samplers import consistency, ddim, ddpm, dpm_solver, karras, meanflow, ode, pc
from jaxdiff.samplers.common import one_per_step

__all__ = ["Sampler", "SAMPLERS", "COMMON", "VIEWS", "get", "names", "check", "default_num_steps", "nfe"]

#: What a sampler needs of a Denoiser (module docstring).
VIEWS = ("discrete", "denoiser", "average_velocity", "consistency")
COMMON = ("num_steps", "prediction", "clip_x0")  # passed by the driver to every sampler that takes them


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A registry entry.

    ``run`` runs the chain (its two contracts are in the module docstring);
    ``nfe_fn(num_steps, **options)`` counts its network evaluations (``None`` for adaptive samplers);
    ``summary`` is one line for ``--help`` and the docs;
    ``steps_up_to_T``: ``num_steps`` may not exceed the schedule's ``T`` (samplers on the
    integer grid); ``stochastic``: draws noise at every step (some only for some option values,
    e.g. ``ddim`` with ``eta > 0``); ``learned_variance``: uses the model's learned-variance
    channels (``variance="learned_range"``); ``needs``: the view of the Denoiser it runs on
    (one of :data:`~jaxdiff.samplers.registry.VIEWS`).
    """

    run: Callable
    nfe_fn: Callable | None
    summary: str
    steps_up_to_T: bool = False
    stochastic: bool = False
    learned_variance: bool = False
    needs: str = "discrete"

    @property
    def discrete(self) -> bool:
        """Runs on a schedule's timesteps (needs the discrete view)."""
        return self.needs == "discrete"

    @functools.cached_property
    def _params(self) -> Mapping[str, inspect.Parameter]:
        return inspect.signature(self.run).parameters

    @property
    def adaptive(self) -> bool:
        """Chooses its own steps (takes no ``num_steps``)."""
        return "num_steps" not in self._params

    @property
    def options(self) -> dict[str, Any]:
        """The sampler's options and their defaults.

        They are the keyword-only parameters of ``run`` other than ``COMMON`` (and other than
        those an alias fixes with ``functools.partial``).
        """
        fixed = self.run.keywords if isinstance(self.run, functools.partial) else {}
        return {k: p.default for k, p in self._params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in COMMON and k not in fixed}

    @property
    def steps_default(self) -> int | None:
        """The signature's default ``num_steps`` (``None``: the schedule's ``T``)."""
        return None if self.adaptive else self._params["num_steps"].default


#: Every sampler by name, the one explicit registry (see the module docstring).
SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(ddpm.ddpm_loop, ddpm.ddpm_nfe, "ancestral sampling (Ho et al. 2020), respaced when n < T",
                    steps_up_to_T=True, stochastic=True, learned_variance=True),
    "ddim": Sampler(ddim.ddim_loop, ddim.ddim_nfe, "DDIM(eta) (Song et al. 2021); deterministic at eta = 0",
                    steps_up_to_T=True, stochastic=True),
    "dpm_solver++": Sampler(dpm_solver.dpm_solver_pp, dpm_solver.dpm_solver_nfe,
                            "DPM-Solver++ multistep (orders 1-3; 2M by default): best at 10-20 NFE"),
    "dpm++2m": Sampler(functools.partial(dpm_solver.dpm_solver_pp, order=2), dpm_solver.dpm_solver_nfe,
                       "alias of dpm_solver++ with order=2"),
    "pc": Sampler(pc.predictor_corrector, pc.pc_nfe, "predictor-corrector with a Langevin corrector (score SDE)",
                  steps_up_to_T=True, stochastic=True),
    "ode": Sampler(ode.probability_flow, None, "the probability-flow ODE, adaptive (Tsit5); NFE reported"),
    "euler": Sampler(karras.euler, karras.euler_nfe, "Euler on the Karras sigma grid", needs="denoiser"),
    "heun": Sampler(karras.heun, karras.heun_nfe, "Heun on the Karras grid (EDM Algorithms 1, 2); NFE 2n - 1",
                    stochastic=True, needs="denoiser"),
    "euler_ancestral": Sampler(karras.euler_ancestral, karras.euler_nfe, "Euler ancestral on the Karras grid",
                               stochastic=True, needs="denoiser"),
    "edm": Sampler(functools.partial(karras.heun, num_steps=18), karras.heun_nfe,
                   "EDM Algorithm 2: heun (with churn) at EDM's 18 steps; NFE 2n - 1", stochastic=True,
                   needs="denoiser"),
    "meanflow": Sampler(meanflow.sample_steps, one_per_step, "MeanFlow: n jumps z_r = z_t - (t - r) u(z_t, r, t)",
                        needs="average_velocity"),
    "consistency": Sampler(consistency.multistep, one_per_step,
                           "consistency models: n evaluations of f at decreasing noise levels", stochastic=True,
                           needs="consistency"),
}


def get(name: str) -> Sampler:
    """The entry of ``name``; ``ValueError`` listing the names if there is none."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name]


def names(views=None) -> tuple[str, ...]:
    """The sampler names that run on a model with the Denoiser ``views`` (``None``: every sampler)."""
    return tuple(k for k, s in SAMPLERS.items() if views is None or s.needs in views)


def default_num_steps(name: str, num_timesteps: int) -> int | None:
    """The default step count of ``name`` on a ``T``-step schedule (``None`` for adaptive samplers)."""
    spec = get(name)
    if spec.adaptive:
        return None
    if spec.steps_default is None:
        return num_timesteps
    return min(spec.steps_default, num_timesteps) if spec.steps_up_to_T else spec.steps_default


def check(name: str, *, views=None, model: str = "this", num_steps=None,
          num_timesteps: int | None = None, options: Mapping[str, Any] | None = None, prefix: str = "") -> Sampler:
    """Checks a sampler request before any work is done; returns the entry.

    ``views``: the views of the model's Denoiser (:data:`~jaxdiff.samplers.registry.VIEWS`;
    ``None``: all); ``model`` names the model's kind in messages (an objective's name). Raises
    ``ValueError`` naming the argument (``prefix`` is prepended to argument names, e.g. ``"--"`` for
    flags or ``"config.sample."`` for settings) if ``name`` is unknown or needs a view the model
    lacks, if an option is not one the sampler takes, or if a Python-int ``num_steps`` is below 1,
    above ``T`` for samplers on the integer grid, or given to an adaptive sampler. Traced values
    pass unchecked.
    """
    if name not in SAMPLERS:
        raise ValueError(f"{prefix}sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
    spec = SAMPLERS[name]
    if views is not None and spec.needs not in views:
        why = {"discrete": "it runs on a discrete schedule's timesteps", "denoiser": "it needs a denoiser",
               "average_velocity": "it needs an average-velocity model",
               "consistency": "it needs a consistency model"}[spec.needs]
        raise ValueError(f"{prefix}sampler {name!r} does not sample {model} models ({why}); "
                         f"use one of {names(views)}")
    allowed = tuple(spec.options)
    bad = sorted(k for k in (options or {}) if k not in allowed)
    if bad:
        raise ValueError(f"sampler {name!r} does not take {', '.join(prefix + k for k in bad)}; "
                         f"it takes {[prefix + k for k in allowed] or 'no options'}")
    if num_steps is not None:
        if spec.adaptive:
            raise ValueError(f"sampler {name!r} is adaptive and takes no {prefix}num_steps (set rtol/atol)")
        if isinstance(num_steps, bool) or (isinstance(num_steps, int) and num_steps < 1):
            raise ValueError(f"{prefix}num_steps must be an integer >= 1, got {num_steps!r}")
        if (isinstance(num_steps, int) and spec.steps_up_to_T and num_timesteps is not None
                and num_steps > num_timesteps):
            raise ValueError(f"{prefix}num_steps must be in [1, T={num_timesteps}] for sampler {name!r}, "
                             f"got {num_steps}")
    return spec


def nfe(name: str, num_steps, **options):
    """Network evaluations of a fixed-step sampler for ``num_steps`` (e.g. ``heun``: ``2n - 1``).

    ``options`` are those that change the count (``num_corrector_steps`` for ``pc``,
    ``denoise_final`` for ``dpm_solver++``); others are ignored. For ``"ode"`` the count is
    only known after solving: use :func:`jaxdiff.samplers.sample_with_info`.
    """
    spec = get(name)
    if spec.nfe_fn is None:
        raise ValueError(f"sampler {name!r} is adaptive: its NFE is returned by sample_with_info")
    known = {k: v for k, v in options.items() if k in inspect.signature(spec.nfe_fn).parameters}
    return spec.nfe_fn(num_steps, **known)

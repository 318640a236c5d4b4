"""Consistency distillation (CD, Song et al. 2023) of a trained teacher (:func:`jaxdiff.consistency.cd_loss`).

The student is a consistency model exactly as :class:`~jaxdiff.objectives.consistency.Consistency`
makes one (the EDM skip/out parameterisation, ``f(x, sigma_min) = x`` exactly; sampled by the
``consistency`` sampler). Each example's level is a pair ``[sigma_i, sigma_{i+1}]`` of the fixed
``num_scales``-point Karras grid, ``i`` uniform (CD's choice); the teacher's move is one ODE step of
the registry's ``heun`` (or ``euler``) sampler from ``sigma_{i+1}`` to ``sigma_i``
(:func:`jaxdiff.samplers.karras.ode_step`) through the teacher's Denoiser; the target is the
student's own ``f`` under stop-gradient (as iCT: no EMA target, so the train state holds nothing
more than for any objective).

The teacher is ``teacher(teacher_params, x [B, ...], sigma [B], labels [B] | None) -> x0_hat``, a
denoiser in VE coordinates (``labels`` are the student's batch labels, the null label where
dropped). ``teacher_params`` is a leaf of this objective, not of the train state: it is never
trained, never saved in the student's checkpoints, and the compiled train step holds it as a
constant. From a config, :meth:`ConsistencyDistillation.for_run` loads it from
``config.distill.teacher`` (a workdir's EMA parameters) for a training run; a restored student
needs no teacher to sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxdiff import consistency as ct
from jaxdiff import denoiser as den
from jaxdiff.objectives.base import Network, Objective, fail
from jaxdiff.objectives.consistency import Consistency
from jaxdiff.samplers import karras

__all__ = ["ConsistencyDistillation", "TEACHER_SAMPLERS"]

#: The registry samplers whose one step can be the teacher's move, and whether it has Heun's corrector.
TEACHER_SAMPLERS = {"heun": True, "euler": False}


def _fail_distill(setting: str, value, why: str):
    raise ValueError(f"config.distill.{setting}={value!r}: {why}")


@flax.struct.dataclass
class ConsistencyDistillation(Objective):
    """CD on a fixed Karras grid: the teacher's ODE step, the student's own stop-gradient target."""

    name: ClassVar[str] = "consistency_distillation"
    views: ClassVar[tuple[str, ...]] = ("consistency",)
    uses_labels: ClassVar[bool] = True  # the teacher sees the student's labels

    teacher_params: Any = None  # the teacher's (frozen) parameters: a leaf, never trained
    teacher: Callable | None = flax.struct.field(pytree_node=False, default=None)
    num_scales: int = flax.struct.field(pytree_node=False, default=18)
    teacher_sampler: str = flax.struct.field(pytree_node=False, default="heun")
    distance: str = flax.struct.field(pytree_node=False, default="pseudo_huber")
    sigma_data: float = flax.struct.field(pytree_node=False, default=0.5)
    sigma_min: float = flax.struct.field(pytree_node=False, default=0.002)
    sigma_max: float = flax.struct.field(pytree_node=False, default=80.0)

    def __post_init__(self):
        if not (isinstance(self.num_scales, int) and self.num_scales >= 2):
            raise ValueError(f"num_scales must be an int >= 2, got {self.num_scales!r}")
        if self.teacher_sampler not in TEACHER_SAMPLERS:
            raise ValueError(f"teacher_sampler must be one of {tuple(TEACHER_SAMPLERS)}, got {self.teacher_sampler!r}")
        if self.distance not in ct.DISTANCES:
            raise ValueError(f"distance must be one of {ct.DISTANCES}, got {self.distance!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min!r}, {self.sigma_max!r}")

    @classmethod
    def from_config(cls, cfg) -> ConsistencyDistillation:
        if cfg.learned_variance:
            fail("learned_variance", True, "a consistency model has no variance to learn")
        if not cfg.sigma_data > 0:
            fail("sigma_data", cfg.sigma_data, "must be positive")
        return cls(sigma_data=float(cfg.sigma_data))

    def for_run(self, config, *, image_shape, num_classes, training, load_workdir=None):
        d = config.get("distill")
        if d is None:
            fail("objective", self.name, "needs the config.distill section (jaxdiff/configs/default.py)")
        if not (isinstance(d.num_scales, int) and d.num_scales >= 2):
            _fail_distill("num_scales", d.num_scales, "must be an int >= 2 (CD on CIFAR-10: 18)")
        if d.teacher_sampler not in TEACHER_SAMPLERS:
            _fail_distill("teacher_sampler", d.teacher_sampler, f"must be one of {tuple(TEACHER_SAMPLERS)}")
        if d.distance not in ct.DISTANCES:
            _fail_distill("distance", d.distance, f"must be one of {ct.DISTANCES}")
        out = self.replace(num_scales=d.num_scales, teacher_sampler=d.teacher_sampler, distance=d.distance)
        if not training:
            return out  # sampling a student needs no teacher
        if not d.teacher:
            _fail_distill("teacher", d.teacher, "set it to a trained edm / diffusion / flow_matching workdir")
        if not os.path.isdir(os.path.join(d.teacher, "checkpoints")):
            _fail_distill("teacher", d.teacher, "no checkpoints in this workdir: train the teacher first")
        if load_workdir is None:
            raise ValueError("training a distillation objective needs load_workdir (the training layer passes "
                             "jaxdiff.training.workdir.load_workdir)")
        workdir = load_workdir(d.teacher)
        run = workdir.run
        if "denoiser" not in run.objective.views:
            _fail_distill("teacher", d.teacher, f"its objective {run.objective.name!r} is not supported "
                          "(it needs a denoiser: edm, diffusion, flow_matching)")
        if tuple(run.image_shape) != tuple(image_shape):
            _fail_distill("teacher", d.teacher, f"its images are {tuple(run.image_shape)}; this run's are "
                          f"{tuple(image_shape)}")
        if run.num_classes != num_classes:
            _fail_distill("teacher", d.teacher, f"its model has num_classes={run.num_classes}; this run's "
                          f"has {num_classes}")
        return out.with_teacher(*_workdir_teacher(run), workdir.ema_params)

    def with_teacher(self, teacher: Callable, sigma_range: tuple[float, float], params) -> ConsistencyDistillation:
        """This objective with ``teacher(params, x, sigma, labels)`` (module docstring) and its parameters;
        the grid is clipped to the teacher's noise range ``sigma_range`` (``(lo, hi)``)."""
        lo, hi = sigma_range
        return self.replace(teacher=teacher, teacher_params=params, sigma_min=max(self.sigma_min, float(lo)),
                            sigma_max=min(self.sigma_max, float(hi)))

    def _student(self) -> Consistency:
        return Consistency(sigma_data=self.sigma_data, sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    def function(self, net: Network):
        """``f(x [B, ...], sigma [B])``, the student's consistency function (:meth:`Consistency.function`)."""
        return self._student().function(net)

    def noise_level(self, key):
        i = jax.random.randint(key, (), 0, self.num_scales - 1)
        grid = {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max}
        return jnp.stack([ct.karras_grid(i, self.num_scales, **grid), ct.karras_grid(i + 1, self.num_scales, **grid)])

    def teacher_move(self, labels=None):
        """``move(x [B, ...], sigma_from [B], sigma_to [B])``: one ``teacher_sampler`` step of the teacher."""
        if self.teacher is None:
            raise ValueError("consistency distillation has no teacher: set config.distill.teacher "
                             "(or build the objective with with_teacher)")
        teacher = den.Denoiser(fn=lambda x, sigma: self.teacher(self.teacher_params, x, sigma, labels))
        corrector = TEACHER_SAMPLERS[self.teacher_sampler]
        return lambda x, s_from, s_to: karras.ode_step(teacher, x, s_from, s_to, corrector=corrector)

    def loss(self, net: Network, x0, key, *, level, noise, labels=None, null_label=None):
        del key, null_label
        return ct.cd_loss(self.function(net), self.teacher_move(labels), x0, sigma=level[:, 0],
                          sigma_next=level[:, 1], noise=noise, distance=self.distance)

    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        return self._student().denoiser(net, clip_x0=clip_x0)


def _workdir_teacher(run) -> tuple[Callable, tuple[float, float]]:
    """``(teacher, (sigma_lo, sigma_hi))`` of a restored run (:class:`jaxdiff.training.setup.Run`): its
    network at the given labels through its objective's Denoiser."""
    objective, apply_fn, num_classes = run.objective, run.model.apply, run.num_classes

    def teacher(params, x, sigma, labels):
        y = None if num_classes is None else labels

        def net(x_t, time):
            return apply_fn({"params": params}, x_t, time, y, train=False)

        return objective.denoiser(net).fn(x, sigma)

    probe = objective.denoiser(lambda x, t: x)
    return teacher, (float(probe.sigma_min), float(probe.sigma_max))

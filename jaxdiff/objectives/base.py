"""What an objective is: the one object that knows how a network is trained and sampled.

An objective (a frozen pytree dataclass; its settings are static fields) supplies

* :meth:`Objective.noise_level`: one example's noise level from its own key (a timestep ``t``,
  a flow time or an EDM ``sigma``);
* :meth:`Objective.loss`: the training loss of the network at given levels and noise;
* :meth:`Objective.denoiser`: the network as the samplers see it, a
  :class:`jaxdiff.denoiser.Denoiser`;
* :attr:`Objective.views`: the views its Denoiser offers (:data:`jaxdiff.samplers.registry.VIEWS`:
  ``"discrete"`` for a model on a discrete schedule, ``"denoiser"`` for every model,
  ``"average_velocity"`` for MeanFlow), which decide the samplers it serves
  (:meth:`Objective.sampler_names`, :meth:`Objective.check_sampler`).

The *network* an objective is given is ``net(x [B, H, W, C], time [B]) -> [B, H, W, C_out]``: a
:class:`jaxdiff.models.UNet`'s ``apply`` with its parameters and labels bound, called with the
time input the network was built for (the DDPM timestep scale ``0..T-1``); ``time`` is
``[B, time_inputs]`` for an objective with two time inputs (MeanFlow's ``(t, t - r)``), and the
network is built for them (``UNet(time_inputs=...)``). Each objective maps
its own noise level to that input, so the same UNet serves every objective.

Objectives are built from ``config.diffusion`` by :func:`jaxdiff.objectives.from_config`, which
checks every setting the objective uses and names the first bad one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import jax

from jaxdiff import denoiser as den
from jaxdiff.samplers import registry

__all__ = ["Network", "Objective", "fail"]

#: ``net(x [B, H, W, C], time [B]) -> [B, H, W, C_out]``: the network with parameters and labels bound.
Network = Callable[[jax.Array, jax.Array], jax.Array]


def fail(setting: str, value, why: str):
    """Raises ``ValueError("config.diffusion.SETTING=VALUE: why")``."""
    raise ValueError(f"config.diffusion.{setting}={value!r}: {why}")


class Objective(abc.ABC):
    """The interface every objective implements (see the module docstring)."""

    name: ClassVar[str]  # its key in jaxdiff.objectives.OBJECTIVES and config.diffusion.objective
    views: ClassVar[tuple[str, ...]] = ("denoiser",)  # what its Denoiser offers the samplers
    time_inputs: ClassVar[int] = 1  # the network's time inputs (time [B] or [B, time_inputs])
    uses_labels: ClassVar[bool] = False  # its loss takes labels= and null_label= (see loss)

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg) -> Objective:
        """The objective of ``config.diffusion`` (``cfg``); ``ValueError`` naming the first bad setting."""

    @abc.abstractmethod
    def noise_level(self, key: jax.Array) -> jax.Array:
        """One example's training noise level ``[]`` drawn from its own ``key``."""

    @abc.abstractmethod
    def loss(self, net: Network, x0: jax.Array, key: jax.Array, *, level: jax.Array,
             noise: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        """``(loss, metrics)`` of ``net`` on clean ``x0`` ``[B, ...]`` at ``level`` ``[B]`` with unit ``noise``
        like ``x0``; ``metrics`` holds at least ``"loss"`` and ``"mse"``. ``key`` is the run's root key
        (unused when levels and noise are given). The loss and every metric are means over the ``B``
        examples of terms that depend on one example alone (the train step's gradient accumulation,
        ``config.train.microbatches``, averages microbatches' means: exact only for such means; every
        objective here is one, MeanFlow's adaptive weight and consistency's level weight included).

        An objective with ``uses_labels = True`` also takes ``labels=`` and ``null_label=``: for a
        class-conditional network, ``labels`` ``[B]`` are those ``net`` is bound to (``null_label`` where
        dropped for classifier-free guidance), and ``net(x, time, other_labels)`` evaluates it under other
        labels ``[B]``; ``None`` for an unconditional one."""

    @abc.abstractmethod
    def denoiser(self, net: Network, *, clip_x0: bool = False) -> den.Denoiser:
        """The network as every sampler sees it. ``clip_x0``: clip its x0 estimates to ``[-1, 1]``
        where the objective's parameterization allows it (image data)."""

    def for_run(self, config, *, image_shape: tuple[int, ...], num_classes: int | None,
                training: bool, load_workdir: Callable | None = None) -> Objective:
        """The objective completed with the run's facts outside ``config.diffusion`` (called once by
        :func:`jaxdiff.training.setup.resolve`; ``ValueError`` naming the first bad setting). ``training``:
        the run trains (load what only training needs, e.g. a teacher); ``load_workdir(path)`` then reads
        another run's workdir (:func:`jaxdiff.training.workdir.load_workdir`, passed in by the training
        layer so that objectives never import it). Default: itself."""
        del config, image_shape, num_classes, training, load_workdir
        return self

    def at_step(self, step) -> Objective:
        """The objective at training step ``step`` (traced): the train step calls it once per step, for
        objectives whose training changes with the step (a curriculum). Default: itself."""
        del step
        return self

    @property
    def learned_variance(self) -> bool:
        """Whether the network outputs ``2C`` channels (the second half a variance)."""
        return False

    @property
    def num_timesteps(self) -> int | None:
        """``T`` of the discrete schedule (``None`` without one)."""
        return None

    def sampler_names(self) -> tuple[str, ...]:
        """The registry's samplers that serve this objective's models."""
        return registry.names(self.views)

    def check_sampler(self, name: str, *, num_steps=None, options=None, prefix: str = "") -> registry.Sampler:
        """:func:`jaxdiff.samplers.registry.check` for this objective's models; returns the entry."""
        return registry.check(name, views=self.views, model=self.name, num_steps=num_steps,
                              num_timesteps=self.num_timesteps, options=options, prefix=prefix)

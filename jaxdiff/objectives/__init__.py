"""Training objectives as values: one module per objective, one explicit registry.

:data:`OBJECTIVES` maps each ``config.diffusion.objective`` name to its class; this package is
the only place that knows an objective's name. :func:`from_config` builds the run's objective
once (``jaxdiff.training.setup.resolve``); the train step, the sampling function and the
evaluation only call its methods (:class:`~jaxdiff.objectives.base.Objective`).

A new objective plugs in by adding a module with an :class:`Objective` subclass and one entry
here; nothing in :mod:`jaxdiff.training` changes.
"""

from __future__ import annotations

from jaxdiff.objectives.base import Network, Objective
from jaxdiff.objectives.consistency import Consistency
from jaxdiff.objectives.diffusion import Diffusion
from jaxdiff.objectives.distillation import ConsistencyDistillation
from jaxdiff.objectives.edm import EDM
from jaxdiff.objectives.flow_matching import FlowMatching
from jaxdiff.objectives.meanflow import MeanFlow

__all__ = ["OBJECTIVES", "Objective", "Network", "Diffusion", "FlowMatching", "EDM", "MeanFlow", "Consistency",
           "ConsistencyDistillation", "from_config", "names"]

#: Every objective by its config name.
OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Diffusion, FlowMatching, EDM, MeanFlow, Consistency, ConsistencyDistillation)}


def names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def from_config(cfg) -> Objective:
    """The objective of ``config.diffusion`` (``cfg``); ``ValueError`` naming the first bad setting."""
    name = cfg.objective
    if name not in OBJECTIVES:
        raise ValueError(f"config.diffusion.objective={name!r}: must be one of {names()}")
    return OBJECTIVES[name].from_config(cfg)

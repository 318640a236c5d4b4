"""A trained workdir as Python objects: its config, model, schedule and EMA parameters."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections

from jaxdiff.training import checkpoint, phema
from jaxdiff.training.setup import Run, resolve
from jaxdiff.training.state import create_train_state

__all__ = ["Workdir", "load_workdir"]


@dataclasses.dataclass(frozen=True)
class Workdir:
    """A restored workdir: the run's facts (:class:`jaxdiff.training.setup.Run`) and its parameters."""

    run: Run
    step: int  # the restored checkpoint's step
    params: object  # the network's parameters
    ema_params: object  # their exponential moving average (what samples and evaluations use)

    @property
    def config(self):
        return self.run.config


def load_workdir(workdir: str, ema: float | None = None) -> Workdir:
    """Restores the latest checkpoint of ``workdir`` on the host (NumPy arrays).

    ``ema``: a ``sigma_rel`` whose post-hoc EMA reconstruction (``scripts/posthoc_ema.py``,
    :mod:`jaxdiff.training.phema`) replaces ``ema_params``; ``None``: the run's own EMA.

    ``FileNotFoundError`` if ``workdir`` holds no checkpoint. The config is the one saved with
    the checkpoint (locked, so a typo in a field name raises).
    """
    config = ml_collections.ConfigDict(checkpoint.read_config(workdir))
    config.lock()
    run = resolve(config)
    target = jax.device_get(create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape,
                                               num_classes=run.num_classes,
                                               posthoc_sigma_rels=phema.sigma_rels(config.train)))
    manager = checkpoint.open_manager(workdir, async_save=False)
    try:
        state, _ = checkpoint.restore(manager, target)
    finally:
        manager.close()
    ema_params = state.ema_params if ema is None else phema.load_reconstruction(workdir, ema, state.params)
    return Workdir(run=run, step=int(state.step), params=state.params, ema_params=ema_params)

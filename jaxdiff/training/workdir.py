"""A trained workdir as Python objects: its config, model, schedule and EMA parameters, and its pipeline."""

from __future__ import annotations

import dataclasses
import os

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

    @property
    def pipeline(self):
        """The :class:`~jaxdiff.pipeline.Pipeline` of the EMA parameters with the run's ``config.sample`` defaults:
        ``load_workdir(W).pipeline.sample(jax.random.key(s), n)`` draws ``sample_workdir(W, seed=s)``'s images.
        A latent run's pipeline draws latents in model space: ``run.to_images`` decodes them."""
        from jaxdiff.pipeline import Pipeline

        return Pipeline.from_sampling(self.run.sampling(), self.ema_params)


def load_workdir(workdir: str, ema: float | None = None) -> Workdir:
    """Restores the newest checkpoint of ``workdir`` that restores completely, on the host (NumPy arrays).

    Damaged newer checkpoints are skipped with a warning (see :func:`checkpoint.restore_newest`).
    ``FileNotFoundError`` if ``workdir`` holds no checkpoint, ``ValueError`` if none restores. The
    config is the one saved with the checkpoint (locked, so a typo in a field name raises).

    ``ema``: a ``sigma_rel`` whose post-hoc EMA reconstruction (``scripts/posthoc_ema.py``,
    :mod:`jaxdiff.training.phema`) replaces ``ema_params``; ``None``: the run's own EMA.
    """
    runs = {}

    def target_for(saved: dict):
        config = ml_collections.ConfigDict(saved)
        config.lock()
        runs["run"] = run = resolve(config)
        return jax.device_get(create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape,
                                                 num_classes=run.num_classes, param_dtype=run.param_dtype,
                                                 posthoc_sigma_rels=phema.sigma_rels(config.train)))

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    manager = checkpoint.open_manager(workdir, async_save=False)
    try:
        step, state, _, _ = checkpoint.restore_newest(manager, target_for)
    finally:
        manager.close()
    ema_params = state.ema_params if ema is None else phema.load_reconstruction(workdir, ema, state.params)
    return Workdir(run=runs["run"], step=step, params=state.params, ema_params=ema_params)

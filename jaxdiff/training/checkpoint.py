"""Checkpoints with orbax: the train state (array leaves only) and the config as JSON beside it.

Nothing here executes code on load: the state is restored into the structure of a freshly
initialised state (no pickle), the config is plain JSON. Saves are asynchronous and atomic
(orbax writes a temporary folder and renames it when complete), so a job killed mid-save
leaves the previous checkpoints intact and resumes from the latest complete one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["open_manager", "save", "restore", "latest_step", "read_config"]


def open_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` over ``workdir/checkpoints`` keeping the last ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, host_state: Any, config: dict) -> None:
    """Saves a host (NumPy) state and the config dict at ``step`` (asynchronously).

    Raises ValueError (and saves nothing) if any leaf of the state is not finite.
    """
    for path, leaf in _leaves_with_paths(host_state):
        if np.issubdtype(np.asarray(leaf).dtype, np.floating) and not np.all(np.isfinite(leaf)):
            raise ValueError(f"refusing to save step {step}: state leaf {path} holds NaN or Inf")
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                               config=ocp.args.JsonSave(json.loads(json.dumps(config)))))


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The latest complete checkpoint's step, or None."""
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None):
    """Restores ``(state, config)`` at ``step`` (default: latest) into the structure of ``target``.

    ``target`` is a host pytree of the right structure, shapes and dtypes (e.g. a freshly
    initialised state); the result holds NumPy arrays.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = _as_numpy(target)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             config=ocp.args.JsonRestore()))
    return _as_numpy(restored["state"]), restored["config"]


def read_config(workdir: str) -> dict:
    """The config JSON of the latest checkpoint in ``workdir`` (for sampling/eval scripts)."""
    manager = open_manager(workdir, async_save=False)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first")
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def _as_numpy(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a), tree)


def _leaves_with_paths(tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield jax.tree_util.keystr(path), leaf

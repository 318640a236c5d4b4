"""Checkpoints with orbax: the train state (array leaves only) and the config as JSON beside it.

The state is saved as global arrays of its unstacked shapes: a host copy, or arrays sharded over
a mesh (fsdp), of which each host writes its own shards. The files do not depend on which, so a
checkpoint restores onto any mesh, device count or mode: as NumPy arrays, or straight into shards
when the target's leaves are ``jax.ShapeDtypeStruct`` carrying the new shardings (each host reads
only its own; :meth:`jaxdiff.training.parallel.DataParallel.restore_target`).

Nothing here executes code on load: the state is restored into the structure of a freshly
initialised state (no pickle), the config is plain JSON. Saves are asynchronous and atomic
(orbax writes a temporary folder and renames it when complete), so a job killed mid-save
leaves the previous checkpoints intact and resumes from the latest complete one.

A checkpoint can still be damaged later (a truncated file, a deleted ``_METADATA``, a folder
that is not a checkpoint): :func:`restore_newest` tries the steps newest first, skips each one
that does not restore completely with a warning naming it, and never deletes anything. A run
that resumes behind a damaged step moves it aside with :func:`set_aside` (to
``checkpoints/STEP.damaged-N``, which orbax ignores) before it saves that step again.

A damaged step fails in one of the many reads orbax runs concurrently in a fresh event loop,
which it closes as soon as that read fails; the reads still in flight then complete into the
closed loop, and tensorstore reports each one as an unraisable ``RuntimeError: Event loop is
closed`` (dozens of tracebacks after the one useful message), and asyncio logs the other failed
reads as "exception was never retrieved". Restoring therefore installs, once per process, a
``sys.unraisablehook`` that drops exactly those reports (passing every other one to the hook it
replaced) and a filter on the ``asyncio`` logger that drops the unretrieved tensorstore read
errors (:func:`quiet_orphaned_reads`); the damage itself is reported once, by the warning or the
``ValueError`` of :func:`restore_newest`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["open_manager", "save", "restore", "latest_step", "read_config", "restore_newest", "set_aside",
           "check_saves", "quiet_orphaned_reads"]

log = logging.getLogger("jaxdiff")


def open_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """A ``CheckpointManager`` over ``workdir/checkpoints`` keeping the last ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options,
                                 item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, host_state: Any, config: dict) -> None:
    """Saves a state and the config dict at ``step`` (asynchronously).

    ``host_state``: NumPy arrays, or global ``jax.Array`` leaves (e.g. sharded over a mesh: each host
    writes its own shards; the files are the same as a host copy's, so either restores as the other).
    Every process calls it. Raises ValueError (and saves nothing) if any leaf of the state is not finite.
    """
    bad = _nonfinite_leaves(host_state)
    if bad:
        raise ValueError(f"refusing to save step {step}: state leaf {bad[0]} holds NaN or Inf")
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                               config=ocp.args.JsonSave(json.loads(json.dumps(config)))))


def _is_orphaned_read(unraisable) -> bool:
    """An unraisable ``RuntimeError('Event loop is closed')`` (what a read of a failed restore reports)."""
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


class _UnretrievedReads(logging.Filter):
    """Drops asyncio's "exception was never retrieved" records of failed tensorstore reads."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ("never retrieved" in record.getMessage() and "tensorstore_spec" in str(error))


def quiet_orphaned_reads() -> None:
    """Drops the reports of reads left in flight by a failed restore (module docstring).

    Idempotent; every other unraisable exception still reaches the previous ``sys.unraisablehook``
    and every other asyncio record its handlers.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnretrievedReads) for f in asyncio_log.filters):
        asyncio_log.addFilter(_UnretrievedReads())
    previous = sys.unraisablehook
    if getattr(previous, "_drops_orphaned_reads", False):
        return

    def hook(unraisable):
        if not _is_orphaned_read(unraisable):
            previous(unraisable)

    hook._drops_orphaned_reads = True
    sys.unraisablehook = hook


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The latest complete checkpoint's step, or None."""
    return manager.latest_step()


def restore(manager: ocp.CheckpointManager, target: Any, step: int | None = None):
    """Restores ``(state, config)`` at ``step`` (default: latest) into the structure of ``target``.

    ``target`` is a host pytree of the right structure, shapes and dtypes (e.g. a freshly
    initialised state); the result holds NumPy arrays. Leaves of ``target`` that are
    ``jax.ShapeDtypeStruct`` with a sharding restore as ``jax.Array`` with that sharding (each host
    reads its own shards), whatever mesh or mode wrote the checkpoint.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    abstract = _as_target(target)
    quiet_orphaned_reads()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                             config=ocp.args.JsonRestore()))
    return _as_restored(restored["state"]), restored["config"]


def restore_newest(manager: ocp.CheckpointManager, target_for: Callable[[dict], Any] | None = None, *,
                   check_config: Callable[[int, dict], None] | None = None):
    """Restores the newest checkpoint that restores completely: ``(step, state, config, skipped)``.

    ``target_for(config)``: the target of a checkpoint with this config, as in :func:`restore` (None: the
    saved structure, as dicts of NumPy arrays). ``check_config(step, config)`` may raise to refuse a checkpoint; its
    error propagates (a refusal is not damage). ``skipped``: ``[(step, reason)]`` of the newer
    checkpoints that did not restore, each also logged as a warning naming its folder.
    FileNotFoundError if there is no checkpoint; ValueError listing every try if none restores.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    skipped = []
    quiet_orphaned_reads()
    for step in steps:
        try:
            config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
            if not isinstance(config, dict):
                raise ValueError(f"its config is a {type(config).__name__}, not a JSON object")
        except Exception as error:  # any failure to read makes this step unusable
            skipped.append((step, _reason(error)))
            log.warning("skipping the checkpoint %s: %s", os.path.join(manager.directory, str(step)), skipped[-1][1])
            continue
        if check_config is not None:
            check_config(step, config)
        try:
            target = _saved_as_numpy(manager, step) if target_for is None else _as_target(target_for(config))
            restore_args = ocp.args.StandardRestore(target)
            state = _as_restored(manager.restore(step, args=ocp.args.Composite(state=restore_args))["state"])
            _check_restored(step, state)
        except Exception as error:
            skipped.append((step, _reason(error)))
            log.warning("skipping the checkpoint %s: %s", os.path.join(manager.directory, str(step)), skipped[-1][1])
            continue
        return step, state, config, skipped
    tried = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise ValueError(f"no checkpoint in {manager.directory} restores completely (tried {tried}); they are left in "
                     f"place: move them aside to start afresh, or restore them from a copy")


def set_aside(directory: str, step: int) -> str:
    """Renames ``directory/STEP`` to ``directory/STEP.damaged-N`` (the first free N); returns the new path."""
    n = 0
    while os.path.exists(os.path.join(directory, f"{step}.damaged-{n}")):
        n += 1
    new = os.path.join(directory, f"{step}.damaged-{n}")
    os.rename(os.path.join(directory, str(step)), new)
    log.warning("moved the damaged checkpoint %s aside to %s", os.path.join(directory, str(step)), new)
    return new


def check_saves(manager: ocp.CheckpointManager, step: int | None) -> None:
    """Raises OSError naming ``step`` (the last step saved) if an asynchronous save has failed."""
    try:
        manager.check_for_errors()
    except Exception as error:  # orbax re-raises what the writer thread raised
        raise OSError(f"saving the checkpoint of step {step} in {manager.directory} failed: "
                      f"{_reason(error)}") from error


def read_config(workdir: str) -> dict:
    """The config JSON of the newest checkpoint in ``workdir`` that restores completely."""
    manager = open_manager(workdir, async_save=False)
    try:
        _, _, config, _ = restore_newest(manager)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}: train first") from None
    finally:
        manager.close()
    return config


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def _check_restored(step: int, state) -> None:
    saved_step = state.get("step") if isinstance(state, dict) else getattr(state, "step", None)
    if isinstance(saved_step, jax.Array):
        saved_step = saved_step.addressable_data(0)  # replicated
    if saved_step is not None and int(saved_step) != step:
        raise ValueError(f"it holds the state of step {int(saved_step)}")
    bad = _nonfinite_leaves(state)
    if bad:
        raise ValueError(f"state leaf {bad[0]} holds NaN or Inf")


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _nonfinite_leaves(tree) -> list[str]:
    """The paths of the floating-point leaves holding NaN or Inf (device arrays checked on the devices)."""
    floating = [(p, x) for p, x in _leaves_with_paths(tree) if np.issubdtype(np.dtype(x.dtype), np.floating)]
    bad = [p for p, x in floating if not isinstance(x, jax.Array) and not np.all(np.isfinite(x))]
    device = [(p, x) for p, x in floating if isinstance(x, jax.Array)]
    if device:
        ok = np.asarray(_all_finite([x for _, x in device]).addressable_data(0))  # replicated: one copy per host
        bad += [p for (p, _), fine in zip(device, ok) if not fine]
    return bad


def _as_target(tree):
    """A restore target: ``jax.ShapeDtypeStruct`` leaves with a sharding kept, every other leaf as NumPy."""
    return jax.tree_util.tree_map(
        lambda a: a if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is not None else np.asarray(a), tree)


def _saved_as_numpy(manager: ocp.CheckpointManager, step: int):
    """A NumPy target of the saved structure, shapes and dtypes (so that a state saved as sharded arrays
    restores on any devices: without a target orbax would rebuild the shardings it was saved with)."""
    metadata = manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)
    return jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), tree)


def _as_restored(tree):
    return jax.tree_util.tree_map(lambda a: a if isinstance(a, jax.Array) else np.asarray(a), tree)


def _leaves_with_paths(tree):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield jax.tree_util.keystr(path), leaf

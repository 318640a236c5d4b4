"""How much memory a run needs on each device, known before its first step: ``workdir/memory.json``.

Every figure is computed from shardings, not estimated: a leaf of the train state occupies
``prod(sharding.shard_shape(shape)) * itemsize`` bytes on each device that holds a shard of it
(pmap's stacked copies, sharding mode's replicas and fsdp's shards alike,
:class:`jaxdiff.training.parallel.DataParallel`). The step's peak is XLA's own account of the
compiled step (``Compiled.memory_analysis()``: arguments + outputs - donated aliases + scratch),
where the backend reports one.

The report (the contract of ``memory.json``)::

    {"params_bytes_per_device", "opt_state_bytes_per_device",
     "ema_bytes_per_device",      # the EMA and the post-hoc EMA copies
     "state_bytes_per_device",    # the sum of the three
     "step_peak_bytes",           # int, or null where the backend reports none (or it was not compiled)
     "devices", "mesh",           # e.g. 8, {"data": 1, "fsdp": 8}
     "mode"}

The training loop writes it at start-up (:func:`report` of the placed state and the compiled
step); :func:`plan` (``jaxdiff-train --plan``) makes the same report from ``jax.eval_shape`` and
abstract arrays carrying the shardings, allocating no state, for any device count.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np

from jaxdiff.training import phema
from jaxdiff.training.parallel import DataParallel
from jaxdiff.training.state import create_train_state

__all__ = ["REPORT_FILE", "state_initializer", "abstract_batch", "bytes_per_device", "step_peak_bytes", "report",
           "summary", "write", "plan"]

REPORT_FILE = "memory.json"


def state_initializer(run) -> Callable[[jax.Array], object]:
    """``init(key) -> TrainState``: the initial train state of ``run`` (:class:`jaxdiff.training.setup.Run`)."""
    tr = run.config.train
    return functools.partial(create_train_state, model=run.model, tx=run.tx, image_shape=run.image_shape,
                             num_classes=run.num_classes, posthoc_sigma_rels=phema.sigma_rels(tr),
                             ema_decay=tr.ema_decay, label_dropout=tr.label_dropout, param_dtype=run.param_dtype)


def abstract_batch(run, par: DataParallel):
    """The ``jax.ShapeDtypeStruct`` of the batches that ``par.put_batch`` makes for ``run`` (the data
    loader's contract, :func:`jaxdiff.data.get_batch`: ``image`` float32 ``[B, H, W, C]``, ``index`` int32
    ``[B]``, ``label`` int32 ``[B]`` when the dataset has labels)."""
    b = run.config.train.global_batch_size
    batch = {"image": jax.ShapeDtypeStruct((b, *run.image_shape), np.float32),
             "index": jax.ShapeDtypeStruct((b,), np.int32)}
    if run.source.info.num_classes is not None:
        batch["label"] = jax.ShapeDtypeStruct((b,), np.int32)
    return par.abstract_batch(batch)


def bytes_per_device(tree) -> int:
    """The bytes one device holds of ``tree``'s leaves (arrays or ``jax.ShapeDtypeStruct`` with shardings)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            raise ValueError(f"tree: a leaf of shape {np.shape(leaf)} has no sharding")
        total += math.prod(sharding.shard_shape(tuple(leaf.shape))) * np.dtype(leaf.dtype).itemsize
    return int(total)


def step_peak_bytes(compiled) -> int | None:
    """XLA's peak memory of a compiled step on one device (arguments + outputs - aliases + scratch), or None
    where the backend reports no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes)


def report(par: DataParallel, state, compiled=None) -> dict:
    """The memory report of ``state`` (placed by ``par``, or :meth:`DataParallel.abstract_state`) and the
    compiled step (``None``: ``step_peak_bytes`` null)."""
    params = bytes_per_device(state.params)
    opt = bytes_per_device(state.opt_state)
    ema = bytes_per_device((state.ema_params, state.posthoc_ema))
    return {"params_bytes_per_device": params, "opt_state_bytes_per_device": opt, "ema_bytes_per_device": ema,
            "state_bytes_per_device": params + opt + ema,
            "step_peak_bytes": None if compiled is None else step_peak_bytes(compiled),
            "devices": par.num_devices, "mesh": par.mesh_sizes, "mode": par.mode}


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def summary(rep: dict) -> str:
    """One line of the report."""
    mesh = " x ".join(f"{k}={v}" for k, v in rep["mesh"].items())
    return (f"memory per device: state {_mb(rep['state_bytes_per_device'])} (params "
            f"{_mb(rep['params_bytes_per_device'])}, optimizer {_mb(rep['opt_state_bytes_per_device'])}, EMA "
            f"{_mb(rep['ema_bytes_per_device'])}), step peak {_mb(rep['step_peak_bytes'])}; "
            f"{rep['mode']} on {rep['devices']} devices (mesh {mesh})")


def write(workdir: str, rep: dict) -> str:
    """Writes ``workdir/memory.json`` and prints :func:`summary` with its path; returns the path."""
    path = os.path.join(workdir, REPORT_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
    os.replace(path + ".tmp", path)
    print(f"{summary(rep)} -> {path}", flush=True)
    return path


def plan(config, *, devices: Sequence[jax.Device] | None = None, compile: bool = True) -> dict:
    """The memory report of training ``config`` on ``devices`` (default: all), without allocating the state.

    The state comes from ``jax.eval_shape``; with ``compile`` the step is lowered and compiled on
    ``jax.ShapeDtypeStruct`` arguments carrying the shardings (no buffers), for ``step_peak_bytes``.
    Bad settings raise ValueError as they do at the start of training.
    """
    from jaxdiff.training.setup import make_parallel, resolve
    from jaxdiff.training.step import train_step
    from jaxdiff.training.workdir import load_workdir

    par = make_parallel(config, devices)
    run = resolve(config, num_devices=par.num_devices, load_workdir=load_workdir)
    key = jax.random.key(config.seed)
    state = par.abstract_state(jax.eval_shape(state_initializer(run), key))
    compiled = None
    if compile:
        step = par.compile_step(functools.partial(train_step, objective=run.objective))
        compiled = step.lower(state, abstract_batch(run, par), key).compile()
    return report(par, state, compiled)

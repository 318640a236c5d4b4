"""Data parallelism: the ONLY module that knows about ``pmap``, meshes and shardings.

Two modes place the same computation on the devices of every host:

* ``"pmap"`` (default): the state is replicated with a leading device axis, each local device
  gets ``B / num_devices`` examples, and the step averages gradients with ``lax.pmean``.
* ``"sharding"``: ``jax.jit`` over a 1-D ``Mesh`` named ``"data"``; the state is replicated
  (``PartitionSpec()``) and the global batch is one array sharded on its first axis
  (``PartitionSpec("data")``), so the batch mean *is* the global mean and XLA inserts the
  all-reduce.

Each host passes only its own slice of the global batch (``put_batch``); both modes donate
the previous state's buffers to the step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["MODES", "AXIS", "DataParallel"]

MODES = ("pmap", "sharding")
AXIS = "data"


def _host_copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


class DataParallel:
    """Placement of states and batches for one mode over a set of devices (all devices by default).

    Holds only the mode and the mesh: states, keys and batches are passed in and returned.
    """

    def __init__(self, mode: str = "pmap", devices: Sequence[jax.Device] | None = None):
        if mode not in MODES:
            raise ValueError(f"parallel.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.devices = list(jax.devices() if devices is None else devices)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
        self._any = None  # the compiled reduction of `any_process`

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    # ------------------------------------------------------------------ state
    def put_state(self, host_state):
        """Host pytree (identical on every process) -> device state for this mode."""
        host_state = _host_copy(host_state)  # never alias a buffer that the step will donate
        if self.mode == "pmap":  # stacked copies, laid out as the pmapped step's outputs are
            n = len(self.local_devices)
            stacked = NamedSharding(Mesh(np.array(self.local_devices), (AXIS,)), PartitionSpec(AXIS))
            return jax.tree_util.tree_map(
                lambda a: jax.device_put(np.broadcast_to(a[None], (n,) + a.shape), stacked), host_state)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_callback(a.shape, self._replicated, lambda idx: a[idx]), host_state
        )

    def get_state(self, state):
        """Device state -> host NumPy pytree (one replica)."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0))[0], state)
        return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), state)

    # ------------------------------------------------------------------ batches
    def put_batch(self, local_batch: dict[str, np.ndarray]):
        """This process's slice ``[B / num_processes, ...]`` of the global batch -> device batch."""
        if self.mode == "pmap":
            n = len(self.local_devices)
            return jax.tree_util.tree_map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]), local_batch)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self._batch_sharding, a), local_batch
        )

    # ------------------------------------------------------------------ steps
    def compile_step(self, step_fn: Callable) -> Callable:
        """``step_fn(state, batch, key, *, axis_name) -> (state, metrics)`` -> compiled step.

        The returned function takes ``(state, batch, key)`` placed by this object and donates
        ``state``.
        """
        if self.mode == "pmap":
            return jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS,
                            in_axes=(0, 0, None), donate_argnums=(0,), devices=self.devices)
        return jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=(0,),
                       out_shardings=(self._replicated, self._replicated))

    def get_metrics(self, metrics) -> dict[str, Any]:
        """Device metrics -> host floats (one replica)."""
        return {k: float(np.asarray(v.addressable_data(0)).reshape(-1)[0]) for k, v in metrics.items()}

    # ------------------------------------------------------------------ agreement between hosts
    def any_process(self, flag: bool):
        """Whether ``flag`` is set on any process, as a replicated device scalar (dispatched, not waited for).

        Every process must call it at the same point. Reading the result (``bool(...)``) waits for
        the steps queued before it, so the loop reads it one step later to keep the devices busy.
        One process takes the same path (one small dispatch per step; ``bench/stop_check.py``).
        """
        n = len(self.local_devices)
        flags = jax.make_array_from_process_local_data(self._batch_sharding, np.full((n,), int(flag), np.int32))
        if self._any is None:
            self._any = jax.jit(lambda a: a.max() > 0, out_shardings=self._replicated)
        return self._any(flags)

    def barrier(self, name: str) -> None:
        """Waits until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # ------------------------------------------------------------------ inference
    def put_replicated(self, tree):
        """Host or device pytree -> a copy of it on every device of this object (for :meth:`compile_batched`)."""
        return jax.device_put(tree, self._replicated)

    def compile_batched(self, fn: Callable) -> Callable:
        """``fn(params, *batch) -> outputs`` (every ``batch`` array and output ``[B, ...]``) -> a ``jax.jit``
        of it with ``params`` replicated and the batch axis sharded over this object's devices, in either
        mode. ``B`` must be a multiple of :attr:`num_devices`; the outputs are global arrays.
        Single-process: the devices must all be this process's (e.g. ``jax.local_devices()``)."""
        replicated, batch = self._replicated, self._batch_sharding
        jitted = jax.jit(fn, out_shardings=batch)

        def call(params, *args):
            return jitted(jax.device_put(params, replicated), *jax.device_put(args, batch))

        return call

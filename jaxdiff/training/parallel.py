"""Data parallelism and sharded state: the ONLY module that knows about ``pmap``, meshes and shardings.

Three modes place the same computation on the devices of every host:

* ``"pmap"`` (default): the state is replicated with a leading device axis, each local device
  gets ``B / num_devices`` examples, and the step averages gradients with ``lax.pmean``.
* ``"sharding"``: ``jax.jit`` over a 1-D ``Mesh`` named ``"data"``; the state is replicated
  (``PartitionSpec()``) and the global batch is one array sharded on its first axis
  (``PartitionSpec("data")``), so the batch mean *is* the global mean and XLA inserts the
  all-reduce.
* ``"fsdp"``: ``jax.jit`` over a 2-D ``Mesh`` ``("data", "fsdp")`` (sizes :func:`mesh_shape`); the
  batch is sharded over both axes and every leaf of the train state (parameters, optimizer
  state, EMA, post-hoc EMA) is sharded over ``"fsdp"`` on its largest axis divisible by the
  ``fsdp`` size (:func:`fsdp_spec`); leaves of fewer than ``MIN_SHARDED_SIZE`` (2^14) elements, or
  with no divisible axis, are replicated. The step is the same pure function: XLA inserts the
  all-gathers of the parameters and the reduce-scatters of the gradients.

The fsdp placement is decided by shape, not by logical axis names that the models would declare
(as maxdiffusion's ``logical_axis_rules`` do): every leaf of the state, including optax's
moments and the post-hoc EMA's ``[K, ...]`` stacks, then gets a placement without any model,
optimizer or EMA code naming its axes, a user's own network is sharded as it is, and the rule
is one function of a shape and a device count, so a state's per-device memory can be computed
from its shapes alone (:mod:`jaxdiff.training.memory`). For the data-parallel-plus-sharded-state
layout of FSDP any axis serves: the parameters are gathered whole before they are used.

Each host passes only its own slice of the global batch (``put_batch``); every mode donates
the previous state's buffers to the step. Checkpoints hold the unstacked global arrays
(:meth:`DataParallel.savable`, :meth:`DataParallel.restore_target`), so a state saved in one mode
and mesh restores in any other.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["MODES", "AXIS", "FSDP_AXIS", "MIN_SHARDED_SIZE", "DataParallel", "mesh_shape", "fsdp_spec"]

MODES = ("pmap", "sharding", "fsdp")
AXIS = "data"
FSDP_AXIS = "fsdp"
# Leaves with fewer elements than this (biases, norms' scales, step counters) stay replicated in
# fsdp mode: sharding them saves little memory and costs one collective each.
MIN_SHARDED_SIZE = 2**14


def _host_copy(tree):
    return jax.tree_util.tree_map(lambda a: np.array(a), tree)


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1) -> tuple[int, int]:
    """The fsdp mesh's ``(data, fsdp)`` sizes over ``num_devices`` devices; ``-1`` = all remaining devices.

    Raises ValueError naming ``parallel.data`` / ``parallel.fsdp`` unless both are positive or ``-1``
    (not both ``-1``) and their product is ``num_devices``.
    """
    for name, value in (("data", data), ("fsdp", fsdp)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or (value < 1 and value != -1):
            raise ValueError(f"parallel.{name}={value!r}: must be a positive integer or -1 (all remaining devices)")
    if data == -1 and fsdp == -1:
        raise ValueError("parallel.data=-1 and parallel.fsdp=-1: at most one of them may be -1")
    if data == -1 or fsdp == -1:
        known, name = (fsdp, "fsdp") if data == -1 else (data, "data")
        if num_devices % known:
            raise ValueError(f"parallel.{name}={known}: must divide the number of devices ({num_devices})")
        return (num_devices // known, known) if data == -1 else (known, num_devices // known)
    if data * fsdp != num_devices:
        raise ValueError(f"parallel.data={data} x parallel.fsdp={fsdp} = {data * fsdp}: must equal the number "
                         f"of devices ({num_devices}); set one of them to -1 to use all remaining devices")
    return int(data), int(fsdp)


def fsdp_spec(shape: Sequence[int], fsdp_size: int, *, min_size: int = MIN_SHARDED_SIZE) -> PartitionSpec:
    """Where a leaf of ``shape`` lives in fsdp mode: sharded over ``"fsdp"`` on its largest axis divisible by
    ``fsdp_size`` (the last such axis among equals), or replicated (``PartitionSpec()``) when it has fewer
    than ``min_size`` elements, no such axis, or ``fsdp_size`` is 1."""
    shape = tuple(int(d) for d in shape)
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return PartitionSpec()
    axes = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not axes:
        return PartitionSpec()
    axis = max(axes, key=lambda i: (shape[i], i))
    return PartitionSpec(*([None] * axis), FSDP_AXIS)


class DataParallel:
    """Placement of states and batches for one mode over a set of devices (all devices by default).

    ``data``, ``fsdp``: the fsdp mesh's sizes (:func:`mesh_shape`); ``min_shard_size``: the smallest leaf
    that is sharded (:func:`fsdp_spec`); both used in ``"fsdp"`` mode only.
    Holds only the mode and the mesh: states, keys and batches are passed in and returned.
    """

    def __init__(self, mode: str = "pmap", devices: Sequence[jax.Device] | None = None, *, data: int = 1,
                 fsdp: int = -1, min_shard_size: int = MIN_SHARDED_SIZE):
        if mode not in MODES:
            raise ValueError(f"parallel.mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        self.min_shard_size = int(min_shard_size)
        self.devices = list(jax.devices() if devices is None else devices)
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        if mode == "fsdp":
            shape = mesh_shape(len(self.devices), data, fsdp)
            self.mesh = Mesh(np.array(self.devices).reshape(shape), (AXIS, FSDP_AXIS))
            batch_axes = (AXIS, FSDP_AXIS)
        else:
            self.mesh = Mesh(np.array(self.devices), (AXIS,))
            batch_axes = AXIS
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batch_sharding = NamedSharding(self.mesh, PartitionSpec(batch_axes))
        self._any = None  # the compiled reduction of `any_process`

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def mesh_sizes(self) -> dict[str, int]:
        """The mesh's axis sizes, e.g. ``{"data": 1, "fsdp": 8}`` (pmap: ``{"data": num_devices}``)."""
        return {name: int(size) for name, size in self.mesh.shape.items()}

    # ------------------------------------------------------------------ state
    def state_shardings(self, state):
        """The sharding of each leaf of ``state`` (arrays or ``jax.ShapeDtypeStruct``, global unstacked shapes)
        in this mode: pmap's stacked copies over the local devices, replicated (sharding) or :func:`fsdp_spec`."""
        if self.mode == "pmap":
            stacked = NamedSharding(Mesh(np.array(self.local_devices), (AXIS,)), PartitionSpec(AXIS))
            return jax.tree_util.tree_map(lambda _: stacked, state)
        if self.mode == "sharding":
            return jax.tree_util.tree_map(lambda _: self._replicated, state)
        size = self.mesh.shape[FSDP_AXIS]
        return jax.tree_util.tree_map(lambda a: NamedSharding(self.mesh, fsdp_spec(np.shape(a), size,
                                                                                  min_size=self.min_shard_size)),
                                      state)

    def abstract_state(self, state):
        """``jax.ShapeDtypeStruct`` of each leaf of ``state`` as this mode places it (pmap: with the leading
        device axis), carrying its sharding: what :meth:`put_state` makes, without allocating it."""
        n = len(self.local_devices) if self.mode == "pmap" else None
        return jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(((n,) if n else ()) + tuple(np.shape(a)), a.dtype, sharding=s),
            state, self.state_shardings(state))

    def init_state(self, init_fn: Callable[[jax.Array], Any], key: jax.Array):
        """``init_fn(key) -> state`` -> the device state of this mode. In fsdp mode it runs under ``jax.jit``
        with the state's shardings as outputs, so no device ever holds the whole state; otherwise it runs
        as is and is placed by :meth:`put_state`."""
        if self.mode != "fsdp":
            return self.put_state(jax.device_get(init_fn(key)))
        shardings = self.state_shardings(jax.eval_shape(init_fn, key))
        return jax.jit(init_fn, out_shardings=shardings)(key)

    def put_state(self, state):
        """Host pytree (identical on every process), or a state restored by :meth:`restore_target` -> device
        state for this mode."""
        shardings = self.state_shardings(state)
        if self.mode == "pmap":  # stacked copies, laid out as the pmapped step's outputs are
            n = len(self.local_devices)
            return jax.tree_util.tree_map(
                lambda a, s: jax.device_put(np.broadcast_to(a[None], (n,) + a.shape), s), _host_copy(state), shardings)

        def put(a, s):
            if isinstance(a, jax.Array) and a.sharding == s:
                return a  # restored onto this mesh: never aliased by a host copy
            a = np.array(a)  # never alias a buffer that the step will donate
            return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])

        return jax.tree_util.tree_map(put, state, shardings)

    def get_state(self, state):
        """Device state -> host NumPy pytree (one replica; in fsdp mode the gathered shards)."""
        if self.mode == "pmap":
            return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0))[0], state)
        if self.mode == "sharding":
            return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), state)

        def gather(a):
            if a.is_fully_addressable:
                return np.asarray(a)
            from jax.experimental import multihost_utils  # every process must call get_state

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))

        return jax.tree_util.tree_map(gather, state)

    def savable(self, state):
        """The device state as a checkpoint holds it: the global unstacked arrays. In fsdp mode the sharded
        arrays themselves (each host writes its own shards); otherwise a host copy (:meth:`get_state`)."""
        return state if self.mode == "fsdp" else self.get_state(state)

    def restore_target(self, abstract_state):
        """What a checkpoint is restored into for this mode (``abstract_state``: shapes and dtypes of the
        unstacked state, e.g. from ``jax.eval_shape``): in fsdp mode ``jax.ShapeDtypeStruct`` carrying the
        shardings (each host reads only its shards); otherwise host NumPy arrays. Pass the restored state
        to :meth:`put_state`."""
        if self.mode != "fsdp":
            return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract_state)
        return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract_state, self.state_shardings(abstract_state))

    # ------------------------------------------------------------------ batches
    def put_batch(self, local_batch: dict[str, np.ndarray]):
        """This process's slice ``[B / num_processes, ...]`` of the global batch -> device batch."""
        if self.mode == "pmap":
            n = len(self.local_devices)
            return jax.tree_util.tree_map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]), local_batch)
        return jax.tree_util.tree_map(
            lambda a: jax.make_array_from_process_local_data(self._batch_sharding, a), local_batch
        )

    def abstract_batch(self, global_batch: dict[str, jax.ShapeDtypeStruct]):
        """``jax.ShapeDtypeStruct`` of the global batch ``[B, ...]`` -> those of :meth:`put_batch`'s result
        (pmap: ``[n, B / n, ...]`` per process; otherwise global, with the batch sharding)."""
        if self.mode == "pmap":
            n, per = len(self.local_devices), jax.process_count() * len(self.local_devices)
            return jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct((n, a.shape[0] // per) + tuple(a.shape[1:]), a.dtype), global_batch)
        return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._batch_sharding),
                                      global_batch)

    # ------------------------------------------------------------------ steps
    def compile_step(self, step_fn: Callable) -> Callable:
        """``step_fn(state, batch, key, *, axis_name) -> (state, metrics)`` -> compiled step.

        The returned function takes ``(state, batch, key)`` placed by this object and donates
        ``state``; its ``lower(state, batch, key)`` (arguments or ``jax.ShapeDtypeStruct`` from
        :meth:`abstract_state` / :meth:`abstract_batch`) lowers it ahead of time.
        """
        if self.mode == "pmap":
            return jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS,
                            in_axes=(0, 0, None), donate_argnums=(0,), devices=self.devices)
        if self.mode == "sharding":
            return jax.jit(functools.partial(step_fn, axis_name=None), donate_argnums=(0,),
                           out_shardings=(self._replicated, self._replicated))
        return _ShardedStep(functools.partial(step_fn, axis_name=None), self)

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
        of it with ``params`` replicated and the batch axis sharded over this object's devices, in any
        mode. ``B`` must be a multiple of :attr:`num_devices`; the outputs are global arrays.
        Single-process: the devices must all be this process's (e.g. ``jax.local_devices()``)."""
        replicated, batch = self._replicated, self._batch_sharding
        jitted = jax.jit(fn, out_shardings=batch)

        def call(params, *args):
            return jitted(jax.device_put(params, replicated), *jax.device_put(args, batch))

        return call


class _ShardedStep:
    """The fsdp step: ``jax.jit`` with the state's shardings as outputs, built for each state structure."""

    def __init__(self, fn: Callable, par: DataParallel):
        self._fn, self._par, self._jitted = fn, par, {}

    def _for(self, state):
        shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), state)
        key = (jax.tree_util.tree_structure(shapes), tuple((s.shape, str(s.dtype)) for s in
                                                          jax.tree_util.tree_leaves(shapes)))
        if key not in self._jitted:
            out = (self._par.state_shardings(shapes), self._par._replicated)
            self._jitted[key] = jax.jit(self._fn, donate_argnums=(0,), out_shardings=out)
        return self._jitted[key]

    def __call__(self, state, batch, key):
        return self._for(state)(state, batch, key)

    def lower(self, state, batch, key):
        return self._for(state).lower(state, batch, key)

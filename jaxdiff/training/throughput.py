"""How close a training run is to the hardware: images per second and model FLOPs utilisation (MFU).

``MFU = step_flops / step_seconds / peak_flops``, all per device:

* ``step_flops``: the FLOPs of one train step on one device, from XLA's cost analysis of the
  compiled step (:func:`compiled_flops`). XLA reports the program of one device: a ``pmap``'ed
  step, and a ``jit``'ed step over a mesh alike (a matmul sharded over 8 devices reports 1/8 of
  its FLOPs). XLA counts the body of a loop once, whatever its trip count, so the step of
  ``microbatches = k`` (a ``lax.scan`` over them) is counted as ``k`` times its reported FLOPs
  (:func:`step_flops`): the optimizer update, outside the loop, is then counted ``k`` times too,
  a negligible share of a network's forward and backward passes.
* ``peak_flops``: the device's peak dense bfloat16 FLOP/s (``PEAK_FLOPS``, matched on
  ``jax.Device.device_kind``), or a value given by the user (``config.train.peak_flops``).

Both count a multiply-add as 2 FLOPs. The model FLOPs are what XLA executes (recomputation by
``remat`` included), so with ``remat`` this is the hardware FLOPs utilisation.
"""

from __future__ import annotations

__all__ = ["PEAK_FLOPS", "peak_flops", "compiled_flops", "step_flops", "mfu"]

# Peak dense (no sparsity) bfloat16 FLOP/s of one device, matched in this order on a lower-cased
# substring of jax's device_kind (more specific names first: "tpu v5 lite" before "tpu v5").
# Sources: Cloud TPU system architecture pages (cloud.google.com/tpu/docs: v4, v5e, v5p, v6e per
# chip); NVIDIA data sheets (A100 Tensor Core GPU; H100 Tensor Core GPU, SXM and PCIe; H200 Tensor
# Core GPU, SXM), the bf16 Tensor Core figures without sparsity (the sheets' starred figures halved).
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v4", 275e12),  # device_kind "TPU v4"
    ("tpu v5 lite", 197e12),  # v5e: device_kind "TPU v5 lite"
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),  # v5p: device_kind "TPU v5"
    ("tpu v6 lite", 918e12),  # v6e (Trillium): device_kind "TPU v6 lite"
    ("tpu v6e", 918e12),
    ("a100", 312e12),  # "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB" (PCIe: the same figure)
    ("h100 pcie", 756e12),  # "NVIDIA H100 PCIe"
    ("h100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("h200", 989e12),  # SXM: "NVIDIA H200"
)


def peak_flops(device_kind: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device named ``device_kind`` (``jax.devices()[0].device_kind``).

    ``None`` for a device the table does not know (e.g. ``"cpu"``).
    """
    kind = device_kind.lower()
    for name, flops in PEAK_FLOPS:
        if name in kind:
            return flops
    return None


def compiled_flops(compiled) -> float | None:
    """The FLOPs of one device's program in ``compiled`` (``jax.jit(f).lower(...).compile()``).

    From ``compiled.cost_analysis()["flops"]`` (older jax returns a list of one dict per program);
    ``None`` where the backend reports none.
    """
    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without cost analysis: MFU is not logged
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or cost.get("flops") is None:
        return None
    flops = float(cost["flops"])
    return flops if flops > 0 else None


def step_flops(compiled, *, microbatches: int = 1) -> float | None:
    """The FLOPs of one train step on one device: :func:`compiled_flops` times ``microbatches``
    (XLA counts the accumulation loop's body once; see the module's docstring)."""
    flops = compiled_flops(compiled)
    return None if flops is None else flops * microbatches


def mfu(flops_per_step: float, steps_per_second: float, peak: float) -> float:
    """Model FLOPs utilisation: ``flops_per_step * steps_per_second / peak`` (per device; in [0, 1])."""
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak!r}")
    return flops_per_step * steps_per_second / peak

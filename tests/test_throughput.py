"""Throughput: the FLOPs of a compiled step, the peak FLOP/s table and the MFU in the training log."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.training import loop, throughput

from training_utils import tiny_config


def test_compiled_flops_of_a_matmul_are_2mnk():
    m, n, k = 64, 32, 48
    compiled = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
    assert throughput.compiled_flops(compiled) == 2 * m * n * k


def test_step_flops_count_each_microbatch():
    """XLA counts a scan's body once: step_flops multiplies it by the number of microbatches."""
    m, n, k, trips = 64, 32, 48, 4

    def f(a, b):
        return jax.lax.scan(lambda c, x: (c + x @ b, None), jnp.zeros((m, n)), a)[0]

    compiled = jax.jit(f).lower(jnp.ones((trips, m, k)), jnp.ones((k, n))).compile()
    flops = throughput.step_flops(compiled, microbatches=trips)
    np.testing.assert_allclose(flops, trips * (2 * m * n * k + m * n), rtol=1e-3)  # matmul + the carry's sum


def test_sharded_flops_are_per_device():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    m, n, k, d = 64, 32, 48, 8
    mesh = Mesh(np.array(jax.devices()[:d]), ("data",))
    a = jax.device_put(jnp.ones((d * m, k)), NamedSharding(mesh, PartitionSpec("data")))
    b = jax.device_put(jnp.ones((k, n)), NamedSharding(mesh, PartitionSpec()))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    assert throughput.compiled_flops(compiled) == 2 * m * n * k  # one device's share of 2 (d m) n k


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("cpu", None), ("Tesla V100-SXM2-16GB", None),
])
def test_peak_flops_table(kind, peak):
    assert throughput.peak_flops(kind) == peak


def test_mfu_formula():
    # 1e12 FLOPs per step at 50 steps/s on a 200 TFLOP/s device: 25%.
    assert throughput.mfu(1e12, 50.0, 200e12) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="peak"):
        throughput.mfu(1e12, 50.0, 0.0)


def test_log_has_mfu_when_the_peak_is_set(tmp_path):
    config = tiny_config(num_steps=2, checkpoint_every=2, peak_flops=1e12, microbatches=2)  # 2 per device
    loop.train_and_evaluate(config, str(tmp_path))
    with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows and all("mfu" in r and "images_per_sec" in r for r in rows)
    for r in rows:
        # the FLOPs per device and step implied by the logged MFU (mfu * peak / steps per second): the
        # tiny UNet's forward and backward on 2 of the 16 images (8 devices) and Adam, 1 MFLOP to 1 GFLOP
        flops = r["mfu"] * 1e12 / (r["images_per_sec"] / config.train.global_batch_size)
        assert 1e6 < flops < 1e9, r

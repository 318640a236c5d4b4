"""fsdp mode: the sharding rule, equality with one device, per-device memory, checkpoints that move
between meshes and modes, and ``jaxdiff-train --plan``."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import jaxdiff
from jaxdiff import data, objectives
from jaxdiff.models import get_model
from jaxdiff.training import loop, memory
from jaxdiff.training.parallel import DataParallel, fsdp_spec, mesh_shape
from jaxdiff.training.state import create_train_state, make_optimizer
from jaxdiff.training.step import train_step

from training_utils import ROOT, final_params, run, subprocess_env, tiny_config, train_command

SCHEDULE = jaxdiff.linear_schedule(100)


def test_mesh_shape_fills_in_minus_one_and_names_the_bad_setting():
    assert mesh_shape(8) == (1, 8)
    assert mesh_shape(8, 2, -1) == (2, 4)
    assert mesh_shape(8, -1, 4) == (2, 4)
    assert mesh_shape(8, 8, 1) == (8, 1)
    for args, match in (((8, 3, -1), "parallel.data=3"), ((8, 2, 2), "parallel.data=2 x parallel.fsdp=2"),
                        ((8, -1, -1), "at most one"), ((8, 0, -1), "parallel.data=0"), ((8, 1, -5), "parallel.fsdp")):
        with pytest.raises(ValueError, match=match):
            mesh_shape(*args)
    with pytest.raises(ValueError, match=r"config.parallel.data=1 x config.parallel.fsdp=3 = 3: must equal the number of devices \(8\)"):
        config = tiny_config()
        config.parallel.mode, config.parallel.fsdp = "fsdp", 3
        loop.train_and_evaluate(config, "/nonexistent-never-created")


def test_fsdp_spec_shards_the_largest_divisible_axis_of_large_leaves():
    assert fsdp_spec((3, 3, 64, 128), 8) == PartitionSpec(None, None, None, "fsdp")
    assert fsdp_spec((1000, 64, 3), 8) == PartitionSpec("fsdp")
    assert fsdp_spec((1000, 64, 3), 16) == PartitionSpec(None, "fsdp")  # 1000 is not divisible by 16
    assert fsdp_spec((2, 128, 128), 8) == PartitionSpec(None, None, "fsdp")  # ties: the last axis
    assert fsdp_spec((128,), 8) == PartitionSpec()  # small: replicated
    assert fsdp_spec((129, 127), 8) == PartitionSpec()  # no divisible axis
    assert fsdp_spec((128, 128), 1) == PartitionSpec()
    assert fsdp_spec((128,), 8, min_size=0) == PartitionSpec("fsdp")


def _host_state(model, posthoc=(0.05, 0.1)):
    tx = make_optimizer(1e-3, warmup_steps=0, grad_clip=1.0)
    return jax.device_get(create_train_state(jax.random.key(0), model, tx, (8, 8, 1), num_classes=10, ema_decay=0.9,
                                             label_dropout=0.3, posthoc_sigma_rels=posthoc))


def _train(model, mode, devices, num_steps=3):
    """``num_steps`` steps of ``model`` on digits over ``devices``; (host state, losses, placed state)."""
    source = data.make_source("digits")
    par = DataParallel(mode, devices=devices)
    objective = objectives.Diffusion(schedule=SCHEDULE)
    step = par.compile_step(lambda s, b, k, axis_name: train_step(s, b, k, objective, axis_name=axis_name))
    state = par.put_state(_host_state(model))
    placed = state
    losses = []
    for s in range(num_steps):
        batch = data.get_batch(source, s, global_batch_size=16, seed=0)
        state, metrics = step(state, par.put_batch(batch), jax.random.key(1))
        losses.append(par.get_metrics(metrics)["loss"])
        if s == 0:
            placed = jax.tree_util.tree_map(lambda a: a.sharding, state)
    return par.get_state(state), np.array(losses), placed


@pytest.mark.parametrize("preset", ["tiny", "dit_digits"])
def test_fsdp_on_8_devices_equals_one_device(preset):
    model = get_model(preset, num_classes=10)
    ref, ref_losses, _ = _train(model, "sharding", jax.devices()[:1])
    got, losses, shardings = _train(model, "fsdp", jax.devices()[:8])
    sharded = [s for s in jax.tree_util.tree_leaves(shardings) if s.spec != PartitionSpec()]
    assert sharded, "some leaves must be sharded for the test to mean anything"
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)  # as test_pmap_sharding_and_one_device_agree
    images = []
    for state in (got, ref):
        def net(x, t, p=state.ema_params):
            return model.apply({"params": p}, x, t, jnp.arange(x.shape[0]) % 10, train=False)

        x = jaxdiff.sample(SCHEDULE, net, jax.random.key(3), (10, 8, 8, 1), sampler="ddim", num_steps=5)
        images.append(np.asarray(jaxdiff.to_uint8(x)).astype(int))
    assert np.abs(images[0] - images[1]).max() <= 1


def test_state_bytes_per_device_are_an_eighth_for_the_sharded_leaves():
    host = _host_state(get_model("tiny", num_classes=10))
    fsdp, replicated = DataParallel("fsdp"), DataParallel("sharding")
    a, b = fsdp.put_state(host), replicated.put_state(host)
    sharded = full = 0
    for x, y, h in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), jax.tree_util.tree_leaves(host)):
        shard, copy = x.addressable_shards[0].data.nbytes, y.addressable_shards[0].data.nbytes
        assert copy == h.nbytes
        big = h.size >= 2**14 and any(d % 8 == 0 for d in h.shape)  # the documented rule, restated
        assert shard == (h.nbytes // 8 if big else h.nbytes)
        if big:
            sharded, full = sharded + shard, full + copy
    assert full > 0 and sharded * 8 == full
    total = sum(h.nbytes for h in jax.tree_util.tree_leaves((host.params, host.opt_state, host.ema_params,
                                                              host.posthoc_ema)))
    rep_a, rep_b = memory.report(fsdp, a), memory.report(replicated, b)
    assert rep_b["state_bytes_per_device"] == total
    assert rep_a["state_bytes_per_device"] == total - full + sharded
    assert rep_a["mesh"] == {"data": 1, "fsdp": 8} and rep_b["mesh"] == {"data": 8}


def _fsdp_config(num_steps, mode="fsdp"):
    config = tiny_config(num_steps=num_steps)
    config.parallel.mode = mode
    config.parallel.min_shard_size = 0  # the tiny model's leaves are small: shard every divisible one
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step pmap run of the tiny config on 8 devices (checkpoints at 2, 4, 6)."""
    workdir = str(tmp_path_factory.mktemp("ref"))
    loop.train_and_evaluate(_fsdp_config(6, "pmap"), workdir)
    return workdir


@pytest.fixture(scope="module")
def fsdp_four(tmp_path_factory):
    """A 4-step fsdp run of the tiny config on 8 devices (checkpoints at 2 and 4)."""
    workdir = str(tmp_path_factory.mktemp("fsdp"))
    loop.train_and_evaluate(_fsdp_config(4), workdir)
    return workdir


def _assert_close(got, ref):
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


def test_the_loop_writes_memory_json_from_the_shardings(fsdp_four):
    rep = json.load(open(os.path.join(fsdp_four, "memory.json")))
    _, leaves = final_params(fsdp_four)  # params then EMA params, as saved
    params = leaves[:len(leaves) // 2]
    expected = sum(p.nbytes // 8 if any(d % 8 == 0 for d in p.shape) else p.nbytes for p in params)
    assert rep["params_bytes_per_device"] == expected
    assert rep["ema_bytes_per_device"] == expected  # no post-hoc EMA
    # Adam's two moments, and two int32 step counts (Adam's and the warmup schedule's), replicated
    assert rep["opt_state_bytes_per_device"] == 2 * expected + 8
    assert rep["state_bytes_per_device"] == 4 * expected + 8
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 1, "fsdp": 8} and rep["mode"] == "fsdp"
    assert rep["step_peak_bytes"] is None or rep["step_peak_bytes"] > rep["state_bytes_per_device"]


def test_a_pmap_checkpoint_resumes_in_fsdp_mode(reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
    loop.train_and_evaluate(_fsdp_config(6), workdir)
    step, got = final_params(workdir)
    assert step == 6
    _assert_close(got, final_params(reference)[1])


@pytest.mark.slow
@pytest.mark.parametrize("mode, devices", [("pmap", 2), ("sharding", 4)])
def test_an_fsdp_checkpoint_resumes_on_other_devices_and_modes(reference, fsdp_four, tmp_path, mode, devices):
    workdir = tmp_path / "w"
    shutil.copytree(fsdp_four, workdir)
    flags = ["--config.train.num_steps=6", "--config.train.checkpoint_every=2", f"--config.parallel.mode={mode}",
             "--config.parallel.min_shard_size=0"]
    run(train_command(workdir, *flags), subprocess_env(devices))
    step, got = final_params(str(workdir))
    assert step == 6
    _assert_close(got, final_params(reference)[1])


def _plan_env():
    env = subprocess_env(1)
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # --plan_devices sets the device count
    return env


def test_plan_of_dit_xl_2_on_64_devices_matches_the_formula(tmp_path):
    """DiT-XL/2 at batch 256 on 64 simulated devices, without allocating its 11 GB of state; the step
    is not compiled here (``--noplan_compile``: minutes on CPU for this model)."""
    k = 2  # post-hoc EMA copies
    cmd = [sys.executable, "-m", "jaxdiff.scripts.train", "--config", os.path.join(ROOT, "jaxdiff/configs/digits.py"),
           f"--workdir={tmp_path}", "--plan", "--plan_devices=64", "--noplan_compile",
           "--config.model.preset=dit_xl_2", "--config.data.image_size=32", "--config.eval.final_samples=0",
           "--config.parallel.mode=fsdp", "--config.train.global_batch_size=256",
           "--config.train.posthoc_ema.sigma_rels=(0.05, 0.1)"]
    proc = run(cmd, _plan_env())
    rep = json.load(open(tmp_path / "memory.json"))
    assert "memory per device" in proc.stdout and rep["devices"] == 64 and rep["mesh"] == {"data": 1, "fsdp": 64}
    assert rep["step_peak_bytes"] is None
    # The parameters' shapes, from the network alone (no state, no optimizer).
    model = get_model("dit_xl_2", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)),
                                               jnp.zeros((1,), jnp.int32), train=False)["params"])
    sizes = [math.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)]
    assert 6.7e8 < sum(sizes) < 6.8e8  # DiT-XL/2's 675M
    small = sum(n for n, s in zip(sizes, jax.tree_util.tree_leaves(shapes))
                if n < 2**14 or not any(d % 64 == 0 for d in s.shape))  # replicated leaves
    per_copy = 4 * ((sum(sizes) - small) / 64 + small)  # float32 bytes of one copy of the params per device
    copies = 1 + 2 + 1 + k  # params, Adam's two moments, EMA, post-hoc EMAs
    assert rep["state_bytes_per_device"] == pytest.approx(copies * per_copy, rel=0.01)
    assert rep["params_bytes_per_device"] == pytest.approx(per_copy, rel=0.01)
    assert rep["ema_bytes_per_device"] == pytest.approx((1 + k) * per_copy, rel=0.01)
    # Sharding cuts the state ~64x: the replicated mode's figure, by the same formula.
    assert rep["state_bytes_per_device"] < copies * 4 * sum(sizes) / 50


def test_plan_compiles_the_step_of_a_small_run(tmp_path):
    cmd = train_command(tmp_path, "--plan", "--plan_devices=4", "--config.parallel.mode=fsdp",
                        "--config.parallel.data=2", "--config.parallel.min_shard_size=0")
    run(cmd, _plan_env())
    rep = json.load(open(tmp_path / "memory.json"))
    assert rep["mesh"] == {"data": 2, "fsdp": 2} and rep["step_peak_bytes"] > rep["state_bytes_per_device"] > 0
    assert not os.path.exists(tmp_path / "checkpoints")


def test_plan_flags_without_plan_are_an_error(tmp_path):
    proc = subprocess.run(train_command(tmp_path, "--plan_devices=4"), env=_plan_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 1 and "error: --plan_devices" in proc.stderr


def test_compile_batched_and_any_process_work_on_the_fsdp_mesh():
    par = DataParallel("fsdp", data=2)
    w = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    x = np.random.default_rng(0).normal(size=(16, 3)).astype(np.float32)
    out = par.compile_batched(lambda p, a: a @ p)(par.put_replicated(w), x)
    np.testing.assert_allclose(np.asarray(out), x.astype(np.float64) @ w, rtol=1e-5)
    assert not bool(par.any_process(False)) and bool(par.any_process(True))

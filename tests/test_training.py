"""The training job: device-count independence, resumption, failure handling, sampling."""

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data, objectives
from jaxdiff.training import loop
from jaxdiff.training.parallel import DataParallel
from jaxdiff.training.setup import make_model, make_schedule
from jaxdiff.training.state import create_train_state, make_optimizer
from jaxdiff.training.step import train_step

from training_utils import final_params, run, subprocess_env, tiny_config, train_command


def _run_steps(config, mode, devices, num_steps=3):
    """Runs `num_steps` train steps of the tiny config with `mode` over `devices`; returns host state."""
    source = data.make_source("digits")
    model = make_model(config.model, num_classes=10, learned_variance=False)
    tx = make_optimizer(1e-3, warmup_steps=0, grad_clip=1.0)
    host = jax.device_get(create_train_state(jax.random.key(0), model, tx, (8, 8, 1), num_classes=10, ema_decay=0.9,
                                             label_dropout=0.3))
    par = DataParallel(mode, devices=devices)
    objective = objectives.Diffusion(schedule=make_schedule(config.diffusion))
    step = par.compile_step(lambda s, b, k, axis_name: train_step(s, b, k, objective, axis_name=axis_name))
    state = par.put_state(host)
    for s in range(num_steps):
        batch = data.get_batch(source, s, global_batch_size=16, seed=0)
        state, metrics = step(state, par.put_batch(batch), jax.random.key(1))
    assert par.get_metrics(metrics)["finite"] == 1.0
    return par.get_state(state)


def test_pmap_sharding_and_one_device_agree():
    config = tiny_config()
    devs = jax.devices()
    assert len(devs) >= 4, "conftest sets 8 fake CPU devices"
    ref = _run_steps(config, "sharding", devs[:1])
    for mode, n in (("pmap", 4), ("sharding", 4)):
        got = _run_steps(config, mode, devs[:n])
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            # atol: Adam normalises near-zero gradients, so another reduction order moves ~1e-6 params by ~1e-5
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5, err_msg=f"{mode} on {n} devices")
        assert int(got.step) == 3


def test_nonfinite_update_is_not_applied():
    config = tiny_config()
    model = make_model(config.model, num_classes=None, learned_variance=False)
    tx = make_optimizer(1e-3)
    state = create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
    batch = {"image": jnp.full((4, 8, 8, 1), jnp.nan), "index": jnp.arange(4)}
    new, metrics = train_step(state, batch, jax.random.key(0), objectives.from_config(config.diffusion))
    assert float(metrics["finite"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert int(new.step) == 1


HOOK_CALLS = []


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(tiny_config(), workdir, hooks=[HOOK_CALLS.append])
    return workdir


def test_loop_writes_checkpoints_metrics_and_grid(trained_workdir):
    steps = sorted(int(s) for s in os.listdir(os.path.join(trained_workdir, "checkpoints")) if s.isdigit())
    assert steps == [2, 4, 6]
    assert HOOK_CALLS == [1, 2, 3, 4, 5, 6]  # each step hook once, with the number of completed steps
    rows = [json.loads(line) for line in open(os.path.join(trained_workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_sec"] > 0 for r in rows)
    assert os.path.exists(os.path.join(trained_workdir, "samples", "final.png"))
    assert os.listdir(os.path.join(trained_workdir, "tensorboard"))


def test_sample_script_is_deterministic(trained_workdir, tmp_path):
    from jaxdiff.training.generate import sample_workdir

    outs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        path = sample_workdir(trained_workdir, str(tmp_path / f"{name}.npz"), num_samples=12, seed=seed,
                              num_steps=3, batch_size=8)
        outs.append(np.load(path))
        assert os.path.exists(tmp_path / f"{name}.png")
    assert outs[0]["images"].shape == (12, 8, 8, 1) and outs[0]["images"].dtype == np.uint8
    np.testing.assert_array_equal(outs[0]["labels"], [0] * 10 + [1] * 2)  # the grid order (grid_labels)
    np.testing.assert_array_equal(outs[0]["images"], outs[1]["images"])
    assert not np.array_equal(outs[0]["images"], outs[2]["images"])
    with pytest.raises(ValueError, match="sampler"):
        sample_workdir(trained_workdir, str(tmp_path / "x.npz"), num_samples=2, sampler="nope")


def test_grid_labels_give_each_class_one_grid_row():
    """The layout ``sample_workdir`` documents: class ``r`` fills row ``r`` of a ``num_classes``-column grid."""
    from jaxdiff.training.images import grid_labels

    np.testing.assert_array_equal(grid_labels(20, 10), [0] * 10 + [1] * 10)
    np.testing.assert_array_equal(grid_labels(7, 3), [0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(grid_labels(11, 2), [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1])  # rows wrap around
    np.testing.assert_array_equal(grid_labels(4, None), [0, 0, 0, 0])
    assert grid_labels(20, 10).dtype == np.int32


def test_nonfinite_loss_stops_the_job_and_checkpoints_stay_finite(tmp_path, monkeypatch):
    real = data.batch_iterator

    def poisoned(*args, **kwargs):
        for step, batch in real(*args, **kwargs):
            if step == 4:
                batch = dict(batch, image=np.full_like(batch["image"], np.nan))
            yield step, batch

    class Wrapper:
        def __init__(self, *a, **k):
            self.gen = poisoned(*a, **k)

        def __iter__(self):
            return self.gen

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    monkeypatch.setattr(loop.data, "batch_iterator", Wrapper)
    with pytest.raises(FloatingPointError, match="step 5"):
        loop.train_and_evaluate(tiny_config(), str(tmp_path))
    step, leaves = final_params(str(tmp_path))
    assert step == 4
    assert all(np.all(np.isfinite(x)) for x in leaves)


@pytest.mark.parametrize("setting, value, match", [
    ("data.name", "no_such_dataset", "data.name"),
    ("train.global_batch_size", 12, "train.global_batch_size"),
    ("train.num_steps", 0, "train.num_steps"),
    ("sample.sampler", "no_such_sampler", "sample.sampler"),
    ("model.ch_mult", (1, 2, 2, 2, 2), "ch_mult"),  # 8x8 cannot be halved four times
    ("data.image_size", 6, "image_size"),  # with ch_mult (1, 2, 2), 6 cannot be halved twice
])
def test_bad_config_fails_at_start(tmp_path, setting, value, match):
    config = tiny_config()
    section, name = setting.split(".")
    config[section][name] = value
    if setting == "data.image_size":
        config.model.ch_mult = (1, 2, 2)
    with pytest.raises(ValueError, match=match):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not os.listdir(os.path.join(tmp_path, "checkpoints")) if os.path.exists(tmp_path / "checkpoints") else True


@pytest.mark.slow
def test_bad_config_message_from_the_script(tmp_path):
    proc = subprocess.run(train_command(tmp_path / "w", "--config.train.global_batch_size=12"),
                          env=subprocess_env(8), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "config.train.global_batch_size=12" in proc.stderr and "divisible" in proc.stderr


@pytest.mark.slow
def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path):
    env = subprocess_env(2)
    steps = ["--config.train.num_steps=12", "--config.train.checkpoint_every=2"]
    run(train_command(tmp_path / "ref", *steps), env)
    workdir = tmp_path / "killed"
    rng = np.random.default_rng(int(time.time()))
    proc = subprocess.Popen(train_command(workdir, *steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.0))  # a random moment after the first checkpoint began
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(train_command(workdir, *steps), env)
    step_ref, ref = final_params(str(tmp_path / "ref"))
    step_got, got = final_params(str(workdir))
    assert step_ref == step_got == 12
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_two_process_distributed_run_matches_one_process(tmp_path):
    import portpicker

    steps = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
    run(train_command(tmp_path / "one", *steps), subprocess_env(4))
    port = portpicker.pick_unused_port()
    workdir = tmp_path / "two"
    procs = [subprocess.Popen(train_command(workdir, *steps, f"--coordinator_address=localhost:{port}",
                                            "--num_processes=2", f"--process_id={i}"),
                              env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    _, ref = final_params(str(tmp_path / "one"))
    _, got = final_params(str(workdir))
    for a, b in zip(got, ref):
        # atol as in test_pmap_sharding_and_one_device_agree: near-zero params move ~1e-6 with the reduction order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


def test_eval_reports_finite_bits_per_dim(trained_workdir, capsys):
    from jaxdiff.training.evaluate import evaluate_workdir

    capsys.readouterr()
    out = evaluate_workdir(trained_workdir, num_examples=8, ode_examples=1, batch_size=4)
    err = capsys.readouterr().err  # both parts show a progress bar, ending complete
    assert "bits/dim (bound): 100%" in err and " 2/2 " in err and "bits/dim (PF-ODE): 100%" in err
    # An undertrained model: finite, and far above 0 bits/dim; an 8-bit pixel costs at most ~8 bits
    # under any sensible density, but the bound of a 6-step model may exceed that, so only sanity.
    assert np.isfinite(out["vlb_bpd"]) and out["vlb_bpd"] > 0
    assert np.isfinite(out["ode_bpd"]) and out["ode_nfe"] > 0


@pytest.mark.parametrize("objective", ["diffusion", "flow_matching"])
def test_first_step_loss_matches_the_objective_at_a_zero_network(objective):
    """The UNet's output layer starts at zero, so the first loss is E||target||^2: E[eps^2] = 1 for
    epsilon prediction and E[(eps - x0)^2] = 1 + E[x0^2] for flow matching (statistical check)."""
    config = tiny_config()
    config.diffusion.objective = objective
    model = make_model(config.model, num_classes=None, learned_variance=False)
    tx = make_optimizer(1e-3)
    state = create_train_state(jax.random.key(0), model, tx, (8, 8, 1))
    batch = data.get_batch(data.make_source("digits"), 0, global_batch_size=256, seed=0)
    _, metrics = jax.jit(train_step)(state, {"image": jnp.asarray(batch["image"]),
                                             "index": jnp.asarray(batch["index"])},
                                     jax.random.key(3), objectives.from_config(config.diffusion))
    x0_sq = float(np.mean(batch["image"].astype(np.float64) ** 2))
    want = 1.0 if objective == "diffusion" else 1.0 + x0_sq
    n = batch["image"].size  # chi-square mean of n terms: relative sd sqrt(2/n) for eps^2
    assert abs(float(metrics["loss"]) - want) < 5 * want * np.sqrt(2.0 / n) + 0.02


def test_flow_matching_config_trains_and_samples(tmp_path):
    config = tiny_config(num_steps=2, checkpoint_every=2)
    config.diffusion.objective = "flow_matching"
    config.sample.sampler = "heun"
    loop.train_and_evaluate(config, str(tmp_path))
    assert os.path.exists(tmp_path / "samples" / "final.png")
    bad = tiny_config()
    bad.diffusion.objective = "flow_matching"
    bad.sample.sampler = "dpm_solver++"
    with pytest.raises(ValueError, match="sample.sampler"):
        loop.train_and_evaluate(bad, str(tmp_path / "bad"))

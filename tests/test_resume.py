"""Unattended runs: damaged checkpoints, config drift on resume, metrics on restart, signals, disk errors."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxdiff import data
from jaxdiff.training import checkpoint, loop, resume
from jaxdiff.training.preemption import Stopped

from training_utils import final_params, run, subprocess_env, tiny_config, train_command


def _steps(workdir):
    return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def _metric_steps(workdir):
    return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run of the tiny config (checkpoints at 2, 4, 6)."""
    workdir = str(tmp_path_factory.mktemp("ref"))
    loop.train_and_evaluate(tiny_config(num_steps=6), workdir)
    return final_params(workdir)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A 4-step run of the tiny config (checkpoints at 2 and 4), copied by the tests that resume it."""
    workdir = str(tmp_path_factory.mktemp("four"))
    loop.train_and_evaluate(tiny_config(num_steps=4), workdir)
    return workdir


def _damage(workdir, how):
    """Damages the checkpoint of step 4 (truncated, half-deleted) or adds a foreign folder as step 6."""
    if how == "foreign":
        os.makedirs(os.path.join(workdir, "checkpoints", "6"))
        with open(os.path.join(workdir, "checkpoints", "6", "README.txt"), "w") as f:
            f.write("notes\n")
        return 6
    state_dir = os.path.join(workdir, "checkpoints", "4", "state")
    if how == "truncated":
        files = [os.path.join(d, f) for d, _, fs in os.walk(state_dir) for f in fs]
        largest = max(files, key=os.path.getsize)
        os.truncate(largest, os.path.getsize(largest) // 2)
    else:
        os.remove(os.path.join(state_dir, "_METADATA"))
    return 4


@pytest.mark.parametrize("how", ["truncated", "no_metadata", "foreign"])
def test_damaged_newest_checkpoint_is_skipped_and_set_aside(tmp_path, reference, four_steps, how, caplog):
    from jaxdiff.training.generate import sample_workdir
    from jaxdiff.training.workdir import load_workdir

    workdir = shutil.copytree(four_steps, tmp_path / "w")
    bad = _damage(workdir, how)
    good = 2 if bad == 4 else 4
    bad_dir = os.path.join(workdir, "checkpoints", str(bad))
    caplog.set_level(logging.WARNING, logger="jaxdiff")
    assert load_workdir(workdir).step == good  # read-only consumers skip it and leave it in place
    assert checkpoint.read_config(str(workdir))["train"]["num_steps"] == 4
    assert bad_dir in caplog.text
    out = np.load(sample_workdir(workdir, str(tmp_path / "s.npz"), num_samples=2, num_steps=2))
    assert out["images"].shape == (2, 8, 8, 1)
    assert os.path.isdir(bad_dir)
    caplog.clear()

    loop.train_and_evaluate(tiny_config(num_steps=6), workdir)
    assert bad_dir in caplog.text and f"{bad}.damaged-0" in caplog.text
    assert os.listdir(os.path.join(workdir, "checkpoints", f"{bad}.damaged-0"))  # moved aside, not deleted
    assert _steps(workdir) == [2, 4, 6]
    step_ref, ref = reference
    step, got = final_params(workdir)
    assert step == step_ref == 6
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    assert _metric_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_no_restorable_checkpoint_is_an_error_listing_the_tries(tmp_path, four_steps):
    workdir = shutil.copytree(four_steps, tmp_path / "w")
    for step in (2, 4):
        os.remove(os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA"))
    with pytest.raises(ValueError, match="no checkpoint .* restores completely .*step 4: .*step 2: "):
        loop.train_and_evaluate(tiny_config(num_steps=6), str(workdir))
    assert _steps(workdir) == [2, 4]  # left in place


def test_config_drift_is_refused_and_allowed_changes_are_recorded(tmp_path, four_steps):
    workdir = str(shutil.copytree(four_steps, tmp_path / "w"))
    saved = open(os.path.join(workdir, "config.json"), encoding="utf-8").read()
    changed = tiny_config(num_steps=6)
    changed.model.ch = 16
    changed.diffusion.objective = "flow_matching"
    changed.sample.sampler = "heun"  # allowed, so not listed
    with pytest.raises(ValueError) as info:
        loop.train_and_evaluate(changed, workdir)
    message = str(info.value)
    assert "model.ch: 8 -> 16" in message and "diffusion.objective: 'diffusion' -> 'flow_matching'" in message
    assert "sample.sampler" not in message and "new run" in message
    assert open(os.path.join(workdir, "config.json"), encoding="utf-8").read() == saved
    assert _steps(workdir) == [2, 4]

    loop.train_and_evaluate(tiny_config(num_steps=6), workdir)
    history = [json.loads(line) for line in open(os.path.join(workdir, resume.HISTORY_FILE), encoding="utf-8")]
    assert [h["step"] for h in history] == [0, 4]
    assert history[0]["changes"] == {} and history[1]["changes"] == {"train.num_steps": [4, 6]}
    assert history[1]["config"]["train"]["num_steps"] == 6
    assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 6
    assert _metric_steps(workdir) == [1, 2, 3, 4, 5, 6]


def test_a_flow_config_cannot_resume_a_diffusion_workdir():
    from jaxdiff.configs import digits, digits_flow

    saved, current = digits.get_config().to_dict(), digits_flow.get_config().to_dict()
    with pytest.raises(ValueError, match="diffusion.objective: 'diffusion' -> 'flow_matching'"):
        resume.check_resume(saved, current, workdir="w", step=100)


def test_switching_on_posthoc_ema_is_refused():
    """Post-hoc EMA profiles are part of the train state: a workdir resumes only with its own."""
    saved = tiny_config().to_dict()
    current = tiny_config().to_dict()
    current["train"]["posthoc_ema"]["sigma_rels"] = (0.05, 0.1)
    with pytest.raises(ValueError, match=r"train.posthoc_ema.sigma_rels: \[\] -> \[0.05, 0.1\]"):
        resume.check_resume(saved, current, workdir="w", step=100)


def test_the_evaluation_settings_may_change_on_resume():
    """``eval.*`` decides what is measured, not what is trained: a smoke run may resume with fewer samples."""
    saved = tiny_config().to_dict()
    current = tiny_config().to_dict()
    current["eval"].update(final_samples=50, num_samples=20, every=10, sampler="ddpm", steps=5, batch_size=25)
    assert resume.check_resume(saved, current, workdir="w", step=4) == {
        "eval.batch_size": (250, 25), "eval.every": (0, 10), "eval.final_samples": (0, 50),
        "eval.num_samples": (1000, 20), "eval.sampler": ("", "ddpm"), "eval.steps": (0, 5)}


def test_unset_model_fields_equal_the_presets_values():
    saved = tiny_config().to_dict()
    saved["model"].update(preset="digits", ch=None, ch_mult=None)
    current = tiny_config().to_dict()
    current["model"].update(preset="digits", ch=32, ch_mult=(1, 1))  # the digits preset's values
    assert resume.config_changes(saved, current) == {}
    current["model"]["ch"] = 64
    assert resume.config_changes(saved, current) == {"model.ch": (32, 64)}
    current["parallel"]["mode"] = "sharding"
    assert resume.check_resume(saved, dict(current, model=saved["model"]), workdir="w", step=1) == {
        "parallel.mode": ("pmap", "sharding")}


def test_metrics_past_the_checkpoint_are_dropped_on_restart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    loop._truncate_metrics(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def _signal_at(step_to_signal, signum):
    real = data.batch_iterator

    class Wrapper:
        def __init__(self, *a, **k):
            self.gen = real(*a, **k)

        def __iter__(self):
            for step, batch in self.gen:
                if step == step_to_signal:
                    os.kill(os.getpid(), signum)
                yield step, batch

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    return Wrapper


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_at_a_step_boundary_with_a_checkpoint(tmp_path, reference, monkeypatch, signum):
    workdir = str(tmp_path)
    before = signal.getsignal(signum)
    monkeypatch.setattr(loop.data, "batch_iterator", _signal_at(2, signum))  # during the third step
    with pytest.raises(Stopped) as info:
        loop.train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=4), workdir)
    assert info.value.step == 4 and info.value.exit_code == 128 + signum  # read one step after it arrived
    assert signal.getsignal(signum) == before
    assert _steps(workdir) == [4] and _metric_steps(workdir) == [1, 2, 3, 4]
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM from here
    monkeypatch.undo()
    loop.train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=4), workdir)
    _, ref = reference
    step, got = final_params(workdir)
    assert step == 6
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_workdir_that_is_a_file_fails_before_any_work(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        loop.train_and_evaluate(tiny_config(), str(path))


def test_a_failed_async_save_stops_the_run_at_the_next_step(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = ocp.CheckpointManager.check_for_errors

    def failing(self):
        real(self)
        if self.all_steps():  # the first save (step 2) has been written: report it failed (disk full)
            calls["n"] += 1
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", failing)
    with pytest.raises(OSError, match="checkpoint of step 2 .* failed: .*No space left") as info:
        loop.train_and_evaluate(tiny_config(num_steps=6), str(tmp_path))
    assert calls["n"] >= 1 and "step 4" not in str(info.value)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints", "4"))


def signalled_command(at: int, workdir, *extra):
    """The training command, with SIGTERM sent to the process by a step hook after step ``at``."""
    cmd = train_command(workdir, *extra)
    return [sys.executable, os.path.join(os.path.dirname(__file__), "signal_at_step.py"), str(at),
            *cmd[cmd.index("--config"):]]


@pytest.mark.slow
def test_sigterm_during_a_run_then_resume_matches_uninterrupted_run(tmp_path):
    env = subprocess_env(2)
    steps = ["--config.train.num_steps=30", "--config.train.checkpoint_every=5"]
    run(train_command(tmp_path / "ref", *steps), env)
    workdir = tmp_path / "stopped"
    proc = subprocess.run(signalled_command(7, workdir, *steps), env=env, capture_output=True, text=True,
                          timeout=600)  # SIGTERM between checkpoints (5 and 10), while step 8 is queued
    err = proc.stderr
    assert proc.returncode == 143, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("stopped by SIGTERM at step")]
    assert line and "same command" in line[0], err[-3000:]
    stopped_at = int(line[0].split("at step ")[1].split(";")[0])
    assert 7 <= stopped_at < 10 and stopped_at in _steps(workdir)  # stopped within a step or two, not at 10
    assert _metric_steps(workdir) == list(range(1, stopped_at + 1))
    run(train_command(workdir, *steps), env)
    _, ref = final_params(str(tmp_path / "ref"))
    step, got = final_params(str(workdir))
    assert step == 30
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
    assert _metric_steps(workdir) == list(range(1, 31))


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """Two processes x 2 devices: SIGTERM to one stops both at one step; the same command resumes,
    and the result is bitwise the uninterrupted 2-process run's (over 40 steps the reduction order
    of another device layout moves near-zero parameters by more than any useful tolerance; the
    2-process == 1-process check is tests/test_training.py's, over 4 steps)."""
    import portpicker

    workdir = tmp_path / "two"
    steps = ["--config.train.num_steps=40", "--config.train.checkpoint_every=5"]

    def two_processes(workdir=workdir, signal_at=None):
        port = portpicker.pick_unused_port()
        flags = [*steps, f"--coordinator_address=localhost:{port}", "--num_processes=2"]
        # Process 1 alone gets SIGTERM (from its step hook); process 0 must learn it from process 1.
        return [subprocess.Popen(signalled_command(signal_at, workdir, *flags, f"--process_id={i}")
                                 if signal_at is not None and i == 1 else
                                 train_command(workdir, *flags, f"--process_id={i}"),
                                 env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for i in range(2)]

    procs = two_processes(signal_at=12)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [143, 143], errs[0][-2000:] + errs[1][-2000:]
    stopped = [int(e.split("stopped by SIGTERM at step ")[1].split(";")[0]) for e in errs]
    assert stopped[0] == stopped[1] and 12 <= stopped[0] < 15 and stopped[0] in _steps(workdir)
    assert _metric_steps(workdir) == list(range(1, stopped[0] + 1))
    for p in two_processes():  # the same command resumes
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    for p in two_processes(tmp_path / "ref"):  # the uninterrupted run
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    _, ref = final_params(str(tmp_path / "ref"))
    step, got = final_params(str(workdir))
    assert step == 40 and _metric_steps(workdir) == list(range(1, 41))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a, b)

"""The training loop: composes data, the pure step, data parallelism, checkpoints and sampling.

``train_and_evaluate(config, workdir)`` runs (or resumes) a job. Every process of a
multi-host job runs it; process 0 alone writes metrics and images.

Start-up, before any step: the workdir must be writable; the newest checkpoint that restores
completely is resumed (damaged newer ones are skipped with a warning and moved aside to
``checkpoints/STEP.damaged-N``); its config must agree with the current one
(:mod:`jaxdiff.training.resume`); then ``config.json`` is written, the start appended to
``config_history.jsonl`` and ``metrics.jsonl`` cut back to the resumed step (TensorBoard event
files are append-only: after a restart they may show the steps past the checkpoint twice).
SIGTERM / SIGINT stop the run at a step boundary with a checkpoint (:mod:`jaxdiff.training.preemption`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxdiff import data
from jaxdiff.training import checkpoint, memory, phema, quality, resume, throughput
from jaxdiff.training import images as imgs
from jaxdiff.training.preemption import Stopped, StopSignals
from jaxdiff.training.setup import make_parallel, resolve
from jaxdiff.training.step import train_step
from jaxdiff.training.workdir import load_workdir

__all__ = ["train_and_evaluate", "MetricsWriter"]

log = logging.getLogger("jaxdiff")


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard event files (process 0 only).

    ``start``: the step the run starts from; rows of later steps (written by a run that stopped
    before its next checkpoint) are dropped from ``metrics.jsonl`` first, so each step appears once.
    """

    def __init__(self, workdir: str, enabled: bool, start: int | None = None):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            if start is not None:
                _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _truncate_metrics(path: str, start: int) -> None:
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed run
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
                kept.append(json.dumps(row) + "\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class _Speed:
    """The step's FLOPs and the device's peak, found once, for the MFU of each log line (:mod:`throughput`)."""

    def __init__(self, peak_flops: float, microbatches: int):
        self.microbatches = microbatches
        self.flops = None  # per device per step, measured before the first step (0: unknown)
        kind = jax.devices()[0].device_kind
        self.peak = float(peak_flops) if peak_flops else throughput.peak_flops(kind)
        if self.peak is None:
            log.info("MFU is not logged: the peak FLOP/s of device kind %r is unknown (set config.train.peak_flops)",
                     kind)

    def measure(self, compiled) -> None:
        """The FLOPs of the train step from its ``compiled`` program (``jax.stages.Compiled``)."""
        self.flops = 0.0
        if self.peak is None or compiled is None:
            return
        self.flops = throughput.step_flops(compiled, microbatches=self.microbatches) or 0.0
        if not self.flops:
            log.info("MFU is not logged: the backend reports no FLOPs for the train step")

    def mfu(self, steps_per_second: float) -> dict[str, float]:
        """``{"mfu": ...}``, or ``{}`` where the peak or the FLOPs are unknown."""
        if not (self.peak and self.flops):
            return {}
        return {"mfu": throughput.mfu(self.flops, steps_per_second, self.peak)}


def _restore_or_init(config, workdir, manager, target, par):
    """(manager, state, allowed config changes): the newest good checkpoint restored into ``target``
    (:meth:`DataParallel.restore_target`), or None in a new workdir."""
    current = config.to_dict()
    if not manager.all_steps():
        return manager, None, {}
    checked = {}

    def check(step, saved):
        checked["changes"] = resume.check_resume(saved, current, workdir=workdir, step=step)

    step, state, _, skipped = checkpoint.restore_newest(manager, lambda saved: target, check_config=check)
    for key, (a, b) in checked["changes"].items():
        log.warning("config.%s changed on resume: %r -> %r", key, a, b)
    if skipped:  # move damaged newer steps aside, so that orbax saves those steps again and never counts them
        par.barrier("jaxdiff-restored")
        if jax.process_index() == 0:
            for bad, _ in skipped:
                checkpoint.set_aside(str(manager.directory), bad)
        par.barrier("jaxdiff-set-aside")
        manager.close()
        manager = checkpoint.open_manager(workdir, max_to_keep=config.train.keep_checkpoints)
    log.info("resuming from the checkpoint of step %d", step)
    return manager, state, checked["changes"]


def train_and_evaluate(config, workdir: str, *, handle_signals: bool = True,
                       hooks: Sequence[Callable[[int], None]] = ()):
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns the final host state.

    ``handle_signals``: while it runs, SIGTERM / SIGINT stop it at the next step boundary with a
    checkpoint and raise :class:`jaxdiff.training.preemption.Stopped` (handlers restored on return).
    ``hooks``: ``hook(step)`` is called on the host after each step is dispatched, with the number
    of completed steps (e.g. to log, profile, or send a signal at a chosen step in a test).
    """
    with StopSignals() if handle_signals else StopSignals(signals=()) as stop:
        return _train(config, workdir, stop, tuple(hooks))


def _train(config, workdir: str, stop: StopSignals, hooks: tuple = ()):
    is_main = jax.process_index() == 0
    tr, sm = config.train, config.sample
    # every check, before anything is written
    run = resolve(config, num_devices=jax.device_count(), load_workdir=load_workdir)
    par = make_parallel(config)
    resume.check_writable(workdir)
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    num_classes = run.num_classes
    root = jax.random.key(config.seed)
    k_init, k_train, k_sample = (jax.random.fold_in(root, i) for i in range(3))

    init = memory.state_initializer(run)
    manager = checkpoint.open_manager(workdir, max_to_keep=tr.keep_checkpoints)
    target = par.restore_target(jax.eval_shape(init, k_init))
    manager, restored, changes = _restore_or_init(config, workdir, manager, target, par)
    state = par.init_state(init, k_init) if restored is None else par.put_state(restored)
    del restored
    start = int(par.get_state(state.step))
    config_dict = config.to_dict()
    if is_main:  # only a config that passed every check
        resume.record_start(workdir, start, config_dict, changes)

    p_step = par.compile_step(functools.partial(train_step, objective=run.objective, microbatches=tr.microbatches))
    compiled = None  # a multi-process pmap step does not lower on abstract (global) batches: no peak, no MFU
    if par.mode != "pmap" or jax.process_count() == 1:
        compiled = p_step.lower(state, memory.abstract_batch(run, par), k_train).compile()
    report = memory.report(par, state, compiled)
    if is_main:
        memory.write(workdir, report)

    sample_fn = jax.jit(run.sampling(prefix="config.sample."))
    labels = imgs.grid_labels(sm.num_samples, num_classes)

    def write_samples(host_params, name: str):
        images = run.to_images(sample_fn(host_params, k_sample, jnp.asarray(labels)))  # a latent run's: decoded
        if is_main:
            imgs.save_grid(imgs.to_uint8(images), os.path.join(workdir, "samples", f"{name}.png"),
                               ncols=num_classes or None)

    writer = MetricsWriter(workdir, enabled=is_main, start=start)
    evaluator = quality.training_evaluator(config, run) if is_main else None  # config.eval; None when off
    pending: list = []
    last = {"time": time.time(), "step": start}
    speed = _Speed(tr.peak_flops, tr.microbatches)
    speed.measure(compiled)

    def flush(step: int, bar) -> None:
        """Brings pending metrics to the host; stops the job at the first non-finite step."""
        rows = [(s, par.get_metrics(m)) for s, m in pending]
        pending.clear()
        for s, m in rows:
            if m["finite"] < 1.0:
                manager.wait_until_finished()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {s} (loss={m['loss']}); stopping. The last "
                    f"checkpoint (step {checkpoint.latest_step(manager)}) holds only finite values.")
        if not rows:
            return
        now = time.time()
        ips = (step - last["step"]) * tr.global_batch_size / max(now - last["time"], 1e-9)
        last.update(time=now, step=step)
        mean = {k: float(np.mean([m[k] for _, m in rows])) for k in rows[0][1] if k != "finite"}
        scalars = {**mean, "images_per_sec": ips, **speed.mfu(ips / tr.global_batch_size)}
        writer.write(step, scalars)
        bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{ips:.0f}",
                        **({"mfu": f"{scalars['mfu']:.1%}"} if "mfu" in scalars else {}))

    iterator = data.batch_iterator(
        run.source, start, max(tr.num_steps - start, 0), global_batch_size=tr.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), random_flip=config.data.random_flip,
        image_size=config.data.image_size or None, prefetch=config.data.prefetch)
    bar = tqdm.tqdm(total=tr.num_steps, initial=start, disable=not is_main, desc="train", unit="step",
                    dynamic_ncols=True)
    saved = None  # the last step whose checkpoint was started
    stop_agreed = None  # the hosts' agreement on a stop request, read one step after it is dispatched
    try:
        with iterator:
            for step, batch in iterator:
                batch = par.put_batch(batch)
                state, metrics = p_step(state, batch, k_train)
                done = step + 1
                pending.append((done, metrics))
                bar.update(1)
                for hook in hooks:
                    hook(done)
                checkpoint.check_saves(manager, saved)  # a failed async save stops the run at once
                stopping = stop_agreed is not None and bool(stop_agreed) and done < tr.num_steps
                stop_agreed = par.any_process(stop.requested)
                at_ckpt = done % tr.checkpoint_every == 0 or done == tr.num_steps or stopping
                if done % tr.log_every == 0 or at_ckpt:
                    flush(done, bar)
                if at_ckpt:
                    checkpoint.save(manager, done, par.savable(state), config_dict)
                    saved = done
                if phema.is_due(tr, done):  # every process gathers (a collective where the state is sharded)
                    snapshot = par.get_state(state.posthoc_ema)
                    if is_main:
                        phema.save_snapshot(workdir, done, snapshot)
                if stopping:
                    manager.wait_until_finished()
                    checkpoint.check_saves(manager, done)
                    raise Stopped(done, stop.signum or signal.SIGTERM)  # signum: None where another host got it
                if tr.sample_every and done % tr.sample_every == 0 and done != tr.num_steps:
                    write_samples(par.get_state(state.ema_params), f"step_{done:07d}")
                if config.eval.every and done % config.eval.every == 0:  # every process gathers; the main evaluates
                    ema = par.get_state(state.ema_params)
                    if evaluator:
                        writer.write(done, evaluator.evaluate(ema, evaluator.num_samples))
        host_state = par.get_state(state)
        write_samples(host_state.ema_params, "final")
        if evaluator and evaluator.final_samples:
            writer.write(int(host_state.step), evaluator.final(host_state.ema_params, int(host_state.step), workdir))
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        writer.close()
    return host_state

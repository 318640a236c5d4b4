"""The training loop: composes data, the pure step, data parallelism, checkpoints and sampling.

``train_and_evaluate(config, workdir)`` runs (or resumes) a job. Every process of a
multi-host job runs it; process 0 alone writes metrics and images.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jaxdiff import data
from jaxdiff.training import checkpoint, quality
from jaxdiff.training import images as imgs
from jaxdiff.training.generate import generate
from jaxdiff.training.parallel import DataParallel
from jaxdiff.training.setup import resolve
from jaxdiff.training.state import create_train_state
from jaxdiff.training.step import train_step

__all__ = ["train_and_evaluate", "MetricsWriter"]

log = logging.getLogger("jaxdiff")


class MetricsWriter:
    """Appends metrics to ``workdir/metrics.jsonl`` and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

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


def _restore_or_init(config, manager, host_state):
    step = checkpoint.latest_step(manager)
    if step is None:
        return host_state
    state, saved = checkpoint.restore(manager, host_state, step)
    for key in ("model", "diffusion"):
        if saved.get(key) != json.loads(json.dumps(config[key].to_dict())):
            log.warning("config.%s differs from the checkpoint's; resuming with the current one", key)
    log.info("resumed from the checkpoint at step %d", step)
    return state


def train_and_evaluate(config, workdir: str):
    """Trains (or resumes) the run described by ``config`` in ``workdir``; returns the final host state."""
    is_main = jax.process_index() == 0
    par = DataParallel(config.parallel.mode)
    tr, df, sm = config.train, config.diffusion, config.sample
    run = resolve(config, num_devices=par.num_devices)  # every check, before anything is written
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    schedule, model, tx, num_classes = run.schedule, run.model, run.tx, run.num_classes
    root = jax.random.key(config.seed)
    k_init, k_train, k_sample = (jax.random.fold_in(root, i) for i in range(3))

    host_state = jax.device_get(create_train_state(k_init, model, tx, run.image_shape, num_classes=num_classes))
    manager = checkpoint.open_manager(workdir, max_to_keep=tr.keep_checkpoints)
    host_state = _restore_or_init(config, manager, host_state)
    start = int(host_state.step)
    config_dict = config.to_dict()
    if is_main:
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(json.loads(json.dumps(config_dict)), f, indent=2)

    step_fn = functools.partial(
        train_step, apply_fn=model.apply, tx=tx, schedule=schedule, prediction=df.prediction,
        weighting=df.weighting, min_snr_gamma=df.min_snr_gamma, learned_variance=df.learned_variance,
        ema_decay=tr.ema_decay, num_classes=num_classes, label_dropout=tr.label_dropout, objective=df.objective)
    p_step = par.compile_step(step_fn)
    state = par.put_state(host_state)

    sample_fn = jax.jit(functools.partial(
        generate, model.apply, schedule=schedule, image_shape=run.image_shape, sampler=sm.sampler,
        num_classes=num_classes, prediction=df.prediction, learned_variance=df.learned_variance,
        clip_x0=sm.clip_x0, objective=df.objective))
    labels = imgs.grid_labels(sm.num_samples, num_classes)

    def write_samples(host_params, name: str):
        images = sample_fn(host_params, key=k_sample, labels=jnp.asarray(labels), num_steps=sm.num_steps,
                           eta=sm.eta, guidance_scale=sm.guidance)
        if is_main:
            imgs.save_grid(imgs.to_uint8(images), os.path.join(workdir, "samples", f"{name}.png"),
                               ncols=num_classes or None)

    writer = MetricsWriter(workdir, enabled=is_main)
    evaluator = quality.training_evaluator(config, run) if is_main else None  # config.eval; None when off
    pending: list = []
    last = {"time": time.time(), "step": start}

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
        writer.write(step, {**mean, "images_per_sec": ips})
        bar.set_postfix(loss=f"{mean['loss']:.4f}", img_s=f"{ips:.0f}")

    iterator = data.batch_iterator(
        run.source, start, max(tr.num_steps - start, 0), global_batch_size=tr.global_batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(), random_flip=config.data.random_flip,
        image_size=config.data.image_size or None, prefetch=config.data.prefetch)
    bar = tqdm.tqdm(total=tr.num_steps, initial=start, disable=not is_main, desc="train", unit="step",
                    dynamic_ncols=True)
    try:
        with iterator:
            for step, batch in iterator:
                state, metrics = p_step(state, par.put_batch(batch), k_train)
                done = step + 1
                pending.append((done, metrics))
                bar.update(1)
                at_ckpt = done % tr.checkpoint_every == 0 or done == tr.num_steps
                if done % tr.log_every == 0 or at_ckpt:
                    flush(done, bar)
                if at_ckpt:
                    checkpoint.save(manager, done, par.get_state(state), config_dict)
                if tr.sample_every and done % tr.sample_every == 0 and done != tr.num_steps:
                    write_samples(par.get_state(state).ema_params, f"step_{done:07d}")
                if evaluator and evaluator.due(done):
                    writer.write(done, evaluator.evaluate(par.get_state(state).ema_params, evaluator.num_samples))
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

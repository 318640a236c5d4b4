"""fsdp against replicated state: step time on 8 simulated CPU devices, and the state's memory per device.

Does sharding the train state (``parallel.mode = "fsdp"``: every large leaf of the parameters, Adam's
moments and the EMA sharded over 8 devices, the parameters all-gathered by XLA inside the step)
cost step time against the replicated ``sharding`` mode (the same ``jax.jit`` step, the state
replicated, the gradients all-reduced)? Goal: within 1.3x. Both modes run
``jaxdiff.training.step.train_step`` through ``DataParallel.compile_step`` with the state donated,
on the same batch, alternating A B A B ... (medians of ``--rounds`` rounds of 2 steps each).

Networks: ``digits`` (the README's class-conditional digits UNet, batch 64, 8x8x1) and ``dit_s_2``
(DiT-S/2's width and depth, 33M parameters, on 8x8x4 latents: 16 tokens, batch 32).

The memory table is ``jaxdiff-train --plan --noplan_compile`` (the state from ``jax.eval_shape``,
bytes from the shardings) for the digits UNet (8x8x1), ``ddpm_cifar10`` and the DiTs (32x32x1
images, i.e. 32x32 latents of one channel; four channels add < 0.1% to a DiT), class-conditional,
no post-hoc EMA, under the replicated mode (any device count) and fsdp on 8 and 64 devices.

Commands (from the repository root)::

    python bench/fsdp.py              # both tables
    python bench/fsdp.py --quick      # smoke run

Writes ``bench/results/fsdp.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
if __name__ == "__main__":  # before JAX starts: 8 simulated devices
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={DEVICES}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bench_utils as bu  # noqa: E402
import networks as nets  # noqa: E402

# (name, preset, image shape, batch) of the timed networks.
TIMED = (("digits", "digits", (8, 8, 1), 64), ("dit_s_2", "dit_s_2", (8, 8, 4), 32))
# (preset, image size) of the memory table.
PLANNED = (("digits", 8), ("ddpm_cifar10", 32), ("dit_s_2", 32), ("dit_b_2", 32), ("dit_xl_2", 32))


def _step_cases(preset: str, image_shape, batch: int) -> dict:
    import jax
    import numpy as np

    from jaxdiff.models import get_model
    from jaxdiff.training import memory
    from jaxdiff.training.parallel import DataParallel
    from jaxdiff.training.state import make_optimizer

    model = get_model(preset, num_classes=10)
    tx = make_optimizer(2e-4, warmup_steps=0, grad_clip=1.0)
    host = jax.device_get(jax.jit(lambda k: nets.init_train_state(model, tx, image_shape, 10, k))(jax.random.key(0)))
    rng = np.random.default_rng(0)
    batch_np = {"image": rng.uniform(-1, 1, (batch, *image_shape)).astype(np.float32),
                "index": np.arange(batch, dtype=np.int32), "label": rng.integers(0, 10, batch).astype(np.int32)}
    step_fn = nets.library_train_step()
    cases, shares = {}, {}
    for mode in ("sharding", "fsdp"):
        par = DataParallel(mode, devices=jax.devices()[:DEVICES])
        step = par.compile_step(step_fn)
        held = {"state": par.put_state(host)}
        placed = par.put_batch(batch_np)
        key = jax.random.key(1)

        def run(step=step, held=held, placed=placed, key=key):
            for _ in range(nets.STEPS_PER_SAMPLE):
                held["state"], metrics = step(held["state"], placed, key)
            bu.block(metrics)

        cases[mode] = run
        shares[mode] = memory.bytes_per_device(held["state"])
    return cases, shares


def time_steps(rounds: int, quick: bool) -> list[dict]:
    rows = []
    for name, preset, shape, batch in TIMED[:1] if quick else TIMED:
        cases, shares = _step_cases(preset, shape, batch)
        res = bu.alternate(cases, rounds=rounds, warmup=1)
        rep, fs = res["sharding"]["median_s"], res["fsdp"]["median_s"]
        per = nets.STEPS_PER_SAMPLE
        rows.append({"network": name, "preset": preset, "image_shape": shape, "batch": batch,
                     "replicated_s_per_step": rep / per, "fsdp_s_per_step": fs / per,
                     "ratio": fs / rep, "state_bytes_per_device": shares, "samples": res})
        bu.eprint(f"{name}: replicated {rep:.3f}s, fsdp {fs:.3f}s per {nets.STEPS_PER_SAMPLE} steps: {fs / rep:.2f}x")
    return rows


def plan(preset: str, size: int, mode: str, devices: int) -> dict:
    """``jaxdiff-train --plan --noplan_compile`` of the digits config with ``preset`` (a subprocess)."""
    with tempfile.TemporaryDirectory() as workdir:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        config = os.path.join(ROOT, "jaxdiff", "configs", "digits.py")
        cmd = [sys.executable, "-m", "jaxdiff.scripts.train", "--config", config, f"--workdir={workdir}", "--plan",
               f"--plan_devices={devices}", "--noplan_compile",
               f"--config.model.preset={preset}", f"--config.data.image_size={size}", "--config.eval.final_samples=0",
               f"--config.parallel.mode={mode}", "--config.train.global_batch_size=64"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        with open(os.path.join(workdir, "memory.json"), encoding="utf-8") as f:
            return json.load(f)


def memory_table(quick: bool) -> list[dict]:
    rows = []
    for preset, size in PLANNED[:1] if quick else PLANNED:
        reports = {"replicated": plan(preset, size, "sharding", 8), "fsdp_x8": plan(preset, size, "fsdp", 8),
                   "fsdp_x64": plan(preset, size, "fsdp", 64)}
        rows.append({"preset": preset, "image_size": size,
                     **{k: r["state_bytes_per_device"] for k, r in reports.items()}, "reports": reports})
        bu.eprint(f"{preset}: " + ", ".join(f"{k} {r['state_bytes_per_device'] / 2**20:.1f} MiB"
                                           for k, r in reports.items()))
    return rows


def main():
    p = bu.parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    steps = time_steps(rounds, args.quick)
    print(bu.table(["network", "batch", "replicated s/step", "fsdp s/step", "fsdp / replicated"],
                   [[r["network"], r["batch"], r["replicated_s_per_step"], r["fsdp_s_per_step"], r["ratio"]]
                    for r in steps]))
    mem = memory_table(args.quick)
    mib = 2.0**20
    print()
    print(bu.table(["preset", "replicated MiB/device", "fsdp x8 MiB/device", "fsdp x64 MiB/device"],
                   [[r["preset"], r["replicated"] / mib, r["fsdp_x8"] / mib, r["fsdp_x64"] / mib] for r in mem]))
    bu.write_json("fsdp", {"command": " ".join(sys.argv), "devices": DEVICES, "rounds": rounds,
                           "steps_per_sample": nets.STEPS_PER_SAMPLE, "step_time": steps, "memory": mem}, args.out)


if __name__ == "__main__":
    main()

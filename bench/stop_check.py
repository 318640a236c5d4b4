"""The cost of the training loop's per-step checks for a stop request and a failed checkpoint save.

At each step boundary the loop (``jaxdiff/training/loop.py``) dispatches
``DataParallel.any_process(flag)`` (a jitted max over one int per device, so that every host
stops at the same step), reads the previous step's result, and calls
``checkpoint.check_saves`` (orbax's ``check_for_errors``). This script times a loop of the
pmapped train step without those checks ("plain") and with them ("checked"), alternating, on the
tiny test network (the worst case: the shortest step) and the digits network, over all local
devices (on CPU: 8 fake devices). Reported: milliseconds per step (median) and the overhead.

Commands (from the repository root)::

    python bench/stop_check.py            # 8 fake CPU devices on a CPU-only machine
    python bench/stop_check.py --quick

Writes ``bench/results/stop_check.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import bench_utils as bu

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def loop_cases(preset_config, steps: int, workdir: str):
    """``{"plain": run, "checked": run}``: each runs ``steps`` train steps from the same state."""
    import functools

    import jax

    from jaxdiff import data
    from jaxdiff.training import checkpoint
    from jaxdiff.training.parallel import DataParallel
    from jaxdiff.training.setup import resolve
    from jaxdiff.training.state import create_train_state
    from jaxdiff.training.step import train_step

    config = preset_config
    par = DataParallel("pmap")
    run = resolve(config, num_devices=par.num_devices)
    host = jax.device_get(create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape,
                                             num_classes=run.num_classes))
    step_fn = par.compile_step(functools.partial(
        train_step, apply_fn=run.model.apply, tx=run.tx, schedule=run.schedule, num_classes=run.num_classes,
        label_dropout=config.train.label_dropout, ema_decay=config.train.ema_decay))
    batches = [par.put_batch(data.get_batch(run.source, s, global_batch_size=config.train.global_batch_size, seed=0))
               for s in range(steps)]
    key = jax.random.key(1)
    manager = checkpoint.open_manager(workdir)

    def plain():
        state = par.put_state(host)
        for b in batches:
            state, metrics = step_fn(state, b, key)
        bu.block((state, metrics))

    def checked():
        state = par.put_state(host)
        agreed = None
        for b in batches:
            state, metrics = step_fn(state, b, key)
            checkpoint.check_saves(manager, None)
            if agreed is not None and bool(agreed):
                raise AssertionError("no stop was requested")
            agreed = par.any_process(False)
        bu.block((state, metrics))

    return {"plain": plain, "checked": checked}


def main():
    args = bu.parser(__doc__.split("\n\n")[0]).parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    steps = 10 if args.quick else 30
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from configs import digits

    from training_utils import tiny_config

    nets = {"tiny (test)": tiny_config(), "digits": digits.get_config()}
    rows, results = [], {}
    for name, config in nets.items():
        with tempfile.TemporaryDirectory() as workdir:
            timing = bu.alternate(loop_cases(config, steps, workdir), rounds=rounds)
        plain, checked = (timing[k]["median_s"] * 1e3 / steps for k in ("plain", "checked"))
        results[name] = {"steps_per_call": steps, "timing": timing}
        rows.append([name, plain, checked, checked - plain, 100 * (checked - plain) / plain])
    print(bu.table(["network", "plain ms/step", "checked ms/step", "overhead ms/step", "overhead %"], rows))
    bu.write_json("stop_check", {"rounds": rounds, "results": results}, args.out)


if __name__ == "__main__":
    main()

r"""Train a diffusion model.

    jaxdiff-train --config jaxdiff/configs/digits.py --workdir workdir/digits

Re-running the same command resumes from the newest checkpoint in ``--workdir`` that restores
completely (damaged ones are skipped with a warning), if the config agrees with the saved one
(see ``jaxdiff/training/resume.py`` for the fields that may change). SIGTERM or SIGINT stops the
run at the next step boundary with a checkpoint and exits with code 128 + signal (143 for
SIGTERM, 130 for SIGINT); the same command resumes. A second signal exits at once. On a
multi-host slice every host runs the same command (on Cloud TPU, JAX finds its peers by
itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``).

At start-up the job writes ``WORKDIR/memory.json`` (the state's and the step's memory per device,
:mod:`jaxdiff.training.memory`). ``--plan`` writes and prints the same report without training or
allocating the state (``jax.eval_shape`` and a compile on abstract arrays); ``--plan_devices N``
plans for N devices simulated on the host CPU (the state's bytes are exact for any backend; the
step's peak is then XLA:CPU's), and ``--noplan_compile`` skips the compile (``step_peak_bytes``
null), e.g. for a DiT-XL/2 on 64 devices::

    jaxdiff-train --config jaxdiff/configs/digits.py --workdir /tmp/plan --plan --plan_devices 64 \
        --config.model.preset=dit_xl_2 --config.data.image_size=32 --config.eval.final_samples=0 \
        --config.parallel.mode=fsdp --config.train.global_batch_size=256
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxdiff import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for jax.distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes (hosts), for jax.distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")
flags.DEFINE_bool("plan", False, "Only write and print WORKDIR/memory.json (the memory per device), without "
                  "training or allocating the state.")
flags.DEFINE_integer("plan_devices", None, "With --plan: plan for this many devices, simulated on the host CPU "
                     "(default: the devices present).")
flags.DEFINE_bool("plan_compile", True, "With --plan: compile the step on abstract arrays for step_peak_bytes "
                  "(--noplan_compile: null, and much faster for large models).")
flags.mark_flags_as_required(["config", "workdir"])


def plan(config, workdir: str) -> None:
    """``--plan``: writes and prints the memory report of ``config`` (:func:`jaxdiff.training.memory.plan`)."""
    import jax

    if FLAGS.plan_devices is not None:
        if FLAGS.plan_devices < 1:
            raise ValueError(f"--plan_devices={FLAGS.plan_devices}: must be a positive number of devices")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", FLAGS.plan_devices)
    from jaxdiff.training import memory, resume

    report = memory.plan(config, compile=FLAGS.plan_compile)
    resume.check_writable(workdir)
    memory.write(workdir, report)


def main(argv):
    if FLAGS.plan:
        return plan(FLAGS.config, FLAGS.workdir)
    if FLAGS.plan_devices is not None or not FLAGS.plan_compile:
        raise ValueError("--plan_devices and --noplan_compile are options of --plan")
    import jax

    if FLAGS.coordinator_address or FLAGS.num_processes:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from jaxdiff.training.loop import train_and_evaluate

    logging.info("JAX: %d process(es), %d device(s): %s", jax.process_count(), jax.device_count(), jax.devices())
    from jaxdiff.training.preemption import Stopped

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Stopped as stopped:
        print(f"{stopped} (workdir: {os.path.abspath(FLAGS.workdir)})", file=sys.stderr, flush=True)
        sys.exit(stopped.exit_code)
    if jax.process_index() == 0:
        workdir = os.path.abspath(FLAGS.workdir)
        print(f"done: checkpoints in {os.path.join(workdir, 'checkpoints')}, metrics in "
              f"{os.path.join(workdir, 'metrics.jsonl')} (TensorBoard: {os.path.join(workdir, 'tensorboard')}), "
              f"samples in {os.path.join(workdir, 'samples')}")


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

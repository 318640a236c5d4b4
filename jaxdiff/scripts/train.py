"""Train a diffusion model.

    jaxdiff-train --config jaxdiff/configs/digits.py --workdir workdir/digits

Re-running the same command resumes from the newest checkpoint in ``--workdir`` that restores
completely (damaged ones are skipped with a warning), if the config agrees with the saved one
(see ``jaxdiff/training/resume.py`` for the fields that may change). SIGTERM or SIGINT stops the
run at the next step boundary with a checkpoint and exits with code 128 + signal (143 for
SIGTERM, 130 for SIGINT); the same command resumes. A second signal exits at once. On a
multi-host slice every host runs the same command (on Cloud TPU, JAX finds its peers by
itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``).
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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
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

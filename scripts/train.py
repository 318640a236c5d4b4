"""Train a diffusion model.

    python scripts/train.py --config configs/digits.py --workdir workdir/digits

Re-running the same command resumes from the latest checkpoint in ``--workdir``. On a
multi-host slice every host runs the same command (on Cloud TPU, JAX finds its peers by
itself; elsewhere pass ``--coordinator_address``, ``--num_processes`` and ``--process_id``).
"""

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # for `configs`

from jaxdiff import cli  # noqa: E402

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
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(f"done: checkpoints, metrics.jsonl and samples/ are in {FLAGS.workdir}")


if __name__ == "__main__":
    cli.run(main)

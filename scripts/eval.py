"""Report the likelihood of a trained workdir in bits/dim: the variational bound and the PF-ODE NLL.

    python scripts/eval.py --workdir workdir/digits --num_examples 64 --ode_examples 8

Prints a JSON line and writes it to ``WORKDIR/eval.json``.
"""

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_integer("num_examples", 64, "Training examples for the variational bound.")
flags.DEFINE_integer("ode_examples", 8, "Examples for the probability-flow ODE NLL (0 to skip).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the bound's evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of the data order, noise and Hutchinson probes.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from jaxdiff.training.evaluate import evaluate_workdir

    try:
        result = evaluate_workdir(FLAGS.workdir, num_examples=FLAGS.num_examples, ode_examples=FLAGS.ode_examples,
                                  batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(result))
    with open(os.path.join(FLAGS.workdir, "eval.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)

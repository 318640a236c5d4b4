"""Report the likelihood of a trained workdir in bits/dim: the variational bound and the PF-ODE NLL.

    python scripts/eval.py --workdir workdir/digits --num_examples 64 --ode_examples 8

Prints a JSON line and writes it to ``WORKDIR/eval.json``.
"""

import json
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdiff import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_integer("num_examples", 64, "Training examples for the variational bound.")
flags.DEFINE_integer("ode_examples", 8, "Examples for the probability-flow ODE NLL (0 to skip).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the bound's evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of the data order, noise and Hutchinson probes.")
flags.DEFINE_string("ema", None, "sigma_rel=S: evaluate the post-hoc EMA reconstruction of S (scripts/posthoc_ema.py).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    from jaxdiff.training.evaluate import evaluate_workdir
    from jaxdiff.training.phema import parse_ema

    out = os.path.join(FLAGS.workdir, "eval.json")
    if os.path.isdir(FLAGS.workdir) and not os.access(FLAGS.workdir, os.W_OK):
        raise PermissionError(f"--workdir {FLAGS.workdir} is not writable: {out} could not be saved")
    result = evaluate_workdir(FLAGS.workdir, num_examples=FLAGS.num_examples, ode_examples=FLAGS.ode_examples,
                              batch_size=FLAGS.batch_size, seed=FLAGS.seed, ema=parse_ema(FLAGS.ema))
    print(json.dumps(result))
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)

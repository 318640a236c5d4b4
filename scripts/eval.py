"""Report the likelihood of a trained workdir in bits/dim: the variational bound and the PF-ODE NLL.

    python scripts/eval.py --workdir workdir/digits --num_examples 64 --ode_examples 8

Prints a JSON line and writes it to ``WORKDIR/eval.json``. That the file can be written is checked
before evaluating; a previous ``eval.json`` is kept as ``eval.YYYYmmdd-HHMMSS.json`` (its time).
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
    from jaxdiff.training.evaluate import check_eval_output, evaluate_workdir, write_eval
    from jaxdiff.training.phema import parse_ema

    check_eval_output(FLAGS.workdir)
    result = evaluate_workdir(FLAGS.workdir, num_examples=FLAGS.num_examples, ode_examples=FLAGS.ode_examples,
                              batch_size=FLAGS.batch_size, seed=FLAGS.seed, ema=parse_ema(FLAGS.ema))
    print(json.dumps(result))
    out, backup = write_eval(FLAGS.workdir, result)
    print(f"wrote {out}" + (f" (the previous result is now {backup})" if backup else ""))


if __name__ == "__main__":
    cli.run(main)

"""Reconstruct a post-hoc EMA (EDM2 sec. 3) of any width from a run's snapshots.

    jaxdiff-posthoc-ema --workdir workdir/digits_edm --sigma_rel 0.08

Needs a run trained with ``config.train.posthoc_ema.sigma_rels`` set (its snapshots are in
``WORKDIR/posthoc_ema/``). Writes ``WORKDIR/posthoc_ema/ema_sigma_rel_0.08.safetensors``, which
``jaxdiff-sample --ema sigma_rel=0.08`` and ``jaxdiff-eval --ema sigma_rel=0.08`` use.
"""


from absl import flags

from jaxdiff import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir with post-hoc EMA snapshots.")
flags.DEFINE_float("sigma_rel", None, "Relative standard deviation of the EMA profile to reconstruct (0 < S <= 0.28).")
flags.DEFINE_integer("step", None, "Training step of the reconstruction (default: the last snapshot's).")
flags.mark_flags_as_required(["workdir", "sigma_rel"])


def main(argv):
    from jaxdiff.training.phema import reconstruct_workdir

    path = reconstruct_workdir(FLAGS.workdir, FLAGS.sigma_rel, step=FLAGS.step)
    print(f"wrote {path}")


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

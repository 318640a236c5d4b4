r"""Report the likelihood of a trained workdir in bits/dim: the variational bound and the PF-ODE NLL.

    jaxdiff-eval --workdir workdir/digits --num_examples 64 --ode_examples 8

Prints a JSON line and writes it to ``WORKDIR/eval.json``. That the file can be written is checked
before evaluating; a previous ``eval.json`` is kept as ``eval.YYYYmmdd-HHMMSS.json`` (its time).

``--fid`` adds sample quality (:mod:`jaxdiff.training.quality`) under the key ``"quality"``:
FID (``digits_fd`` with the digits network), KID and precision/recall of ``--num_samples``
samples of the EMA model per seed in ``--seeds``, with their min and mean (EDM's protocol:
50,000 samples; report the seed). ``--nobpd`` skips the bits/dim. For example::

    jaxdiff-eval --workdir workdir/cifar10 --fid --nobpd --inception pt_inception.safetensors \
        --ref_stats cifar10_train.npz --num_samples 50000 --sampler ddim --steps 50 --seeds 0,1,2
    jaxdiff-eval --workdir workdir/digits --fid --nobpd --num_samples 1000   # digits network, offline

Smoke test of the Inception path without the real weights (the numbers mean nothing): write a
random-weight Inception file with ``tests/fixtures/inception_weights.py``'s generator and BN
fixture (``write_random_inception`` in ``tests/test_quality.py`` does exactly this), then::

    python -m jaxdiff.metrics.stats --dataset digits --features inception --inception random.safetensors \
        --out digits_random.npz
    jaxdiff-eval --workdir workdir/digits --fid --nobpd --features inception \
        --inception random.safetensors --ref_stats digits_random.npz --num_samples 100 --reference_images 200
"""

import json

from absl import flags

from jaxdiff import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_integer("num_examples", 64, "Training examples for the variational bound.")
flags.DEFINE_integer("ode_examples", 8, "Examples for the probability-flow ODE NLL (0 to skip).")
flags.DEFINE_integer("batch_size", 64, "Batch size of the bound's evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of the data order, noise and Hutchinson probes.")
flags.DEFINE_string("ema", None, "sigma_rel=S: evaluate the post-hoc EMA reconstruction of S (jaxdiff-posthoc-ema).")
flags.DEFINE_bool("bpd", True, "Report bits/dim (--nobpd: skip them).")
flags.DEFINE_bool("fid", False, "Report sample quality: FID (or the digits FD), KID, precision/recall.")
flags.DEFINE_enum("features", None, ["inception", "digits"],
                  "Feature network (default: digits for 8x8x1 images or upsampled digits, else inception).")
flags.DEFINE_string("inception", None, "FID Inception weights (.safetensors) for --features inception.")
flags.DEFINE_string("ref_stats", None, "Reference statistics (.npz, python -m jaxdiff.metrics.stats); default: "
                    "the held-out digits (digits network) or the first --reference_images dataset images.")
flags.DEFINE_integer("num_samples", 50000, "Samples per seed for --fid.")
flags.DEFINE_list("seeds", ["0"], "Sampling seeds for --fid (min and mean over them are reported).")
flags.DEFINE_string("sampler", None, "Sampler for --fid (default: the run's config.sample.sampler).")
flags.DEFINE_integer("steps", None, "Sampler steps for --fid (default: the run's config.sample.num_steps).")
flags.DEFINE_float("eta", None, "DDIM eta for --fid (default: the run's).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale for --fid (default: the run's).")
flags.DEFINE_integer("fid_batch_size", 250, "Samples per generation batch (over all devices) for --fid.")
flags.DEFINE_integer("keep_features", 10000, "Generated features kept for KID and precision/recall.")
flags.DEFINE_integer("reference_images", 10000, "Dataset images whose features serve KID and precision/recall.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    from jaxdiff.training.evaluate import check_eval_output, evaluate_workdir, write_eval
    from jaxdiff.training.phema import parse_ema

    check_eval_output(FLAGS.workdir)
    result = {}
    if FLAGS.fid:  # every input of the quality evaluation is checked before any work
        from jaxdiff.training.quality import evaluate_quality

        seeds = [int(s) for s in FLAGS.seeds if s.strip().lstrip("-").isdigit()]
        if len(seeds) != len(FLAGS.seeds) or not seeds:
            raise ValueError(f"--seeds must be comma-separated integers, got {','.join(FLAGS.seeds)!r}")
        if FLAGS.ema is not None:
            raise ValueError("--ema applies to the bits/dim only; --fid evaluates the run's own EMA")
        result["quality"] = evaluate_quality(
            FLAGS.workdir, features=FLAGS.features, inception_path=FLAGS.inception, ref_stats=FLAGS.ref_stats,
            num_samples=FLAGS.num_samples, seeds=seeds, sampler=FLAGS.sampler, num_steps=FLAGS.steps, eta=FLAGS.eta,
            guidance_scale=FLAGS.guidance, batch_size=FLAGS.fid_batch_size, keep=FLAGS.keep_features,
            reference_images=FLAGS.reference_images)
    if FLAGS.bpd:
        result.update(evaluate_workdir(FLAGS.workdir, num_examples=FLAGS.num_examples, ode_examples=FLAGS.ode_examples,
                                       batch_size=FLAGS.batch_size, seed=FLAGS.seed, ema=parse_ema(FLAGS.ema)))
    print(json.dumps(result))
    out, backup = write_eval(FLAGS.workdir, result)
    print(f"wrote {out}" + (f" (the previous result is now {backup})" if backup else ""))


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

"""Sample images from a trained workdir with its EMA parameters.

    jaxdiff-sample --workdir workdir/digits --num_samples 100 --seed 0 --output samples.npz

``--diffusers FOLDER`` samples a diffusers ``DDPMPipeline`` / ``DDIMPipeline`` folder instead
(``unet/`` + ``scheduler/``; its scheduler's sampler by default, any jaxdiff sampler with
``--sampler``), e.g. ``--diffusers ddpm-cifar10-32 --sampler dpm_solver++ --steps 20``.

Writes ``samples.npz`` (``images``: uint8 [N, H, W, C]; ``labels``: int32 [N] for a
class-conditional model) and a PNG grid beside it (``samples.png``). The same seed gives the
same output. ``--sampler``, ``--steps``, ``--eta`` and ``--guidance`` override the run's config;
``--labels`` picks the classes of a class-conditional model (``cycle``, or ids repeated over the samples:
``--labels 3``, ``--labels 0,1,2``; default: the grid order, row ``r`` of class ``r``).
``--option name=value`` (repeatable) sets any option of the sampler (``jaxdiff.samplers.registry``),
e.g. ``--option s_churn=40 --option sigma_max=80`` for ``edm``. ``--ema sigma_rel=0.1`` samples the
post-hoc EMA reconstruction written by ``jaxdiff-posthoc-ema``.
Every flag and the output path are checked before sampling; an existing output (.npz or .png)
is refused unless ``--overwrite`` is given.
"""

import os

from absl import flags

from jaxdiff import checks, cli
from jaxdiff.samplers.registry import SAMPLERS

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_string("diffusers", None, "A diffusers DDPMPipeline/DDIMPipeline folder (unet/ + scheduler/) instead.")
flags.DEFINE_integer("num_samples", 64, "Number of images.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("output", "samples.npz", "Output .npz path (a .png grid is written beside it).")
flags.DEFINE_enum("sampler", None, list(SAMPLERS),
                  "Sampler (default: the config's): " + "; ".join(f"{k}: {s.summary}" for k, s in SAMPLERS.items()))
flags.DEFINE_integer("num_steps", None, "Number of sampling steps (default: the config's).")
flags.DEFINE_alias("steps", "num_steps")
flags.DEFINE_float("eta", None, "The sampler's eta, for samplers that take one (default: the config's).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale w (1 = the conditional model).")
flags.DEFINE_integer("batch_size", 256, "Images generated per compiled call.")
flags.DEFINE_bool("overwrite", False, "Replace an existing --output (and the .png beside it).")
flags.DEFINE_multi_string("option", [], "A sampler option name=value (repeatable), e.g. s_churn=40.")
flags.DEFINE_string("labels", None, "Class labels of a class-conditional model: 'cycle' (0, 1, ..., 0, ...) or "
                    "class ids repeated over the samples, e.g. 3 or 0,1,2 (default: grid order, row r of class r).")
flags.DEFINE_string("ema", None, "sigma_rel=S: use the post-hoc EMA reconstruction of S (jaxdiff-posthoc-ema).")
flags.register_multi_flags_validator(["workdir", "diffusers"], lambda f: bool(f["workdir"]) != bool(f["diffusers"]),
                                    message="give exactly one of --workdir and --diffusers")


def main(argv):
    from jaxdiff.training.generate import sample_pipeline, sample_workdir
    from jaxdiff.training.phema import parse_ema

    if FLAGS.guidance is not None:
        checks.check_nonnegative(FLAGS.guidance, "--guidance")
    if FLAGS.diffusers:
        for name in ("guidance", "ema", "labels"):
            if FLAGS[name].present:
                raise ValueError(f"--{name} applies to a --workdir, not to a diffusers pipeline")
        path = sample_pipeline(FLAGS.diffusers, FLAGS.output, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                               sampler=FLAGS.sampler, num_steps=FLAGS.num_steps, eta=FLAGS.eta,
                               batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite,
                               options=cli.parse_options(FLAGS.option))
        print(f"wrote {path} and {os.path.splitext(path)[0]}.png")
        return

    path = sample_workdir(FLAGS.workdir, FLAGS.output, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                          sampler=FLAGS.sampler, num_steps=FLAGS.num_steps, eta=FLAGS.eta,
                          guidance_scale=FLAGS.guidance, batch_size=FLAGS.batch_size, overwrite=FLAGS.overwrite,
                          options=cli.parse_options(FLAGS.option), ema=parse_ema(FLAGS.ema),
                          labels=parse_labels(FLAGS.labels))
    print(f"wrote {path} and {os.path.splitext(path)[0]}.png")


def parse_labels(text: str | None):
    """``--labels``: ``None``, ``"cycle"`` or a tuple of ints from ``"3"`` / ``"0,1,2"`` (``ValueError`` naming
    the flag); their range is checked against the model's ``num_classes`` by ``sample_workdir``."""
    if text is None or text.strip() == "cycle":
        return None if text is None else "cycle"
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--labels must be 'cycle' or comma-separated class ids like 0,1,2, got {text!r}") from None


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

"""Export a trained workdir as a diffusers pipeline folder (EMA parameters, the schedule as a scheduler).

    jaxdiff-export --workdir workdir/digits --out exported/digits

Writes ``OUT/unet/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, diffusers'
tensor names), ``OUT/scheduler/scheduler_config.json`` and ``OUT/model_index.json``: a
``DDPMPipeline`` when the run samples with ``ddpm``, else a ``DDIMPipeline``. diffusers loads it
with ``DDIMPipeline.from_pretrained(OUT)``; jaxdiff with ``jaxdiff.from_diffusers_pipeline(OUT)``.
A class-conditional UNet has no diffusers pipeline (``UNet2DModel`` with class embeddings is
exported to ``OUT/unet`` only); an existing non-empty ``OUT`` is never overwritten.
"""

import os

from absl import flags

from jaxdiff import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training workdir (holds checkpoints/).")
flags.DEFINE_string("out", None, "The folder to write (must not exist or be empty).")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
    if os.path.exists(FLAGS.out) and (not os.path.isdir(FLAGS.out) or os.listdir(FLAGS.out)):
        raise FileExistsError(f"--out {FLAGS.out} exists and is not an empty folder: not overwriting it")
    from jaxdiff.models import SamplingDefaults, to_diffusers, to_diffusers_pipeline
    from jaxdiff.training import load_workdir

    wd = load_workdir(FLAGS.workdir)
    run, config = wd.run, wd.config
    if "discrete" not in run.objective.views:
        raise ValueError(f"--workdir {FLAGS.workdir} trained an objective={run.objective.name!r} model; diffusers "
                         "pipelines hold models of a discrete schedule (DDPM-style diffusion) only")
    size = run.image_shape[0]
    if run.num_classes is not None:
        path = to_diffusers(run.model, wd.ema_params, os.path.join(FLAGS.out, "unet"), sample_size=size)
        print(f"wrote {path} (class-conditional: a UNet2DModel folder; diffusers has no class-conditional "
              "DDPM pipeline)")
        return
    ddpm = config.sample.sampler == "ddpm"
    sampling = SamplingDefaults(
        sampler="ddpm" if ddpm else "ddim", prediction=config.diffusion.prediction, clip_x0=config.sample.clip_x0,
        variance=("learned_range" if config.diffusion.learned_variance else "fixed_small") if ddpm else None,
        eta=None if ddpm else float(config.sample.eta), num_steps=None)
    path = to_diffusers_pipeline(run.model, wd.ema_params, run.schedule, FLAGS.out, sampling=sampling,
                                 sample_size=size)
    print(f"wrote {path} (step {wd.step}, EMA parameters)")


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

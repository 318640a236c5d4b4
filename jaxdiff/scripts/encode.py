"""Encode a dataset once into an autoencoder's latents, for latent diffusion (``config.data.latents``).

    jaxdiff-encode --vae sd-vae-ft-ema --dataset imagenet2012 --image_size 256 --flip --output latents/in256

``--vae`` is a diffusers ``AutoencoderKL`` folder (``config.json`` + safetensors weights, e.g. a
local copy of ``stabilityai/sd-vae-ft-ema``; a jaxdiff autoencoder is saved as one), read by
``jaxdiff.models.from_diffusers``. The images are those of ``config.data``: ``--dataset`` (``digits``
offline, else a prepared TFDS dataset), ``--split``, ``--data_dir``, ``--image_size`` (center crop +
bicubic resize). Writes ``--output``: ``shard_NNNNN.npz`` files of ``--shard_size`` examples (the
posterior ``mean`` and ``std`` float32 ``[n, h, w, c]``, ``label`` int32 ``[n]``; with ``--flip`` also the
flipped images' ``mean_flip`` / ``std_flip``) and ``manifest.json`` (the dataset, the shapes, the
autoencoder's path, sha256 and ``scaling_factor`` / ``shift_factor``): :mod:`jaxdiff.latents`.

Batches of ``--batch_size`` are sharded over the local devices. Run the same command again after
an interruption: it continues after the last complete shard, and the result equals an
uninterrupted run's. A complete ``--output`` is never overwritten. Then train on it with
``--config.data.latents=latents/in256`` (``jaxdiff/configs/imagenet256_dit.py``).
"""

from absl import flags

from jaxdiff import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("vae", None, "A diffusers AutoencoderKL folder (config.json + safetensors weights).")
flags.DEFINE_string("output", None, "The latents folder to write (new, empty, or a partial one to continue).")
flags.DEFINE_string("dataset", "digits", "'digits' (offline) or a prepared TFDS image dataset.")
flags.DEFINE_string("split", "train", "The dataset split.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).")
flags.DEFINE_integer("image_size", None, "Resize the images to this square size first (default: their own).")
flags.DEFINE_integer("shard_size", 10000, "Examples per shard file.")
flags.DEFINE_integer("batch_size", 64, "Examples per encoding call, over all local devices.")
flags.DEFINE_bool("flip", False, "Also store the posterior of each horizontally flipped image "
                  "(needed by config.data.random_flip).")
flags.DEFINE_integer("max_shards", None, "Encode at most this many shards now (continue on a later run).")
flags.mark_flags_as_required(["vae", "output"])


def main(argv):
    from jaxdiff.training.encode import encode_dataset

    encode_dataset(FLAGS.output, vae=FLAGS.vae, dataset=FLAGS.dataset, split=FLAGS.split, data_dir=FLAGS.data_dir,
                   image_size=FLAGS.image_size, shard_size=FLAGS.shard_size, batch_size=FLAGS.batch_size,
                   flip=FLAGS.flip, max_shards=FLAGS.max_shards, log=lambda line: print(line, flush=True))


def run():
    """The console entry point."""
    cli.run(main)


if __name__ == "__main__":
    run()

"""DiT-XL/2 on ImageNet 256x256 in the Stable Diffusion autoencoder's latents (Peebles & Xie 2023): a TPU-pod run.

Not trained here. The paper's settings: 32x32x4 latents of ``sd-vae-ft-ema`` (f = 8,
``scaling_factor`` 0.18215), the class-conditional DiT-XL/2 (675M parameters, 256 tokens) with a
learned variance (``learn_sigma``: the hybrid objective, eps + the interpolation of the variance),
T = 1000 linear betas 1e-4..0.02, AdamW lr 1e-4 with no weight decay and no warmup (Adam: jaxdiff's
optimizer has no decay), no gradient clipping, batch 256, EMA 0.9999, label dropout 0.1,
horizontal flips, 7M steps (FID 2.27 with guidance 1.5; 400k steps give the paper's ablation
numbers). FID: 50,000 samples of 250 DDPM steps with classifier-free guidance 1.5 (DiT's code
guides only the first three of the four latent channels; jaxdiff guides all four).

Encode the dataset once (``sd-vae-ft-ema`` as a local diffusers folder; ``--flip`` stores the
flipped images' latents for ``random_flip``: about 80 GB float32 on a local disk, memory-mapped),
then run the same command on every host of the slice::

    python -m jaxdiff.prepare imagenet2012 --data_dir DATA
    jaxdiff-encode --vae sd-vae-ft-ema --dataset imagenet2012 --data_dir DATA --image_size 256 --flip \
        --batch_size 256 --output latents/imagenet256
    jaxdiff-train --config jaxdiff/configs/imagenet256_dit.py --workdir gs://BUCKET/dit_xl_2 \
        --config.data.latents=latents/imagenet256 --config.data.data_dir=DATA
    jaxdiff-eval --workdir gs://BUCKET/dit_xl_2 --fid --nobpd --inception pt_inception.safetensors \
        --ref_stats imagenet256_train.npz --num_samples 50000

Samples (``jaxdiff-sample``, the grids, ``jaxdiff-eval --fid``) are decoded by the manifest's
autoencoder (``config.data.vae`` names another folder).
"""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "imagenet2012"
    config.data.image_size = 256
    config.data.random_flip = True
    config.data.latents = "latents/imagenet256"  # jaxdiff-encode's output (above)
    config.data.latent_draw = "sample"  # a fresh posterior sample each step, as DiT trains

    config.model.preset = "dit_xl_2"
    config.model.class_conditional = True

    config.diffusion.objective = "diffusion"
    config.diffusion.schedule = "linear"
    config.diffusion.num_timesteps = 1000
    config.diffusion.prediction = "epsilon"
    config.diffusion.learned_variance = True

    config.train.num_steps = 7_000_000
    config.train.global_batch_size = 256
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 0
    config.train.grad_clip = 0.0  # DiT does not clip
    config.train.ema_decay = 0.9999
    config.train.label_dropout = 0.1
    config.train.log_every = 100
    config.train.checkpoint_every = 50_000
    config.train.sample_every = 50_000

    config.sample.sampler = "ddpm"
    config.sample.num_steps = 250
    config.sample.guidance = 1.5
    config.sample.clip_x0 = False  # latents are not images in [-1, 1]
    config.sample.num_samples = 64

    config.eval.features = "inception"
    config.parallel.mode = "sharding"
    return config

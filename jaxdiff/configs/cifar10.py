"""CIFAR-10 with the DDPM paper's settings (Ho et al. 2020, appendix B).

T=1000 linear betas 1e-4..0.02, the 35.7M-parameter UNet (ch 128, multipliers (1,2,2,2),
2 blocks per level, attention at 16x16, dropout 0.1), Adam 2e-4, batch 128, warmup 5000,
800k steps, EMA 0.9999, gradient clipping 1.0, random horizontal flips.

Prepare once, then train on a TPU VM / pod slice (every host runs the same command)::

    pip install -e '.[prepare]' && python -m jaxdiff.prepare cifar10
    jaxdiff-train --config jaxdiff/configs/cifar10.py --workdir gs://BUCKET/cifar10

Expect FID near 3 (the paper: 3.17) after 800k steps; ~21 steps/s on a TPU v3-8 in the paper.
"""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "cifar10"
    config.data.random_flip = True
    config.model.preset = "ddpm_cifar10"
    config.model.class_conditional = False
    config.train.num_steps = 800_000
    config.train.global_batch_size = 128
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 5000
    config.train.grad_clip = 1.0
    config.train.ema_decay = 0.9999
    config.train.log_every = 100
    config.train.checkpoint_every = 10_000
    config.train.sample_every = 50_000
    config.sample.num_samples = 64
    return config

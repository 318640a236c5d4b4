"""SiT-XL/2 on ImageNet 256x256 latents (Ma et al. 2024): DiT-XL/2 trained by flow matching; a TPU-pod run.

Not trained here. The DiT run of ``jaxdiff/configs/imagenet256_dit.py`` (the same latents, network,
optimizer, batch 256, EMA 0.9999, 7M steps) with the linear interpolant's velocity as the target
(``diffusion.objective = "flow_matching"``; no learned variance) and the probability-flow ODE as the
sampler: 250 Euler steps (``--sampler heun --steps 125`` for Heun at 249 network calls), guidance
1.5 (SiT-XL/2's FID: 2.06 with its SDE sampler, 2.15 with the ODE). jaxdiff's Euler and Heun step
on the Karras sigma grid of ``t = sigma / (1 + sigma)``, not SiT's uniform ``t`` grid. Commands::

    jaxdiff-train --config jaxdiff/configs/imagenet256_sit.py --workdir gs://BUCKET/sit_xl_2 \
        --config.data.latents=latents/imagenet256 --config.data.data_dir=DATA
    jaxdiff-eval --workdir gs://BUCKET/sit_xl_2 --fid --nobpd --inception pt_inception.safetensors \
        --ref_stats imagenet256_train.npz --num_samples 50000
"""

from jaxdiff.configs import imagenet256_dit


def get_config():
    config = imagenet256_dit.get_config()
    config.diffusion.objective = "flow_matching"
    config.diffusion.learned_variance = False
    config.sample.sampler = "euler"
    config.sample.num_steps = 250
    return config

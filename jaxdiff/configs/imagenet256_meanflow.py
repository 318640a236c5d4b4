"""MeanFlow DiT-B/2 on ImageNet 256x256 latents (Geng et al. 2025): one-step generation; a TPU-pod run.

Not trained here. The latents and optimizer of ``jaxdiff/configs/imagenet256_dit.py`` (batch 256,
lr 1e-4, EMA 0.9999) with the MeanFlow objective and the paper's settings for DiT-B/2 (its
Table 4): 25% of examples at ``r != t`` (``meanflow.ratio``), logit-normal times ``(-0.4, 1.0)``,
the adaptive loss weight with ``p = 1.0``, 240 epochs (1.2M steps), sampled in one jump of the
average velocity (the ``meanflow`` sampler, 1 network call; ``--steps 2`` for two). The paper's
1-NFE FID for B/2 is 6.17 with its guidance folded into the training target: here
``meanflow.guidance = 1.0`` (omega) with ``meanflow.guidance_kappa = 0.5`` (the mixture with the
network's own conditional velocity; effective scale omega / (1 - kappa) = 2), label dropout 0.1, so
it samples at scale 1 ("guidance as trained"). Adam with ``beta2 = 0.95`` as the paper. Commands::

    jaxdiff-train --config jaxdiff/configs/imagenet256_meanflow.py --workdir gs://BUCKET/meanflow_b_2 \
        --config.data.latents=latents/imagenet256 --config.data.data_dir=DATA
    jaxdiff-eval --workdir gs://BUCKET/meanflow_b_2 --fid --nobpd --inception pt_inception.safetensors \
        --ref_stats imagenet256_train.npz --num_samples 50000 --steps 1
"""

from jaxdiff.configs import imagenet256_dit


def get_config():
    config = imagenet256_dit.get_config()
    config.model.preset = "dit_b_2"
    config.diffusion.objective = "meanflow"
    config.diffusion.learned_variance = False
    config.diffusion.meanflow.ratio = 0.25
    config.diffusion.meanflow.p_mean = -0.4
    config.diffusion.meanflow.p_std = 1.0
    config.diffusion.meanflow.weight_p = 1.0
    config.diffusion.meanflow.guidance = 1.0  # omega
    config.diffusion.meanflow.guidance_kappa = 0.5  # effective scale omega / (1 - kappa) = 2
    config.train.adam_b2 = 0.95
    config.train.num_steps = 1_200_000  # 240 epochs of 1,281,167 images at batch 256
    config.sample.sampler = "meanflow"
    config.sample.num_steps = 1
    config.sample.guidance = 1.0  # guidance is trained into the model (see above)
    return config

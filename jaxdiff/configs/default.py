"""Default config: every setting of a training run, with the values the other configs start from.

Not meant to be trained as is (it is the digits setup with the DDPM paper's optimizer); use
``jaxdiff/configs/digits.py``, ``jaxdiff/configs/mnist.py`` or ``jaxdiff/configs/cifar10.py``.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"  # "digits" (offline, ships with scikit-learn) or a TFDS image dataset
    config.data.split = "train"
    config.data.data_dir = ""  # TFDS data_dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.image_size = 0  # 0 = the dataset's own size; else resize to this square size
    config.data.random_flip = False
    config.data.prefetch = 2
    # Latent diffusion (jaxdiff.latents): a folder written by jaxdiff-encode from the images above; "" = pixels.
    # The network trains on (z - shift_factor) * scaling_factor and samples are decoded by the autoencoder.
    config.data.latents = ""
    config.data.latent_draw = "sample"  # sample: z = mean + std * eps afresh each step (DiT) | mean: posterior mean
    config.data.vae = ""  # the autoencoder folder that decodes samples; "" = the one the latents' manifest names

    config.model = ml_collections.ConfigDict()
    config.model.preset = "digits"  # a name in jaxdiff.models.PRESETS (digits, tiny, small, ddpm_cifar10)
    # Overrides of the preset's UNet fields; None keeps the preset's value.
    config.model.ch = placeholder(int)
    config.model.ch_mult = placeholder(tuple)
    config.model.num_res_blocks = placeholder(int)
    config.model.attn_resolutions = placeholder(tuple)
    config.model.dropout = placeholder(float)
    config.model.scale_shift = placeholder(bool)
    config.model.num_heads = placeholder(int)
    config.model.norm_groups = placeholder(int)  # every GroupNorm's groups (the digits preset: 16)
    # A DiT preset's block options (jaxdiff.models.dit); None keeps the preset's (the paper's block).
    config.model.norm = placeholder(str)  # layernorm | rmsnorm
    config.model.qk_norm = placeholder(bool)  # RMSNorm on q and k per head
    config.model.mlp = placeholder(str)  # gelu | swiglu
    config.model.rope = placeholder(bool)  # 2-D rotary positions on q and k (sin-cos positions kept)
    config.model.class_conditional = False  # labels -> the UNet's class embedding (+ null label)
    config.model.dtype = placeholder(str)  # removed: set train.compute_dtype (setting this raises)
    config.model.remat = False
    # How the convolutions are differentiated (same values): auto = matmuls on the CPU backend, XLA's elsewhere.
    config.model.conv_backward = "auto"  # auto | xla | taps

    config.diffusion = ml_collections.ConfigDict()
    # diffusion | flow_matching (rectified flow, jaxdiff.flow) | edm (Karras et al. 2022, jaxdiff.edm:
    # the UNet preconditioned as a denoiser D(x, sigma); schedule, prediction, weighting unused) |
    # meanflow (Geng et al. 2025, jaxdiff.meanflow: average velocities, 1- or n-step sampling) |
    # consistency (iCT consistency training, jaxdiff.consistency: 1- or n-step sampling) |
    # consistency_distillation (CD from a teacher workdir, config.distill below)
    config.diffusion.objective = "diffusion"
    config.diffusion.schedule = "linear"  # linear | cosine | sigmoid
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02
    config.diffusion.prediction = "epsilon"  # epsilon | x0 | v
    config.diffusion.weighting = "uniform"  # uniform | min_snr | elbo
    config.diffusion.min_snr_gamma = 5.0
    config.diffusion.learned_variance = False  # hybrid objective; the UNet outputs 2C channels
    # objective="edm" only (EDM Table 1): the data's standard deviation in the preconditioning and
    # the loss weight, and the training noise levels ln(sigma) ~ N(p_mean, p_std^2).
    config.diffusion.sigma_data = 0.5
    config.diffusion.p_mean = -1.2
    config.diffusion.p_std = 1.2
    # objective="meanflow" only: the share of examples with r != t, the logit-normal time sampler
    # (logit t ~ N(p_mean, p_std^2)) and the adaptive weight's power p (0: plain L2).
    config.diffusion.meanflow = ml_collections.ConfigDict()
    config.diffusion.meanflow.ratio = 0.25
    config.diffusion.meanflow.p_mean = -0.4
    config.diffusion.meanflow.p_std = 1.0
    config.diffusion.meanflow.weight_p = 1.0
    # classifier-free guidance folded into the target (class-conditional models with label dropout):
    # omega (1: off) and kappa of v_tilde = omega v + kappa u(c) + (1 - omega - kappa) u(null);
    # the effective scale is omega / (1 - kappa), and sampling then needs no guidance.
    config.diffusion.meanflow.guidance = 1.0
    config.diffusion.meanflow.guidance_kappa = 0.0
    # objective="consistency" only (iCT): the curriculum's length (set it to train.num_steps) and its
    # N from s0 to s1, and the log-normal level weights (P_mean, P_std); sigma_data above is used too.
    config.diffusion.consistency = ml_collections.ConfigDict()
    config.diffusion.consistency.curriculum_steps = 3000
    config.diffusion.consistency.s0 = 10
    config.diffusion.consistency.s1 = 1280
    config.diffusion.consistency.p_mean = -1.1
    config.diffusion.consistency.p_std = 2.0
    # objective="consistency_distillation" only (CD, jaxdiff.objectives.distillation): the teacher's
    # workdir (a trained edm / diffusion / flow_matching run of the same image shape and classes;
    # its EMA parameters, frozen and kept out of the student's checkpoints), the fixed Karras grid's
    # N, the registry sampler whose one ODE step is the teacher's move (heun | euler), and the
    # distance (pseudo_huber as iCT | l2).
    config.distill = ml_collections.ConfigDict()
    config.distill.teacher = ""
    config.distill.num_scales = 18
    config.distill.teacher_sampler = "heun"
    config.distill.distance = "pseudo_huber"

    config.train = ml_collections.ConfigDict()
    config.train.num_steps = 3000
    config.train.global_batch_size = 128
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 100
    config.train.grad_clip = 1.0
    config.train.adam_b2 = 0.999  # Adam's second-moment decay (MeanFlow and other transformer recipes: 0.95)
    config.train.ema_decay = 0.999
    config.train.label_dropout = 0.1  # classifier-free guidance training (conditional models only)
    # Mixed precision: the network computes in compute_dtype ("bfloat16" on accelerators), with its
    # normalisation statistics, softmax and the loss in float32; param_dtype is the master weights'
    # dtype, and so the optimizer state's and the EMA's ("bfloat16" halves their memory, but updates
    # smaller than 2^-8 of a weight are lost: for the largest runs only).
    config.train.compute_dtype = "float32"  # float32 | bfloat16
    config.train.param_dtype = "float32"  # float32 | bfloat16
    # Gradient accumulation: the step takes each device's batch in this many sequential microbatches
    # (the same update as one batch; the activations of one microbatch at a time). Divides the per-device batch.
    config.train.microbatches = 1
    # The device's peak FLOP/s for the logged MFU; 0 = from jaxdiff.training.throughput.PEAK_FLOPS
    # (bf16 dense, by device kind; unknown kinds log no MFU).
    config.train.peak_flops = 0.0
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.sample_every = 1000  # 0 = only at the end
    # Post-hoc EMA (EDM2 sec. 3): power-function EMAs of these relative widths are tracked in the
    # train state (len(sigma_rels) extra float32 copies of the params, in memory and in every
    # checkpoint) and saved every snapshot_every steps to workdir/posthoc_ema/ (one .safetensors
    # of len(sigma_rels) x params per snapshot); jaxdiff-posthoc-ema reconstructs any
    # sigma_rel from them afterwards. () = off.
    config.train.posthoc_ema = ml_collections.ConfigDict()
    config.train.posthoc_ema.sigma_rels = ()
    config.train.posthoc_ema.snapshot_every = 500

    config.sample = ml_collections.ConfigDict()
    config.sample.sampler = "ddim"
    config.sample.num_steps = 50
    config.sample.eta = 0.0
    config.sample.guidance = 1.0  # classifier-free guidance scale w (1 = the conditional model)
    config.sample.num_samples = 64
    config.sample.clip_x0 = True

    # Sample quality of the EMA model during and after training (jaxdiff.training.quality), logged as eval/*.
    config.eval = ml_collections.ConfigDict()
    config.eval.every = 0  # steps between evaluations; 0 = off
    config.eval.num_samples = 1000  # samples per evaluation (published FIDs use 50,000: jaxdiff-eval --fid)
    config.eval.final_samples = 0  # samples of one evaluation after the last step (WORKDIR/eval_final.json); 0 = none
    config.eval.sampler = ""  # "" = config.sample.sampler
    config.eval.steps = 0  # 0 = config.sample.num_steps
    config.eval.features = "digits"  # digits (offline, 8x8x1 images only) | inception (needs eval.inception)
    config.eval.inception = ""  # FID Inception weights (.safetensors, python -m jaxdiff.metrics.convert_inception)
    config.eval.ref_stats = ""  # .npz of python -m jaxdiff.metrics.stats; "" = the held-out digits / dataset images
    config.eval.batch_size = 250

    config.parallel = ml_collections.ConfigDict()
    config.parallel.mode = "pmap"  # pmap | sharding | fsdp (jaxdiff.training.parallel)
    # fsdp only: the 2-D mesh's sizes (data x fsdp = all devices; -1 = all remaining devices). The
    # state is sharded over the fsdp axis and replicated over the data axis; the batch over both.
    config.parallel.data = 1
    config.parallel.fsdp = -1
    config.parallel.min_shard_size = 2**14  # fsdp only: leaves of fewer elements stay replicated
    return config

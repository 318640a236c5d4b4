"""Every shipped config passes the training setup's validation without data, and the ImageNet 256 ones
hold the papers' settings (DiT, SiT, MeanFlow)."""

import os

import pytest

from jaxdiff.training.setup import get_config, validate_config

CONFIGS = sorted(n[:-3] for n in os.listdir(os.path.join(os.path.dirname(__file__), "..", "jaxdiff", "configs"))
                 if n.endswith(".py") and not n.startswith("_"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates(name):
    validate_config(get_config(name), num_devices=8)


def test_imagenet256_dit_is_the_papers_run():
    c = get_config("imagenet256_dit")
    assert (c.model.preset, c.model.class_conditional, c.diffusion.learned_variance) == ("dit_xl_2", True, True)
    assert (c.data.name, c.data.image_size, c.data.random_flip, c.data.latent_draw) == ("imagenet2012", 256, True,
                                                                                       "sample")
    assert c.data.latents
    assert (c.train.global_batch_size, c.train.learning_rate, c.train.ema_decay, c.train.num_steps) == \
        (256, 1e-4, 0.9999, 7_000_000)
    assert (c.sample.sampler, c.sample.num_steps, c.sample.guidance, c.sample.clip_x0) == ("ddpm", 250, 1.5, False)
    objective = validate_config(c)
    assert objective.name == "diffusion" and objective.learned_variance


def test_imagenet256_sit_and_meanflow():
    sit = get_config("imagenet256_sit")
    assert validate_config(sit).name == "flow_matching"
    assert (sit.model.preset, sit.sample.sampler, sit.sample.num_steps) == ("dit_xl_2", "euler", 250)
    mf = get_config("imagenet256_meanflow")
    assert validate_config(mf).name == "meanflow"
    m = mf.diffusion.meanflow
    assert (mf.model.preset, m.ratio, m.p_mean, m.p_std, m.weight_p) == ("dit_b_2", 0.25, -0.4, 1.0, 1.0)
    assert (mf.sample.sampler, mf.sample.num_steps, mf.sample.guidance) == ("meanflow", 1, 1.0)
    assert (m.guidance, m.guidance_kappa, mf.train.adam_b2) == (1.0, 0.5, 0.95)  # guidance trained in


def test_adam_b2_is_the_optimizers_second_moment_decay():
    """The run's optimizer is Adam with config.train.adam_b2, against Adam written out in float64."""
    import jax.numpy as jnp
    import numpy as np

    from jaxdiff.training.setup import resolve

    c = get_config("digits")
    c.train.adam_b2, c.train.warmup_steps, c.train.grad_clip, c.train.learning_rate = 0.95, 0, None, 1e-2
    tx = resolve(c).tx
    w = {"w": jnp.array([0.5, -1.0, 2.0], jnp.float32)}
    state = tx.init(w)
    m = v = np.zeros(3)
    ref = np.array([0.5, -1.0, 2.0])
    for k, g in enumerate(([0.3, -2.0, 1.0], [-0.1, 0.5, 4.0], [1.0, 1.0, -1.0]), start=1):
        g = np.array(g)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, w)
        w = {"w": w["w"] + updates["w"]}
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g * g
        ref = ref - 1e-2 * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.95 ** k)) + 1e-8)
    np.testing.assert_allclose(np.asarray(w["w"]), ref, rtol=1e-6)
    c.train.adam_b2 = 1.0
    with pytest.raises(ValueError, match="config.train.adam_b2=1.0"):
        validate_config(c)


def test_a_latent_config_must_not_clip_to_the_image_range():
    c = get_config("imagenet256_dit")
    c.sample.clip_x0 = True
    with pytest.raises(ValueError, match=r"config\.sample\.clip_x0"):
        validate_config(c)
    c.sample.clip_x0 = False
    c.data.latent_draw = "median"
    with pytest.raises(ValueError, match=r"config\.data\.latent_draw"):
        validate_config(c)

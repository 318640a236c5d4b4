"""MeanFlow (jaxdiff.meanflow, objectives.MeanFlow, the meanflow sampler) against exact maps.

Reference: Gaussian data ``x0 ~ N(m, s^2)`` per coordinate. The linear interpolant's marginals are
``N(mu_t, sigma_t^2)`` with ``mu_t = (1 - t) m``, ``sigma_t^2 = (1 - t)^2 s^2 + t^2``, and its
probability-flow map is the affine ``Phi_{t->r}(z) = mu_r + sigma_r / sigma_t (z - mu_t)``, so the
exact average velocity ``u*(z, r, t) = (z - Phi_{t->r}(z)) / (t - r)`` and the marginal velocity
``v*(z, t)`` are closed-form (float64 NumPy below, float32 JAX for the models).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jaxdiff import meanflow, objectives, samplers
from jaxdiff.training.setup import make_model

M = np.array([0.5, -1.0])
S = np.array([0.6, 1.5])


def _stats(t, xp):
    m, s = xp.asarray(M)[None, :], xp.asarray(S)[None, :]
    mu = (1 - t)[:, None] * m
    sig = xp.sqrt((1 - t)[:, None] ** 2 * s**2 + t[:, None] ** 2)
    return mu, sig


def u_exact(z, r, t, xp=np):
    """``u*(z, r, t)``; ``v*(z, t)`` where ``r = t``."""
    mu_t, sig_t = _stats(t, xp)
    mu_r, sig_r = _stats(r, xp)
    dsig = (-(1 - t)[:, None] * xp.asarray(S)[None, :] ** 2 + t[:, None]) / sig_t
    v = -xp.asarray(M)[None, :] + dsig / sig_t * (z - mu_t)
    gap = (t - r)[:, None]
    safe = xp.where(gap > 1e-4, gap, 1.0)
    u = (z - (mu_r + sig_r / sig_t * (z - mu_t))) / safe
    return xp.where(gap > 1e-4, u, v)


def u_jax(z, r, t):
    return u_exact(z.astype(jnp.float32), r, t, xp=jnp).astype(jnp.float32)


def test_the_jvp_target_of_the_exact_average_velocity_is_itself():
    """The MeanFlow identity u = v - (t - r) du/dt, with the marginal velocity and one jvp."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    n = 512
    a, b = jax.random.uniform(k1, (2, n), minval=0.02, maxval=0.98)
    r, t = jnp.minimum(a, b), jnp.maximum(a, b) + 0.01
    z = jax.random.normal(k2, (n, 2)) * 1.3
    v = u_jax(z, t, t)
    u, target = meanflow.meanflow_target(u_jax, z, r, t, v)
    want = u_exact(np.asarray(z, np.float64), np.asarray(r, np.float64), np.asarray(t, np.float64))
    np.testing.assert_allclose(np.asarray(u), want, rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(np.asarray(target), want, rtol=2e-3, atol=2e-3)
    # the total derivative matters: the partial in t alone (tangent (0, 0, 1)) misses it
    _, wrong = meanflow.meanflow_target(u_jax, z, r, t, jnp.zeros_like(v))
    assert np.max(np.abs(np.asarray(wrong) - want)) > 0.05


def _exact_net(z, time):
    t, gap = time[:, 0] / 999.0, time[:, 1] / 999.0
    return u_jax(z, t - gap, t)


@pytest.mark.parametrize("num_steps", [1, 2])
def test_one_and_two_steps_of_the_exact_model_reproduce_the_data_law(num_steps):
    den = objectives.MeanFlow().denoiser(_exact_net)
    x, info = samplers.sample_denoiser(den, jax.random.key(1), (4000, 2), sampler="meanflow", num_steps=num_steps)
    assert int(info["nfe"]) == num_steps
    x = np.asarray(x, np.float64)
    for d in range(2):
        assert scipy.stats.kstest(x[:, d], "norm", args=(M[d], S[d])).pvalue > 1e-3
    # the same model through its instantaneous velocity u(z, t, t) is a flow: Heun samples it too
    y, _ = samplers.sample_denoiser(den, jax.random.key(1), (4000, 2), sampler="heun", num_steps=32)
    assert scipy.stats.kstest(np.asarray(y)[:, 1], "norm", args=(M[1], S[1])).pvalue > 1e-3


def _per_example_grads(theta, n=20000, p=0.0):
    """d/dtheta of each example's loss for u = u* + theta z (the objective's (r, t) and noise draws)."""
    obj = objectives.MeanFlow(ratio=1.0, weight_p=p)
    keys = jax.random.split(jax.random.key(3), n)
    level = jax.vmap(obj.noise_level)(keys)
    x0 = jnp.asarray(M[None] + S[None] * np.asarray(jax.random.normal(jax.random.key(4), (n, 2))), jnp.float32)
    noise = jax.random.normal(jax.random.key(5), (n, 2))

    def one(th, x, lv, e):
        net = lambda z, time: _exact_net(z, time) + th * z
        return obj.loss(net, x[None], None, level=lv[None], noise=e[None])[0]

    return np.asarray(jax.vmap(jax.grad(one), in_axes=(None, 0, 0, 0))(theta, x0, level, noise), np.float64)


def test_the_loss_gradient_at_the_exact_model_is_zero_in_expectation():
    g = _per_example_grads(0.0)
    se = g.std() / np.sqrt(g.size)
    assert abs(g.mean()) < 5 * se
    g = _per_example_grads(0.2)  # a perturbed model is pushed back
    assert g.mean() > 5 * g.std() / np.sqrt(g.size)


def test_the_time_sampler_is_the_paper_s():
    n = 20000
    rt = np.asarray(jax.vmap(lambda k: meanflow.sample_r_t(k, ratio=0.25))(jax.random.split(jax.random.key(6), n)),
                    np.float64)
    r, t = rt[:, 0], rt[:, 1]
    assert np.all(r <= t) and np.all((t > 0) & (t < 1))
    differ = r < t
    assert abs(differ.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
    logit = lambda x: np.log(x / (1 - x))
    cdf = lambda x: scipy.stats.norm.cdf(x, -0.4, 1.0)
    assert scipy.stats.kstest(logit(t[differ]), lambda x: cdf(x) ** 2).pvalue > 1e-3  # the max of two
    assert scipy.stats.kstest(logit(r[differ]), lambda x: 1 - (1 - cdf(x)) ** 2).pvalue > 1e-3  # the min
    assert scipy.stats.kstest(logit(t[~differ]), lambda x: cdf(x) ** 2).pvalue > 1e-3  # r = t: t is still the max


def _tiny_unet(conv_backward, remat=False):
    from training_utils import tiny_config

    config = tiny_config()
    config.model.conv_backward = conv_backward
    config.model.remat = remat
    config.model.norm_groups = 2  # one channel per group would normalise the time embedding's bias away
    return make_model(config.model, num_classes=None, learned_variance=False, time_inputs=2)


def test_the_unet_takes_two_time_inputs_and_jvp_goes_through_every_convolution_rule():
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    unet = _tiny_unet("xla")
    params = unet.init(jax.random.key(1), x, jnp.zeros((3, 2)))["params"]
    params = jax.tree.map(lambda p: p + 0.02, params)  # a non-zero output layer
    assert {"temb_dense0", "temb2_dense0", "temb2_dense1"} <= set(params)
    f = lambda p, time: unet.apply({"params": p}, x, time)
    a, b = f(params, jnp.array([[500.0, 0.0]] * 3)), f(params, jnp.array([[500.0, 300.0]] * 3))
    assert not np.allclose(np.asarray(a), np.asarray(b))  # the interval input reaches the output
    with pytest.raises(ValueError, match=r"t must have shape \[3, 2\]"):
        unet.apply({"params": params}, x, jnp.zeros((3,)))
    obj, noise = objectives.MeanFlow(ratio=1.0), jax.random.normal(jax.random.key(2), x.shape)
    level = jax.vmap(obj.noise_level)(jax.random.split(jax.random.key(3), 3))

    def loss_and_grad(model):
        fn = lambda p: obj.loss(lambda z, time: model.apply({"params": p}, z, time), x, None,
                                level=level, noise=noise)[0]
        return jax.jit(jax.value_and_grad(fn))(params)

    ref_loss, ref_grad = loss_and_grad(unet)
    for other in (_tiny_unet("taps"), _tiny_unet("taps", remat=True)):
        loss, grad = loss_and_grad(other)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
        for g, h in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=2e-3, atol=1e-6)


def test_config_errors_name_the_meanflow_field():
    from training_utils import tiny_config

    config = tiny_config()
    config.diffusion.objective = "meanflow"
    config.diffusion.meanflow.ratio = 1.5
    with pytest.raises(ValueError, match=r"config.diffusion.meanflow.ratio=1.5"):
        objectives.from_config(config.diffusion)


# Guided training (MeanFlow Sec. 4.2): class c ~ N(m_c, s^2) per coordinate, and the null label's model
# N(m_null, s^2) (a Gaussian, so that the guided field is Gaussian too). Every velocity of N(m, s^2) is
# affine in m, so the guided field w v(.|c) + (1 - w) v(.|null) is the field of N(w m_c + (1 - w) m_null,
# s^2), whose exact average velocity is closed-form: the target with that u* must give u* back.
CLASS_M = np.array([[1.0, -0.5], [-1.0, 0.8]])
NULL_M = np.array([0.2, 0.1])
GS = np.array([0.6, 0.9])


def _gauss_u(z, r, t, m, xp=np):
    """u*(z, r, t) of N(m [B, D], GS^2) (v* where r = t), float64 NumPy or float32 JAX."""
    s = xp.asarray(GS)[None, :]
    mu = lambda a: (1 - a)[:, None] * m
    sig = lambda a: xp.sqrt((1 - a)[:, None] ** 2 * s**2 + a[:, None] ** 2)
    v = -m + (-(1 - t)[:, None] * s**2 + t[:, None]) / sig(t) ** 2 * (z - mu(t))
    gap = (t - r)[:, None]
    safe = xp.where(gap > 1e-4, gap, 1.0)
    u = (z - (mu(r) + sig(r) / sig(t) * (z - mu(t)))) / safe
    return xp.where(gap > 1e-4, u, v)


def _guided_means(y, w, xp=np):
    """The mean whose field the network learns for label y (2 = null): w m_c + (1 - w) m_null."""
    m_c = xp.asarray(CLASS_M)[xp.minimum(y, 1)]
    m_w = w * m_c + (1 - w) * xp.asarray(NULL_M)[None, :]
    return xp.where((y == 2)[:, None], xp.asarray(NULL_M)[None, :], m_w)


def _guided_case(n=256, seed=3):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    a, b = jax.random.uniform(k1, (2, n), minval=0.05, maxval=0.95)
    r = jnp.minimum(a, b).at[: n // 4].set(jnp.maximum(a, b)[: n // 4])  # some r = t, as the sampler makes
    t = jnp.maximum(a, b)
    z = jax.random.normal(k2, (n, 2)) * 1.2
    y = jax.random.randint(k3, (n,), 0, 3)  # 2: the null label
    return z, r, t, y


@pytest.mark.parametrize("omega,kappa", [(2.0, 0.0), (1.5, 0.4), (1.0, 0.5)])
def test_the_guided_target_of_the_exact_guided_average_velocity_is_itself(omega, kappa):
    w = omega / (1 - kappa)  # the effective scale
    z, r, t, y = _guided_case()
    f32 = lambda a: jnp.asarray(a, jnp.float32)

    def u_of(labels):
        return lambda zz, rr, tt: _gauss_u(zz, rr, tt, f32(_guided_means(labels, w, jnp)), jnp)

    # the per-example v replaced by its conditional mean: v*(z, t | c), and v*(z, t | null) for null examples
    m_data = np.where((np.asarray(y) == 2)[:, None], NULL_M[None, :], CLASS_M[np.minimum(np.asarray(y), 1)])
    v = _gauss_u(z, t, t, f32(m_data), jnp)
    v_tilde = meanflow.guided_velocity(v, u_of(y)(z, t, t), u_of(jnp.full_like(y, 2))(z, t, t), y != 2,
                                       omega=omega, kappa=kappa)
    _, target = meanflow.meanflow_target(u_of(y), z, r, t, v_tilde)
    z64, r64, t64 = (np.asarray(a, np.float64) for a in (z, r, t))
    want = _gauss_u(z64, r64, t64, _guided_means(np.asarray(y), w))
    np.testing.assert_allclose(np.asarray(target), want, rtol=2e-3, atol=2e-3)
    # the unguided target of the same network misses it (the guidance is really in the target)
    _, plain = meanflow.meanflow_target(u_of(y), z, r, t, v)
    assert np.max(np.abs(np.asarray(plain) - want)[np.asarray(y) != 2]) > 0.05


def _labelled_exact_net(w):
    def net(zz, time, labels):
        tt, gap = time[:, 0] / 999.0, time[:, 1] / 999.0
        return _gauss_u(zz, tt - gap, tt, _guided_means(labels, w, jnp).astype(jnp.float32), jnp)
    return net


def test_the_guided_objective_loss_vanishes_at_the_exact_guided_model():
    """Through objectives.MeanFlow.loss: labels, the null label's second call, and x0 / noise chosen so
    that the per-example v is the conditional mean (x0 = z - t v, noise = z + (1 - t) v)."""
    omega, kappa = 1.5, 0.4
    z, r, t, y = _guided_case(seed=5)
    m_data = np.where((np.asarray(y) == 2)[:, None], NULL_M[None, :], CLASS_M[np.minimum(np.asarray(y), 1)])
    v = _gauss_u(z, t, t, jnp.asarray(m_data, jnp.float32), jnp)
    x0, noise = z - t[:, None] * v, z + (1 - t)[:, None] * v
    net_w = _labelled_exact_net(omega / (1 - kappa))
    obj = objectives.MeanFlow(weight_p=0.0, guidance=omega, guidance_kappa=kappa)
    bound = lambda zz, time, labels=y: net_w(zz, time, labels)
    loss, _ = obj.loss(bound, x0, None, level=jnp.stack([r, t], 1), noise=noise, labels=y, null_label=2)
    assert float(loss) < 1e-5
    # plain MeanFlow (omega = 1) on the same guided network is far from its target
    plain, _ = objectives.MeanFlow(weight_p=0.0).loss(bound, x0, None, level=jnp.stack([r, t], 1), noise=noise,
                                                      labels=y, null_label=2)
    assert float(plain) > 1e-2


def test_the_default_guidance_leaves_the_target_unchanged():
    """omega = 1, kappa = 0: the loss is ||u - (v - (t - r) du/dt)||^2 with v = noise - x0, written here."""
    z, r, t, y = _guided_case(seed=7)
    x0 = jax.random.normal(jax.random.key(8), z.shape)
    noise = jax.random.normal(jax.random.key(9), z.shape)
    net = _labelled_exact_net(1.7)
    bound = lambda zz, time, labels=y: net(zz, time, labels)
    loss, _ = objectives.MeanFlow(weight_p=0.0).loss(bound, x0, None, level=jnp.stack([r, t], 1), noise=noise,
                                                     labels=y, null_label=2)
    # reference: float64, d/dt u by a central difference along (z + h v, t + h)
    x0_, e_, r_, t_ = (np.asarray(a, np.float64) for a in (x0, noise, r, t))
    zz = (1 - t_)[:, None] * x0_ + t_[:, None] * e_
    vv = e_ - x0_
    m = _guided_means(np.asarray(y), 1.7)
    h = 1e-5
    dudt = (_gauss_u(zz + h * vv, r_, t_ + h, m) - _gauss_u(zz - h * vv, r_, t_ - h, m)) / (2 * h)
    err = _gauss_u(zz, r_, t_, m) - (vv - (t_ - r_)[:, None] * dudt)
    np.testing.assert_allclose(float(loss), np.mean(err**2), rtol=2e-3)


def test_guidance_settings_are_checked():
    with pytest.raises(ValueError, match="guidance"):
        meanflow.check_guidance(0.0, 0.0)
    with pytest.raises(ValueError, match="guidance_kappa"):
        meanflow.check_guidance(1.0, 1.0)
    with pytest.raises(ValueError, match="u_null_fn"):
        meanflow.meanflow_loss(lambda z, r, t: z, jnp.zeros((2, 2)), r=jnp.zeros(2), t=jnp.ones(2) * 0.5,
                               noise=jnp.zeros((2, 2)), guidance=2.0)


def test_guided_training_settings_name_the_field():
    from jaxdiff.training.setup import resolve

    from training_utils import tiny_config

    def config(**mf):
        c = tiny_config()
        c.diffusion.objective, c.sample.sampler, c.sample.num_steps, c.sample.guidance = "meanflow", "meanflow", 1, 1.0
        for k, v in mf.items():
            c.diffusion.meanflow[k] = v
        return c

    with pytest.raises(ValueError, match=r"config.diffusion.meanflow.guidance=0.0"):
        resolve(config(guidance=0.0))
    with pytest.raises(ValueError, match=r"config.diffusion.meanflow.guidance_kappa=1.0"):
        resolve(config(guidance_kappa=1.0))
    c = config(guidance=2.0)
    c.model.class_conditional = False
    with pytest.raises(ValueError, match=r"config.diffusion.meanflow.guidance=2.0: .*class-conditional"):
        resolve(c)
    c = config(guidance=2.0)
    c.train.label_dropout = 0.0
    with pytest.raises(ValueError, match=r"config.diffusion.meanflow.guidance=2.0: .*label_dropout"):
        resolve(c)
    assert resolve(config(guidance=2.0, guidance_kappa=0.5)).objective.guided


def test_the_train_step_gives_guided_meanflow_its_labels():
    """Through the unchanged train step: the null label's branch is really the network under the null label
    (no label is dropped, so only the guided target's u(z, t, t | null) sees the null label's parameter)."""
    from jaxdiff.training.state import TrainState
    from jaxdiff.training.step import train_step

    def apply(variables, x, t, y, train=True, dropout_keys=None):
        scale = jnp.where(y == 3, variables["params"]["null"], variables["params"]["a"])
        return scale.reshape(-1, 1, 1, 1) * x + 0.001 * t[:, :1, None, None]

    tx = optax.sgd(0.0)
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 2, 2, 1)), "index": jnp.arange(8),
             "label": jnp.arange(8) % 3}

    def loss(objective, null_scale):
        params = {"a": jnp.asarray(0.5), "null": jnp.asarray(null_scale)}
        state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                           ema_params=params, apply_fn=apply, tx=tx, ema_decay=0.9, num_classes=3, label_dropout=0.0)
        return float(jax.jit(train_step)(state, batch, jax.random.key(2), objective)[1]["loss"])

    guided = objectives.MeanFlow(guidance=2.0, weight_p=0.0)
    assert loss(guided, 0.1) != pytest.approx(loss(guided, -0.7), rel=1e-3)
    plain = objectives.MeanFlow(weight_p=0.0)  # no label dropped: plain MeanFlow never calls the null branch
    assert loss(plain, 0.1) == loss(plain, -0.7)

"""Consistency distillation (objectives.ConsistencyDistillation, jaxdiff.consistency.cd_loss).

References: Gaussian data ``x0 ~ N(0, S^2)`` with its exact denoiser ``D(x, sigma) = x S^2 / (S^2 +
sigma^2)`` as the teacher, whose exact consistency function is the PF-ODE map to ``sigma_min``,
``f*(x, sigma) = x sqrt(S^2 + sigma_min^2) / sqrt(S^2 + sigma^2)``; the Heun step written here in
float64 from EDM's Algorithm 1; and the Gaussian-mixture oracle (jaxdiff.oracle) as an exact teacher
of a small MLP student, judged by the oracle metrics (MMD against the exact mixture, NLL gap).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdiff import consistency as ct
from jaxdiff import samplers
from jaxdiff.denoiser import Denoiser
from jaxdiff.objectives.distillation import ConsistencyDistillation
from jaxdiff.oracle import default_mixture
from jaxdiff.samplers import karras
from jaxdiff.training.workdir import load_workdir

S, SMIN, SMAX = 0.7, 0.002, 80.0


def gauss_denoiser(x, sigma):
    return x * (S**2 / (S**2 + sigma**2))[:, None]


def f_exact(x, sigma):
    return x * (math.sqrt(S**2 + SMIN**2) / jnp.sqrt(S**2 + sigma**2))[:, None]


def _gauss_teacher(params, x, sigma, labels):
    del params, labels
    return gauss_denoiser(x, sigma)


@pytest.mark.parametrize("corrector", [True, False])
def test_the_teacher_move_is_one_heun_or_euler_step(corrector):
    x = jax.random.normal(jax.random.key(0), (5, 2))
    s, s_to = jnp.array([80.0, 5.0, 1.0, 0.3, 0.01]), jnp.array([40.0, 3.0, 0.5, 0.2, 0.002])
    got = karras.ode_step(Denoiser(fn=gauss_denoiser), x, s, s_to, corrector=corrector)
    x64, s64, t64 = (np.asarray(a, np.float64) for a in (x, s, s_to))
    deriv = lambda xx, sg: (xx - xx * (S**2 / (S**2 + sg**2))[:, None]) / sg[:, None]
    d = deriv(x64, s64)
    x_e = x64 + (t64 - s64)[:, None] * d
    want = x64 + (t64 - s64)[:, None] * 0.5 * (d + deriv(x_e, t64)) if corrector else x_e
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def _cd_per_example(f, x0, z, sigma, nxt, distance):
    obj = ConsistencyDistillation().with_teacher(_gauss_teacher, (SMIN, SMAX), None)
    move = obj.teacher_move()

    def one(a, b, s, n):
        return ct.cd_loss(f, move, a[None], sigma=s[None], sigma_next=n[None], noise=b[None], distance=distance)[0]

    return np.asarray(jax.vmap(one)(x0, z, sigma, nxt), np.float64)


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2"])
def test_the_exact_consistency_function_minimises_the_cd_loss(distance):
    n, b = 18, 20000
    i = jax.random.randint(jax.random.key(3), (b,), 0, n - 1)
    grid = ct.karras_grid(jnp.arange(n), n)
    sigma, nxt = grid[i], grid[i + 1]
    x0 = S * jax.random.normal(jax.random.key(4), (b, 2))
    z = jax.random.normal(jax.random.key(5), (b, 2))
    perturbed = lambda eps: (lambda x, s: f_exact(x, s) * (1.0 + eps * ((s - SMIN) / s)[:, None]))
    base = _cd_per_example(f_exact, x0, z, sigma, nxt, distance)
    for eps in (-0.05, 0.05):
        diff = _cd_per_example(perturbed(eps), x0, z, sigma, nxt, distance) - base
        assert diff.mean() > 5 * diff.std() / math.sqrt(b), eps
    # an additive perturbation too (the scaling family is not the only direction)
    shifted = lambda x, s: f_exact(x, s) + 0.05 * ((s - SMIN) / s)[:, None]
    diff = _cd_per_example(shifted, x0, z, sigma, nxt, distance) - base
    assert diff.mean() > 5 * diff.std() / math.sqrt(b)


def test_the_objective_draws_adjacent_levels_of_the_fixed_grid_uniformly():
    obj = ConsistencyDistillation(num_scales=18)
    levels = np.asarray(jax.vmap(obj.noise_level)(jax.random.split(jax.random.key(1), 17000)), np.float64)
    rho = 7.0
    grid = (SMIN ** (1 / rho) + np.arange(18) / 17 * (SMAX ** (1 / rho) - SMIN ** (1 / rho))) ** rho
    idx = np.argmin(np.abs(levels[:, :1] - grid[None]), axis=1)
    np.testing.assert_allclose(levels[:, 0], grid[idx], rtol=1e-4)
    np.testing.assert_allclose(levels[:, 1], grid[idx + 1], rtol=1e-4)
    counts = np.bincount(idx, minlength=17)
    assert counts.shape == (17,) and counts.min() > 800 and counts.max() < 1200  # 1000 expected each
    f = ConsistencyDistillation().function(lambda x, t: jnp.ones_like(x) * 7.0)
    x = jnp.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(np.asarray(f(x, jnp.full((3,), SMIN))), np.asarray(x))  # f(x, sigma_min) = x


class MLP(nn.Module):
    width: int = 128

    @nn.compact
    def __call__(self, x, time):
        freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), 8))
        phase = time[:, None] / 1000.0 * freqs[None, :]
        h = jnp.concatenate([x, jnp.sin(phase), jnp.cos(phase)], axis=-1)
        for _ in range(3):
            h = nn.silu(nn.Dense(self.width)(h))
        return nn.Dense(x.shape[-1])(h)


def _mmd2(x, y, bw=0.5):
    """Unbiased squared MMD with a Gaussian kernel (float64 NumPy)."""
    k = lambda a, b: np.exp(-np.sum((a[:, None] - b[None]) ** 2, -1) / (2 * bw**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


@pytest.mark.slow
def test_distillation_from_the_exact_mixture_teacher_matches_the_mixture_in_one_step():
    mix = default_mixture(2)

    def teacher(params, x, sigma, labels):
        del params, labels
        one = jnp.ones_like(sigma)
        return x + (sigma**2)[:, None] * mix.score(x, one, sigma)

    obj = ConsistencyDistillation(sigma_data=1.0, distance="l2").with_teacher(teacher, (SMIN, SMAX), None)
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))["params"]
    steps = 4000
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    opt = tx.init(params)
    batch = 512

    @jax.jit
    def step(params, opt, key):
        k_x, k_l, k_z = jax.random.split(key, 3)
        x0 = mix.sample(k_x, batch)
        level = jax.vmap(obj.noise_level)(jax.random.split(k_l, batch))
        noise = jax.random.normal(k_z, x0.shape)
        loss_fn = lambda p: obj.loss(lambda x, t: model.apply({"params": p}, x, t), x0, None, level=level,
                                     noise=noise)[0]
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    def one_step_samples(p, n=2000):
        den = obj.denoiser(lambda x, t: model.apply({"params": p}, x, t))
        x, _ = samplers.sample_denoiser(den, jax.random.key(7), (n, 2), sampler="consistency", num_steps=1)
        return np.asarray(x, np.float64)

    def metrics(x):
        ref = np.asarray(mix.sample(jax.random.key(8), len(x)), np.float64)
        nll = lambda a: -float(np.mean(np.asarray(mix.log_prob(jnp.asarray(a, jnp.float32)))))
        return 1e4 * _mmd2(x, ref), nll(x) - nll(ref)

    before = metrics(one_step_samples(params))
    for s in range(steps):
        params, opt, _ = step(params, opt, jax.random.fold_in(jax.random.key(1), s))
    mmd, gap = metrics(one_step_samples(params))
    floor = metrics(np.asarray(mix.sample(jax.random.key(9), 2000), np.float64))  # exact samples
    print(f"mmd2 x1e4, nll gap: untrained {before[0]:.1f}, {before[1]:.3f}; distilled {mmd:.1f}, {gap:.3f}; "
          f"exact samples {floor[0]:.1f}, {floor[1]:.3f}")
    # Measured: 20.8, 0.33 after 4,000 steps (12.4, 0.21 after 10,000: the gap is the student's training);
    # the untrained map is at 11,443 and 14.7.
    assert before[0] > 1000 and before[1] > 5
    assert mmd < 35 and abs(gap) < 0.45


def test_config_errors_name_the_distill_field(tmp_path):
    from jaxdiff.training.setup import resolve

    from training_utils import tiny_config

    config = tiny_config()
    config.diffusion.objective = "consistency_distillation"
    config.sample.sampler = "consistency"
    config.sample.num_steps = 1
    for field, value, match in [
        ("teacher", "", "config.distill.teacher=''"),
        ("teacher", str(tmp_path), "config.distill.teacher=.*no checkpoints"),
        ("num_scales", 1, "config.distill.num_scales=1"),
        ("teacher_sampler", "ddim", "config.distill.teacher_sampler='ddim'"),
        ("distance", "l1", "config.distill.distance='l1'"),
    ]:
        c = tiny_config()
        c.diffusion.objective, c.sample.sampler, c.sample.num_steps = "consistency_distillation", "consistency", 1
        c.distill[field] = value
        with pytest.raises(ValueError, match=match):
            resolve(c, num_devices=1, load_workdir=load_workdir)
    # sampling a student (no training) needs no teacher
    assert resolve(config).objective.teacher is None


def test_a_workdir_teacher_is_checked_and_distils(tiny_workdir, tmp_path):
    """The tiny class-conditional digits diffusion run as the teacher: a mismatch of classes is named,
    and two training steps of a student run (its checkpoints hold no teacher parameters)."""
    from jaxdiff.training import loop
    from jaxdiff.training.setup import resolve

    from training_utils import final_params, tiny_config

    def student(**kw):
        c = tiny_config(**kw)
        c.diffusion.objective, c.sample.sampler, c.sample.num_steps = "consistency_distillation", "consistency", 1
        c.distill.teacher = tiny_workdir
        return c

    c = student()
    c.model.class_conditional, c.sample.guidance = False, 1.0
    with pytest.raises(ValueError, match="config.distill.teacher=.*num_classes=10; this run's has None"):
        resolve(c, num_devices=1, load_workdir=load_workdir)
    run = resolve(student(), num_devices=1, load_workdir=load_workdir)
    assert run.objective.teacher is not None and run.objective.sigma_min > SMIN  # clipped to the schedule's range
    workdir = str(tmp_path / "student")
    loop.train_and_evaluate(student(num_steps=2, checkpoint_every=2), workdir)
    _, leaves = final_params(workdir)  # params and EMA params of the checkpoint
    teacher_leaves = jax.tree_util.tree_leaves(run.objective.teacher_params)
    assert len(leaves) == 2 * len(teacher_leaves)  # the student's network, twice; no teacher copy
    assert all(np.all(np.isfinite(p)) for p in leaves)
    # the restored student samples in one step with no teacher
    pipe = load_workdir(workdir).pipeline
    assert pipe.objective.teacher is None
    x = pipe.sample(jax.random.key(0), 4, num_steps=1)
    assert x.shape == (4, 8, 8, 1) and np.all(np.isfinite(np.asarray(x)))


def test_an_unsupported_or_mismatched_teacher_is_named(tmp_path, monkeypatch):
    """The checks on a restored teacher run (a stand-in for load_workdir's result: its objective and facts)."""
    import types

    from jaxdiff import objectives
    from jaxdiff.training.setup import resolve

    from training_utils import tiny_config

    (tmp_path / "checkpoints").mkdir()
    cases = [(objectives.Consistency(), (8, 8, 1), 10, "objective 'consistency' is not supported"),
             (objectives.EDM(), (16, 16, 1), 10, r"its images are \(16, 16, 1\); this run's are \(8, 8, 1\)"),
             (objectives.EDM(), (8, 8, 1), 3, "num_classes=3; this run's has 10")]
    for objective, shape, classes, match in cases:
        run = types.SimpleNamespace(objective=objective, image_shape=shape, num_classes=classes)
        fake = lambda path, run=run: types.SimpleNamespace(run=run)
        c = tiny_config()
        c.diffusion.objective, c.sample.sampler, c.sample.num_steps = "consistency_distillation", "consistency", 1
        c.distill.teacher = str(tmp_path)
        with pytest.raises(ValueError, match="config.distill.teacher=.*" + match):
            resolve(c, num_devices=1, load_workdir=fake)

"""Objectives as values (jaxdiff.objectives): noise levels, losses and denoisers against formulas written
from the papers, config errors naming the field, and a new objective plugging into the train step.

References: the analytic distributions of each objective's noise levels (KS tests with a fixed key);
float64 NumPy transcriptions of the flow-matching loss (Lipman et al. 2023) and of EDM's Table 1
denoiser for a linear toy network; the closed-form denoiser of Gaussian data.
"""

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jaxdiff import objectives, schedules
from jaxdiff.objectives.base import Objective
from jaxdiff.training.state import TrainState
from jaxdiff.training.step import train_step

from training_utils import tiny_config

KEYS = jax.random.split(jax.random.key(0), 4000)


def test_noise_levels_follow_each_objective_s_distribution():
    diff = objectives.Diffusion(schedule=schedules.linear_schedule(50))
    t = np.asarray(jax.vmap(diff.noise_level)(KEYS))
    assert t.dtype.kind == "i" and t.min() >= 0 and t.max() <= 49
    counts = np.bincount(t, minlength=50)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3  # U{0..T-1}
    u = np.asarray(jax.vmap(objectives.FlowMatching().noise_level)(KEYS))
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3  # U[0, 1)
    edm = objectives.EDM(p_mean=-0.4, p_std=0.9)
    sigma = np.asarray(jax.vmap(edm.noise_level)(KEYS), np.float64)
    assert scipy.stats.kstest(np.log(sigma), "norm", args=(-0.4, 0.9)).pvalue > 1e-3  # ln sigma ~ N(P_mean, P_std^2)


def _linear_net(a, c):
    return lambda x, time: a * x + c * (time / 1000.0).reshape(time.shape + (1,) * (x.ndim - 1))


def test_flow_matching_loss_is_the_velocity_regression():
    """``E ||F(x_t, 999 t) - (eps - x0)||^2`` with ``x_t = (1 - t) x0 + t eps``, float64."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((5, 4, 4, 1)), rng.standard_normal((5, 4, 4, 1))
    t = rng.uniform(size=5)
    loss, metrics = objectives.FlowMatching().loss(_linear_net(0.3, -0.7), jnp.asarray(x0, jnp.float32),
                                                   jax.random.key(0), level=jnp.asarray(t, jnp.float32),
                                                   noise=jnp.asarray(eps, jnp.float32))
    tb = t.reshape(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    want = np.mean((0.3 * x_t - 0.7 * 999.0 * tb / 1000.0 - (eps - x0)) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert set(metrics) >= {"loss", "mse"}


@pytest.mark.parametrize("sigma_data", [0.5, 0.7])
def test_edm_denoiser_is_table_1_with_the_objective_s_sigma_data(sigma_data):
    """``D = c_skip x + c_out F(c_in x, t(c_noise))``, Table 1's EDM column; ``t = 1000 (ln(sigma)/4 + 1.6)/3``."""
    rng = np.random.default_rng(1)
    x, sigma = rng.standard_normal((3, 4, 4, 1)), np.array([0.01, 1.0, 50.0])
    den = objectives.EDM(sigma_data=sigma_data).denoiser(_linear_net(0.3, -0.2))
    got = np.asarray(den.fn(jnp.asarray(x, jnp.float32), jnp.asarray(sigma, jnp.float32)), np.float64)
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / np.sqrt(s**2 + sigma_data**2)
    c_in = 1.0 / np.sqrt(s**2 + sigma_data**2)
    t = 1000.0 * (np.log(s) / 4.0 + 1.6) / 3.0
    want = c_skip * x + c_out * (0.3 * c_in * x - 0.2 * t / 1000.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_objective_denoisers_of_exact_networks_give_the_gaussian_posterior_mean():
    """For x0 ~ N(0, s^2) every objective's exact network makes the same denoiser
    ``D(x, sigma) = s^2 / (s^2 + sigma^2) x`` (x = x0 + sigma eps)."""
    s2 = 0.6**2
    sched = schedules.linear_schedule(1000)

    def eps_net(x_t, t):  # E[eps | x_t] on the VP schedule; abar at fractional t from the log-SNR table
        a = jax.nn.sigmoid(jnp.interp(t, jnp.arange(1000.0), sched.log_snr)).reshape(-1, 1)
        return jnp.sqrt(1 - a) * x_t / (a * s2 + 1 - a)

    def velocity_net(x_t, time):  # E[eps - x0 | x_t] for x_t = (1 - t) x0 + t eps, t = time / 999
        t = (time / 999.0).reshape(-1, 1)
        var = (1 - t) ** 2 * s2 + t**2
        return (t - (1 - t) * s2) * x_t / var

    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3)), jnp.float32)
    sigma = jnp.asarray([0.05, 0.5, 2.0, 9.0], jnp.float32)
    want = np.asarray(s2 / (s2 + np.asarray(sigma)[:, None] ** 2) * np.asarray(x))
    for den in (objectives.Diffusion(schedule=sched).denoiser(eps_net), objectives.FlowMatching().denoiser(velocity_net)):
        np.testing.assert_allclose(np.asarray(den.fn(x, sigma)), want, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("setting,value,match", [
    ("objective", "score_matching", "config.diffusion.objective='score_matching'"),
    ("beta_end", 1.5, "config.diffusion.beta_end=1.5"),
    ("beta_start", 0.0, "config.diffusion.beta_start=0.0"),
    ("beta_end", 1e-5, "config.diffusion.beta_end=1e-05.*decreasing"),
    ("num_timesteps", 0, "config.diffusion.num_timesteps=0"),
    ("schedule", "quadratic", "config.diffusion.schedule='quadratic'"),
    ("prediction", "noise", "config.diffusion.prediction='noise'"),
    ("weighting", "snr", "config.diffusion.weighting='snr'"),
])
def test_config_errors_name_the_field(setting, value, match):
    cfg = tiny_config().diffusion
    cfg[setting] = value
    with pytest.raises(ValueError, match=match):
        objectives.from_config(cfg)


def test_each_objective_names_its_own_settings():
    for objective, setting, value in (("flow_matching", "learned_variance", True), ("edm", "sigma_data", 0.0),
                                      ("edm", "p_std", -1.0), ("edm", "learned_variance", True)):
        cfg = tiny_config().diffusion
        cfg.objective = objective
        cfg[setting] = value
        with pytest.raises(ValueError, match=f"config.diffusion.{setting}="):
            objectives.from_config(cfg)
    cfg = tiny_config().diffusion
    cfg.objective, cfg.beta_end = "edm", 1.5  # a setting EDM does not use is not its concern
    assert isinstance(objectives.from_config(cfg), objectives.EDM)


@flax.struct.dataclass
class _X0Regression(Objective):
    """A new objective written outside the library: x_t = x0 + level * noise, the network regresses x0."""

    name = "x0_regression"
    scale: float = flax.struct.field(pytree_node=False, default=1.0)

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def noise_level(self, key):
        return self.scale * jax.random.uniform(key, ())

    def loss(self, net, x0, key, *, level, noise):
        x_t = x0 + level.reshape(-1, 1, 1, 1) * noise
        mse = jnp.mean((net(x_t, 1000.0 * level) - x0) ** 2)
        return mse, {"loss": mse, "mse": mse}

    def denoiser(self, net, *, clip_x0=False):
        raise NotImplementedError


def test_a_new_objective_plugs_into_the_train_step(monkeypatch):
    """Registered in OBJECTIVES, an objective the library has never seen is built from the config and
    trained by the unchanged train step: one SGD step of rate 1 on a linear network equals the gradient
    of its loss written out here (levels and noise from the step's documented per-example keys)."""
    monkeypatch.setitem(objectives.OBJECTIVES, "x0_regression", _X0Regression)
    cfg = tiny_config().diffusion
    cfg.objective = "x0_regression"
    objective = objectives.from_config(cfg)
    assert isinstance(objective, _X0Regression)

    def apply(variables, x, t, y, train=True, dropout_keys=None):
        return variables["params"]["a"] * x

    tx = optax.sgd(1.0)
    params = {"a": jnp.asarray(0.5)}
    state = TrainState(step=jnp.asarray(2, jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                       apply_fn=apply, tx=tx, ema_decay=0.9)
    x0 = jax.random.normal(jax.random.key(4), (6, 2, 2, 1))
    batch = {"image": x0, "index": jnp.arange(6)}
    root = jax.random.key(9)
    new, metrics = jax.jit(train_step)(state, batch, root, objective)
    from jaxdiff.training.step import example_keys

    sub = jax.vmap(lambda k: jax.random.split(k, 4))(example_keys(root, jnp.asarray(2), batch["index"]))
    level = np.asarray(jax.vmap(lambda k: jax.random.uniform(k, ()))(sub[:, 0]), np.float64).reshape(-1, 1, 1, 1)
    noise = np.asarray(jax.vmap(lambda k: jax.random.normal(k, (2, 2, 1)))(sub[:, 1]), np.float64)
    x0n = np.asarray(x0, np.float64)
    x_t = x0n + level * noise
    loss = np.mean((0.5 * x_t - x0n) ** 2)
    grad = np.mean(2 * (0.5 * x_t - x0n) * x_t)
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    np.testing.assert_allclose(float(new.params["a"]), 0.5 - grad, rtol=1e-5)
    # EMA through optax.incremental_update: ema = decay * ema + (1 - decay) * params
    np.testing.assert_allclose(float(new.ema_params["a"]), 0.9 * 0.5 + 0.1 * (0.5 - grad), rtol=1e-5)


def test_the_train_step_has_four_arguments_and_the_loop_none_of_an_objective_s_settings():
    """``train_step(state, batch, key, objective)``: nothing else but the mapped axis and the gradient
    accumulation (a setting of the step, not of an objective)."""
    import inspect

    params = inspect.signature(train_step).parameters
    assert list(params)[:4] == ["state", "batch", "root_key", "objective"]
    assert [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY] == ["axis_name", "microbatches"]
    assert functools.partial(train_step, objective=objectives.FlowMatching())  # bindable as the loop does

"""Flow matching with the linear interpolant, against the exact velocity of a Gaussian mixture.

For ``x_t = (1 - t) x0 + t eps`` with ``x0 ~ sum_k w_k N(mu_k, C_k)``, given component ``k``
``x_t ~ N(m_k, S_k)``, ``m_k = (1 - t) mu_k``, ``S_k = (1 - t)^2 C_k + t^2 I``, and
``E[x0 | x_t, k] = mu_k + (1 - t) C_k S_k^{-1} (x_t - m_k)``, ``E[eps | x_t, k] = t S_k^{-1} (x_t - m_k)``,
so the optimal velocity ``E[eps - x0 | x_t]`` is the responsibility-weighted difference -- finite
on all of ``[0, 1]``. Derived and coded here, independent of ``jaxdiff.flow``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from test_samplers import MIX, MMD_NOISE, B, assert_matches_mixture, mixture_samples, mmd2_to_mixture

from jaxdiff import flow


def exact_velocity(mix):
    w, mu, cov = (jnp.asarray(a, jnp.float32) for a in (mix.weights, mix.means, mix.covs))
    eye = jnp.eye(mu.shape[1])

    def v(x, t):  # x [B, D], t [B]
        tt = t[:, None, None, None]
        s = (1.0 - tt) ** 2 * cov[None] + tt**2 * eye[None, None]  # [B, K, D, D]
        diff = x[:, None, :] - (1.0 - t)[:, None, None] * mu[None]  # [B, K, D]
        sol = jnp.linalg.solve(s, diff[..., None])[..., 0]  # S^{-1}(x - m)
        _, logdet = jnp.linalg.slogdet(s)
        resp = jax.nn.softmax(jnp.log(w)[None] - 0.5 * (jnp.sum(diff * sol, -1) + logdet), axis=-1)
        e_x0 = mu[None] + (1.0 - t)[:, None, None] * jnp.einsum("kij,bkj->bki", cov, sol)
        e_eps = t[:, None, None] * sol
        return jnp.einsum("bk,bkd->bd", resp, e_eps - e_x0)

    return v


def test_exact_velocity_is_the_regression_target():
    """Monte-Carlo check of the reference: E[(eps - x0) | x_t] at a point, by importance weights."""
    t = 0.6
    x0 = mixture_samples(MIX, 200_000, 0)
    xt_point = np.array([0.5, 0.3])
    # p(x_t = point | x0) = N(point; (1-t) x0, t^2 I): weight the x0 draws by it.
    logw = -0.5 * np.sum((xt_point - (1 - t) * x0) ** 2, 1) / t**2
    wts = np.exp(logw - logw.max())
    eps = (xt_point - (1 - t) * x0) / t
    mc = np.sum(wts[:, None] * (eps - x0), 0) / wts.sum()
    v = exact_velocity(MIX)(jnp.asarray(xt_point[None], jnp.float32), jnp.array([t], jnp.float32))
    np.testing.assert_allclose(np.asarray(v)[0], mc, atol=0.03)


def test_loss_target_is_eps_minus_x0_and_gradients_are_finite():
    x0 = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.linspace(0.0, 1.0, 8)
    params = {"w": 0.1 * jnp.ones((3, 3)), "b": jnp.zeros(3), "c": jnp.asarray(0.5)}

    def model(p, x, t):
        return x @ p["w"] + p["b"][None, None, None] + p["c"] * t[:, None, None, None] * x

    loss, metrics = jax.jit(lambda p: flow.flow_matching_loss(lambda x, t: model(p, x, t), x0, jax.random.key(2),
                                                               t=t, noise=noise))(params)
    xn, nn, tn = (np.asarray(a, np.float64) for a in (x0, noise, t))
    xt = (1 - tn[:, None, None, None]) * xn + tn[:, None, None, None] * nn
    pred = np.asarray(model(params, jnp.asarray(xt, jnp.float32), t), np.float64)
    np.testing.assert_allclose(float(loss), np.mean((pred - (nn - xn)) ** 2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["target_norm"]), np.mean((nn - xn) ** 2), rtol=1e-5)
    grads = jax.jit(jax.grad(lambda p: flow.flow_matching_loss(lambda x, t: model(p, x, t), x0, jax.random.key(3))[0]))(
        params)
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(g)) and np.any(g != 0)
    # the exact velocity minimizes the loss: it beats a perturbed velocity on the same draws
    v = exact_velocity(MIX)
    x2 = jnp.asarray(mixture_samples(MIX, 4096, 4), jnp.float32)
    losses = jax.jit(lambda x, k: jnp.stack([flow.flow_matching_loss(lambda x, t: c * v(x, t), x, k)[0]
                                              for c in (1.0, 1.1)]))(x2, jax.random.key(5))
    assert float(losses[0]) < float(losses[1])


def test_euler_and_heun_reproduce_the_mixture():
    v = exact_velocity(MIX)

    @jax.jit
    def run(key, n):
        return (flow.sample_with_info(v, key, (B, 2), method="euler", num_steps=n),
                flow.sample_with_info(v, key, (B, 2), method="heun", num_steps=n))

    (x_e10, i_e10), (x_h10, i_h10) = run(jax.random.key(0), 10)
    (x_e, i_e), (x_h, i_h) = run(jax.random.key(0), 100)
    assert run._cache_size() == 1
    assert (int(i_e10["nfe"]), int(i_h10["nfe"]), int(i_e["nfe"]), int(i_h["nfe"])) == (10, 19, 100, 199)
    assert flow.nfe("heun", 7) == 13 and flow.nfe("euler", 7) == 7
    d_e10, d_h10 = mmd2_to_mixture(x_e10, MIX), mmd2_to_mixture(x_h10, MIX)
    assert d_h10 < d_e10
    for x in (x_e, x_h):
        assert mmd2_to_mixture(x, MIX) < 4 * MMD_NOISE
        assert_matches_mixture(np.asarray(x), MIX)

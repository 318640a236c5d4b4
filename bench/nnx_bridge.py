"""Does the NNX bridge (``jaxdiff.models.nnx``) cost speed against the plain Linen apply?

The ``digits`` UNet (8x8x1 inputs, batch 64 unless ``--quick``), timed alternating A B C in one
process, medians per call:

* forward (eval mode):
  - ``linen``: ``jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t))``;
  - ``nnx.jit``: ``nnx.jit(lambda m, x, t: m(x, t))`` on the :class:`~jaxdiff.models.nnx.NNXUNet`
    (NNX's graph bookkeeping runs in Python on every call);
  - ``nnx split/merge``: ``jax.jit`` of a function of ``nnx.split``'s state that merges it
    inside (NNX's functional API: no Python graph traversal per call);
* train step (``diffusion_loss``, epsilon, Adam 1e-3): ``linen`` with ``optax`` on the params
  pytree; ``nnx.jit`` with ``nnx.Optimizer``; ``nnx split/merge`` of (model, optimizer).

The compiled programs are the same computation; a difference is per-call overhead outside XLA.

Commands (from the repository root)::

    python bench/nnx_bridge.py
    python bench/nnx_bridge.py --quick

Writes ``bench/results/nnx_bridge.json``.
"""

from __future__ import annotations

import bench_utils as bu

PRESET = "digits"


def cases(batch: int):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxdiff
    from jaxdiff.losses import diffusion_loss
    from jaxdiff.models import get_model, nnx_unet, to_linen_params

    schedule = jaxdiff.linear_schedule(1000)
    shape = (batch, 8, 8, 1)
    x = jax.random.normal(jax.random.key(1), shape)
    t = jnp.arange(batch, dtype=jnp.int32) * 7 % 1000
    key = jax.random.key(2)
    unet = get_model(PRESET)
    model = nnx_unet(PRESET, rngs=nnx.Rngs(params=0, dropout=1), sample_shape=shape, deterministic=True)
    params = to_linen_params(model)
    tx = optax.adam(1e-3)
    out = {}

    # Forward.
    linen_fwd = jax.jit(lambda p, x, t: unet.apply({"params": p}, x, t))
    out["forward/linen"] = lambda: linen_fwd(params, x, t).block_until_ready()
    nnx_fwd = nnx.jit(lambda m, x, t: m(x, t))
    out["forward/nnx.jit"] = lambda: nnx_fwd(model, x, t).block_until_ready()
    graphdef, state = nnx.split(model)
    split_fwd = jax.jit(lambda s, x, t: nnx.merge(graphdef, s)(x, t))
    out["forward/nnx split/merge"] = lambda: split_fwd(state, x, t).block_until_ready()

    # Train step (state kept between calls, as in training).
    @jax.jit
    def linen_step(p, opt_state, x0, k):
        loss, grads = jax.value_and_grad(lambda p: diffusion_loss(
            schedule, lambda xt, tt: unet.apply({"params": p}, xt, tt), x0, k)[0])(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    linen_state = [params, tx.init(params)]

    def run_linen():
        linen_state[0], linen_state[1], loss = linen_step(*linen_state, x, key)
        loss.block_until_ready()

    out["train step/linen"] = run_linen

    def nnx_loss(m, x0, k):
        return diffusion_loss(schedule, m, x0, k)[0]

    train_model = nnx_unet(PRESET, rngs=nnx.Rngs(params=0, dropout=1), sample_shape=shape)
    optimizer = nnx.Optimizer(train_model, tx, wrt=nnx.Param)

    @nnx.jit
    def nnx_step(m, opt, x0, k):
        loss, grads = nnx.value_and_grad(nnx_loss)(m, x0, k)
        opt.update(m, grads)
        return loss

    out["train step/nnx.jit"] = lambda: nnx_step(train_model, optimizer, x, key).block_until_ready()

    split_model = nnx_unet(PRESET, rngs=nnx.Rngs(params=0, dropout=1), sample_shape=shape)
    split_opt = nnx.Optimizer(split_model, tx, wrt=nnx.Param)
    step_graphdef, step_state = nnx.split((split_model, split_opt))

    @jax.jit
    def split_step(s, x0, k):
        m, opt = nnx.merge(step_graphdef, s)
        loss, grads = nnx.value_and_grad(nnx_loss)(m, x0, k)
        opt.update(m, grads)
        return nnx.state((m, opt)), loss

    split_state = [step_state]

    def run_split():
        split_state[0], loss = split_step(split_state[0], x, key)
        loss.block_until_ready()

    out["train step/nnx split/merge"] = run_split
    return out  # bu.alternate calls each once (compiling it) before timing


def main():
    p = bu.parser(__doc__)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 9)
    batch = 16 if args.quick else 64
    iters = {}
    all_cases = cases(batch)
    for label in all_cases:
        iters[label] = 20 if label.startswith("forward") else 5
    timing = bu.alternate(all_cases, rounds=rounds, iters=iters)
    rows = []
    for label, tm in timing.items():
        what, impl = label.split("/", 1)
        base = timing[f"{what}/linen"]["median_s"]
        tm["ms_per_call"] = 1e3 * tm["median_s"]
        tm["ratio_vs_linen"] = tm["median_s"] / base
        rows.append([what, impl, tm["ms_per_call"], 1e3 * tm["min_s"], tm["ratio_vs_linen"]])
    print(f"\n### NNX bridge vs Linen apply, `{PRESET}` UNet, batch {batch}, CPU (median of {rounds} rounds)\n")
    print(bu.table(["what", "how", "ms per call (median)", "ms (min)", "x linen"], rows))
    bu.write_json("nnx_bridge", {"preset": PRESET, "batch": batch, "rounds": rounds, "iters": iters,
                                 "timing": timing}, out=args.out)


if __name__ == "__main__":
    main()

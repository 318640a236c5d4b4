"""Speed options of the train step and the sampling loop, each measured against the library as is.

Train step (the ``digits`` network, batch 128, unless ``--config``), alternating A B A B:

* ``library``: ``jaxdiff.training.step.train_step`` under ``jax.jit`` with the state donated
  (what ``training/parallel.py`` compiles);
* ``no donation``: the same without ``donate_argnums``;
* ``bf16 compute`` / ``remat``: the UNet's ``dtype=bfloat16`` / ``remat=True`` options;
* ``batched apply``: a bench-local copy of ``train_step`` that calls the network once on the
  whole batch (one dropout key per step) instead of ``vmap`` over per-example calls;
* ``no finite guard``: the copy without the ``where(finite, new, old)`` over the whole state;
* ``EMA in a 2nd jit``: the copy without the EMA, followed by a separate jitted (donated) EMA
  update -- what an unfused EMA costs.

XLA:CPU flags (one worker process per setting, timed alternately): the default, YNNPACK
convolutions (``--xla_cpu_experimental_ynn_fusion_type=individual_convolution``) and oneDNN
custom calls (``--xla_cpu_experimental_onednn_custom_call=true``), and single-threaded Eigen
kernels (``--xla_cpu_multi_thread_eigen=false``: on an oversubscribed machine PyTorch runs
faster with 1 thread than with 2, so the same is tried for XLA).

Sampling loop: DDIM as the library runs it against a bench-local loop that draws the step
noise behind ``lax.cond(eta > 0, ...)``; trivial network, ``[16, 32, 32, 3]``, 50 steps. Before
``ddim_step`` got the same ``lax.cond`` (commit 08f1dbc) the library drew the noise at every
step and multiplied it by ``sigma = 0``; the two rows now agree, which checks the fix.

Commands (from the repository root)::

    python bench/speed_options.py             # digits network, batch 128
    python bench/speed_options.py --quick     # batch 16, fewer variants, no flag workers
    python bench/speed_options.py --config cifar_small --no-flags

Writes ``bench/results/speed_options.json``.
"""

from __future__ import annotations

import functools
import sys

import bench_utils as bu

FLAG_SETTINGS = {
    "default": "",
    "ynnpack convolutions": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "onednn custom calls": "--xla_cpu_experimental_onednn_custom_call=true",
    "single-threaded Eigen": "--xla_cpu_multi_thread_eigen=false",
}


def variant_train_step(state, batch, root_key, *, apply_fn, tx, schedule, ema_decay=0.9999, num_classes=None,
                       label_dropout=0.0, per_example=True, finite_guard=True, ema=True):
    """``jaxdiff.training.step.train_step`` (epsilon, uniform weighting) with switches to measure
    what its parts cost. Not a library function: a bench experiment."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxdiff import losses
    from jaxdiff.training.state import TrainState
    from jaxdiff.training.step import example_keys

    keys = example_keys(root_key, state.step, batch["index"])
    sub = jax.vmap(lambda k: jax.random.split(k, 4))(keys)
    x0 = batch["image"]
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_timesteps))(sub[:, 0])
    noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], x0.dtype))(sub[:, 1])
    y = None
    if num_classes is not None:
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, label_dropout))(sub[:, 3])
        y = jnp.where(drop, num_classes, batch["label"])

    def loss_fn(params):
        if per_example:
            def one(x, tt, yy, k):
                yy = None if yy is None else yy[None]
                return apply_fn({"params": params}, x[None], tt[None], yy, train=True, rngs={"dropout": k})[0]

            def model_fn(x_t, tt):
                return jax.vmap(one, in_axes=(0, 0, None if y is None else 0, 0))(x_t, tt, y, sub[:, 2])
        else:
            def model_fn(x_t, tt):
                k = jax.random.fold_in(jax.random.fold_in(root_key, state.step), 2**31 - 1)
                return apply_fn({"params": params}, x_t, tt, y, train=True, rngs={"dropout": k})

        return losses.diffusion_loss(schedule, model_fn, x0, root_key, t=t, noise=noise)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema:
        ema_params = jax.tree_util.tree_map(lambda e, p: e + (1.0 - ema_decay) * (p - e), state.ema_params, params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    if finite_guard:
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state.replace(step=state.step + 1))
    return new, dict(metrics, grad_norm=grad_norm, finite=finite.astype(jnp.float32))


def step_cases(cfg: bu.NetConfig, batch: int, quick: bool):
    import jax

    import jaxdiff
    import train_throughput as tt
    from jaxdiff.training.state import create_train_state, make_optimizer
    from jaxdiff.training.step import train_step

    cases, infos = {}, {}

    def add(label, run, info):
        bu.eprint(f"  compiled {label}: {info.get('compile_s', float('nan')):.1f} s")
        cases[label], infos[label] = functools.partial(run, tt.STEPS_PER_SAMPLE), info

    add("library", *tt.jax_train_step(cfg, batch))
    variants = [("batched apply", dict(per_example=False)), ("no finite guard", dict(finite_guard=False))]
    if not quick:
        add("bf16 compute", *tt.jax_train_step(cfg, batch, dtype="bfloat16"))
        add("remat", *tt.jax_train_step(cfg, batch, remat=True))
    for label, kw in variants:
        add(label, *tt.jax_train_step(cfg, batch, step_fn=functools.partial(variant_train_step, **kw)))

    # No donation, and an EMA in a second jit: built by hand.
    model = bu.jax_unet(cfg)
    tx = make_optimizer(2e-4, warmup_steps=0, grad_clip=1.0)
    data = tt.make_jax_batch(cfg, batch)
    key = jax.random.key(1)
    common = dict(apply_fn=model.apply, tx=tx, schedule=jaxdiff.linear_schedule(1000), ema_decay=0.9999,
                  num_classes=cfg.num_classes, label_dropout=0.1)
    state0 = create_train_state(jax.random.key(0), model, tx, cfg.image_shape, num_classes=cfg.num_classes)

    plain = jax.jit(functools.partial(train_step, **common))
    holder = {"nodonate": state0}

    def run_nodonate(k):
        for _ in range(k):
            holder["nodonate"], m = plain(holder["nodonate"], data, key)
        jax.block_until_ready(m)

    run_nodonate(1)
    cases["no donation"] = functools.partial(run_nodonate, tt.STEPS_PER_SAMPLE)

    if not quick:
        no_ema = jax.jit(functools.partial(variant_train_step, ema=False, **common), donate_argnums=(0,))
        ema_fn = jax.jit(lambda e, p: jax.tree_util.tree_map(lambda a, b: a + 1e-4 * (b - a), e, p),
                         donate_argnums=(0,))
        holder["ema"] = create_train_state(jax.random.key(0), model, tx, cfg.image_shape, num_classes=cfg.num_classes)

        def run_sep_ema(k):
            for _ in range(k):
                s, m = no_ema(holder["ema"], data, key)
                holder["ema"] = s.replace(ema_params=ema_fn(s.ema_params, s.params))
            jax.block_until_ready((m, holder["ema"].ema_params))

        run_sep_ema(1)
        cases["EMA in a 2nd jit"] = functools.partial(run_sep_ema, tt.STEPS_PER_SAMPLE)
    return cases, infos


def ddim_cases():
    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import samplers
    from jaxdiff.samplers.common import prior_sample, run_loop, spaced_timesteps
    from jaxdiff.samplers.ddim import ddim_step

    schedule = jaxdiff.linear_schedule(1000)
    shape = (16, 32, 32, 3)
    net = lambda x, t: 0.1 * x  # noqa: E731

    @jax.jit
    def library(key, n, eta):
        return samplers.sample(schedule, net, key, shape, sampler="ddim", num_steps=n, eta=eta)

    @jax.jit
    def skip_noise(key, n, eta):
        k_init, k_steps = jax.random.split(key)
        x = prior_sample(schedule, k_init, shape)

        def body(i, x):
            t, t_prev = spaced_timesteps(schedule.num_timesteps, n, i)
            tb, tpb = jnp.full((shape[0],), t), jnp.full((shape[0],), t_prev)
            k = jax.random.fold_in(k_steps, i)
            z = jax.lax.cond(eta > 0, lambda: jax.random.normal(k, x.shape, x.dtype), lambda: jnp.zeros_like(x))
            return ddim_step(schedule, net(x, tb), x, tb, tpb, noise=z, eta=eta)

        return run_loop(body, x, n)

    key = jax.random.key(0)
    a, b = library(key, 50, 0.0), skip_noise(key, 50, 0.0)
    same = float(jnp.max(jnp.abs(a - b)))
    return {"ddim eta=0, library": lambda: library(key, 50, 0.0).block_until_ready(),
            "ddim eta=0, noise behind lax.cond": lambda: skip_noise(key, 50, 0.0).block_until_ready(),
            "ddim eta=1, library": lambda: library(key, 50, 1.0).block_until_ready(),
            "ddim eta=1, noise behind lax.cond": lambda: skip_noise(key, 50, 1.0).block_until_ready()}, same


def worker(config: str, batch: int) -> None:
    import train_throughput as tt

    run, _ = tt.jax_train_step(bu.CONFIGS[config], batch)
    bu.worker_loop({"train step": functools.partial(run, tt.STEPS_PER_SAMPLE)})


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        return
    p = bu.parser(__doc__)
    p.add_argument("--config", default="digits")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-flags", action="store_true", help="skip the XLA flag comparison")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    cfg = bu.CONFIGS[args.config]
    batch = args.batch or (min(cfg.batch, 16) if args.quick else cfg.batch)
    results = {"config": args.config, "batch": batch, "rounds": rounds}

    bu.eprint(f"train-step variants ({args.config}, batch {batch}) ...")
    cases, infos = step_cases(cfg, batch, args.quick)
    timing = bu.alternate(cases, rounds=rounds)
    import train_throughput as tt

    base = timing["library"]["median_s"]
    rows = []
    for label, t in timing.items():
        t["step_s"] = t["median_s"] / tt.STEPS_PER_SAMPLE
        t["images_per_s"] = batch / t["step_s"]
        t["speedup_vs_library"] = base / t["median_s"]
        t.update({k: v for k, v in infos.get(label, {}).items() if k in ("compile_s", "flops_per_step")})
        rows.append([label, t["step_s"] * 1e3, t["images_per_s"], t["speedup_vs_library"],
                     t.get("compile_s", float("nan"))])
    results["train_step"] = timing

    flag_rows = []
    if not args.no_flags and not args.quick:
        bu.eprint("XLA flag settings (one worker process each) ...")
        workers = {name: bu.Worker([sys.executable, __file__, "--worker", args.config, str(batch)],
                                   {"XLA_FLAGS": flags}) for name, flags in FLAG_SETTINGS.items()}
        try:
            ft = bu.alternate_workers(workers, rounds)
        finally:
            for w in workers.values():
                w.close()
        fbase = ft["default/train step"]["median_s"]
        for name, flags in FLAG_SETTINGS.items():
            t = ft[f"{name}/train step"]
            t.update(flags=flags, step_s=t["median_s"] / tt.STEPS_PER_SAMPLE, speedup_vs_default=fbase / t["median_s"])
            flag_rows.append([name, flags or "(none)", t["step_s"] * 1e3, batch / t["step_s"], t["speedup_vs_default"]])
        results["xla_flags"] = ft

    bu.eprint("DDIM noise draw at eta = 0 ...")
    dcases, max_diff = ddim_cases()
    dt = bu.alternate(dcases, rounds=rounds, iters=3)
    results["ddim_noise"] = dict(dt, max_abs_difference_eta0=max_diff)
    drows = [[k, 1e6 * v["median_s"] / 50] for k, v in dt.items()]

    print(f"\n### Train-step options ({args.config}, batch {batch}; median of alternating rounds)\n")
    print(bu.table(["variant", "ms/step", "images/s", "x library", "compile s"], rows))
    if flag_rows:
        print("\n### XLA:CPU flags (library train step; one process per setting, alternating)\n")
        print(bu.table(["setting", "XLA_FLAGS", "ms/step", "images/s", "x default"], flag_rows))
    print("\n### DDIM loop, trivial network, [16, 32, 32, 3], 50 steps\n")
    print(bu.table(["loop", "us/step"], drows))
    print(f"\n(max |difference| of the eta=0 samples: {max_diff:.2e})")
    bu.write_json("speed_options", results, args.out)


if __name__ == "__main__":
    main()

"""Speed options of the train step and the sampling loop, each measured against the library as is.

Train step (a network of ``bench/networks.py``, default ``digits`` at its batch, 64), alternating
A B A B; every case runs the library's ``jaxdiff.training.step.train_step`` unchanged:

* ``library``: ``train_step`` under ``jax.jit`` with the state donated (what
  ``training/parallel.py`` compiles);
* ``no donation``: the same without ``donate_argnums``;
* ``bf16 compute`` / ``remat``: the UNet's ``dtype=bfloat16`` / ``remat=True`` options.

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

    python bench/speed_options.py             # digits network, batch 64
    python bench/speed_options.py --config digits_x10   # the network of BENCHMARKS.md, batch 128
    python bench/speed_options.py --quick     # batch 16, library and no donation, no flag workers
    python bench/speed_options.py --config cifar_small --no-flags

Writes ``bench/results/speed_options.json``.
"""

from __future__ import annotations

import functools
import sys

import bench_utils as bu
import networks as nets
from networks import STEPS_PER_SAMPLE

FLAG_SETTINGS = {
    "default": "",
    "ynnpack convolutions": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",
    "onednn custom calls": "--xla_cpu_experimental_onednn_custom_call=true",
    "single-threaded Eigen": "--xla_cpu_multi_thread_eigen=false",
}


def step_cases(net: nets.BenchNet, batch: int, quick: bool):
    """The library's train step as is, and with the options it offers (no donation; bf16, remat)."""
    cases, infos = {}, {}

    def add(label, run, info):
        bu.eprint(f"  compiled {label}: {info.get('compile_s', float('nan')):.1f} s")
        cases[label], infos[label] = functools.partial(run, STEPS_PER_SAMPLE), info

    add("library", *nets.jax_train_step(net, batch))
    add("no donation", *nets.jax_train_step(net, batch, donate=False))
    if not quick:
        add("bf16 compute", *nets.jax_train_step(net, batch, dtype="bfloat16"))
        add("remat", *nets.jax_train_step(net, batch, remat=True))
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
    net = lambda x, t: 0.1 * x

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


def worker(name: str, batch: int) -> None:
    run, _ = nets.jax_train_step(nets.get(name), batch)
    bu.worker_loop({"train step": functools.partial(run, STEPS_PER_SAMPLE)})


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
        return
    p = bu.parser(__doc__)
    p.add_argument("--config", default="digits", help=f"a network of bench/networks.py: {sorted(nets.NETWORKS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--no-flags", action="store_true", help="skip the XLA flag comparison")
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    net = nets.get(args.config)
    batch = args.batch or (min(net.batch, 16) if args.quick else net.batch)
    results = {"config": args.config, "batch": batch, "rounds": rounds}

    bu.eprint(f"train-step variants ({args.config}, batch {batch}) ...")
    cases, infos = step_cases(net, batch, args.quick)
    timing = bu.alternate(cases, rounds=rounds)
    base = timing["library"]["median_s"]
    rows = []
    for label, t in timing.items():
        t["step_s"] = t["median_s"] / STEPS_PER_SAMPLE
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
            t.update(flags=flags, step_s=t["median_s"] / STEPS_PER_SAMPLE, speedup_vs_default=fbase / t["median_s"])
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

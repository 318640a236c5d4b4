"""Scheduler overhead: the per-step cost of the sampling loop itself, with a trivial network.

The "network" is ``eps = 0.1 * x``, so what is timed is the loop: jaxdiff's whole chain compiled
into one ``lax`` loop (one dispatch per chain) against diffusers' Python loop, which calls
``scheduler.step`` (and ``scale_model_input`` for the Karras-sigma schedulers) once per step.
diffusers is timed with PyTorch's default thread count and with 1 thread; the table shows the
faster. "us/call" is the time of a whole chain of ``--num-steps`` steps (diffusers:
``set_timesteps`` + loop; jaxdiff: the jitted call with its dispatch and prior draw) divided by
its number of network calls; "marginal" is the extra time per extra call when the chain is 5x
longer, i.e. the cost of one more step of the loop itself, without the fixed costs. Timings alternate
jaxdiff / diffusers per sampler; medians. Goal: jaxdiff >= 20x lower per step.

Commands (from the repository root)::

    python bench/scheduler_overhead.py            # 50 steps, shapes [16, 32, 32, 3] and [1, 8, 8, 1]
    python bench/scheduler_overhead.py --quick

Writes ``bench/results/scheduler_overhead.json``.
"""

from __future__ import annotations

import functools
import inspect

import bench_utils as bu

# jaxdiff sampler -> (diffusers scheduler class, extra scheduler kwargs)
PAIRS = {
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "dpm_solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
}
SHAPES = {"image": (16, 32, 32, 3), "small": (1, 8, 8, 1)}


def jax_chain(sampler: str, shape):
    """``(run(n), nfe(n))`` for jaxdiff's compiled chain with the trivial network."""
    import jax

    import jaxdiff
    from jaxdiff import samplers

    schedule = jaxdiff.linear_schedule(1000)

    @jax.jit
    def chain(key, num_steps):
        return samplers.sample(schedule, lambda x, t: 0.1 * x, key, shape, sampler=sampler, num_steps=num_steps)

    key = jax.random.key(0)

    def run(n):
        chain(key, n).block_until_ready()

    run(3)  # compile
    return run, functools.partial(samplers.nfe, sampler)


def torch_chain(cls_name: str, extra: dict, shape):
    torch = bu.quiet_torch()
    import diffusers

    sched = getattr(diffusers, cls_name)(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                         beta_schedule="linear", **extra)
    b, h, w, c = shape
    gen = torch.Generator().manual_seed(0)
    step_kw = {"generator": gen} if "generator" in inspect.signature(type(sched).step).parameters else {}
    calls = [0]

    def run(n):
        with torch.inference_mode():
            sched.set_timesteps(n)
            x = torch.randn(b, c, h, w, generator=gen) * sched.init_noise_sigma
            calls[0] = 0
            for t in sched.timesteps:
                x_in = sched.scale_model_input(x, t)
                eps = 0.1 * x_in
                calls[0] += 1
                x = sched.step(eps, t, x, **step_kw).prev_sample
        return calls[0]

    return run


def main():
    p = bu.parser(__doc__)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--samplers", default=None, help="comma list (default: every paired sampler that exists)")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    n = 10 if args.quick else args.num_steps
    from jaxdiff import samplers

    names = args.samplers.split(",") if args.samplers else list(PAIRS)
    names = [s for s in names if s in samplers.SAMPLERS and s in PAIRS]
    skipped = [s for s in PAIRS if s not in samplers.SAMPLERS]
    with_torch = bu.have_torch()
    threads = bu.torch_thread_counts(args.torch_threads) if with_torch else ()
    shapes = {"small": SHAPES["small"]} if args.quick else SHAPES
    results = {"rounds": rounds, "num_steps": n, "skipped_missing_in_jaxdiff": skipped, "cases": {}}
    rows = []
    long_n = 5 * n
    for shape_name, shape in shapes.items():
        for s in names:
            jrun, jnfe = jax_chain(s, shape)
            cases = {"jaxdiff": functools.partial(jrun, n), "jaxdiff long": functools.partial(jrun, long_n)}
            calls = {"jaxdiff": int(jnfe(n)), "jaxdiff long": int(jnfe(long_n))}
            iters = {"jaxdiff": 20, "jaxdiff long": 5}
            if with_torch:
                cls_name, extra = PAIRS[s]
                trun = torch_chain(cls_name, extra, shape)
                for k in threads:
                    cases[f"diffusers {k}T"] = bu.with_threads(functools.partial(trun, n), k)
                    cases[f"diffusers {k}T long"] = bu.with_threads(functools.partial(trun, long_n), k)
                    calls[f"diffusers {k}T"], calls[f"diffusers {k}T long"] = trun(n), trun(long_n)
                    iters[f"diffusers {k}T"], iters[f"diffusers {k}T long"] = 3, 1
            bu.eprint(f"[{shape_name}] {s}: timing {list(cases)} x {rounds}")
            timing = bu.alternate(cases, rounds=rounds, iters=iters)
            entry = {"shape": shape}
            for k in cases:
                if k.endswith(" long"):
                    continue
                short, long_ = timing[k], timing[k + " long"]
                entry[k] = {"nfe": calls[k], "nfe_long": calls[k + " long"], "chain_s": short["median_s"],
                            "chain_long_s": long_["median_s"], "samples_s": short["samples_s"],
                            "samples_long_s": long_["samples_s"],
                            "us_per_call": 1e6 * short["median_s"] / calls[k],
                            "marginal_us_per_call": 1e6 * (long_["median_s"] - short["median_s"])
                            / (calls[k + " long"] - calls[k])}
            j = entry["jaxdiff"]
            row = [shape_name + " " + "x".join(map(str, shape)), s, j["nfe"], j["us_per_call"],
                   j["marginal_us_per_call"]]
            if with_torch:
                ds = [k for k in entry if k.startswith("diffusers")]
                best = min(ds, key=lambda k: entry[k]["us_per_call"])
                d = entry[best]
                entry.update(best_diffusers=best, ratio=d["us_per_call"] / j["us_per_call"],
                             marginal_ratio=d["marginal_us_per_call"] / j["marginal_us_per_call"])
                row += [f"{PAIRS[s][0]} ({best.split()[-1]})", d["nfe"], d["us_per_call"], d["marginal_us_per_call"],
                        entry["ratio"], entry["marginal_ratio"]]
            else:
                row += ["n/a"] * 6
            rows.append(row)
            results["cases"][f"{shape_name}/{s}"] = entry

    print(f"\n### Scheduler overhead: trivial network, {n} steps; marginal = extra cost per call from "
          f"{n} to {long_n} steps (median of alternating rounds)\n")
    print(bu.table(["shape", "jaxdiff sampler", "calls", "jaxdiff us/call", "jaxdiff marginal us",
                    "diffusers scheduler (threads)", "calls", "diffusers us/call", "diffusers marginal us",
                    "x lower (chain)", "x lower (marginal)"], rows))
    if skipped:
        print(f"\n(not in jaxdiff.samplers.SAMPLERS, skipped: {skipped})")
    bu.write_json("scheduler_overhead", results, args.out)


if __name__ == "__main__":
    main()

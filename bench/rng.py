"""Random numbers in the stochastic sampling loops: JAX's PRNG implementations on this machine.

The stochastic samplers (``ddpm``, ``ddim`` with ``eta > 0``, ``euler_ancestral``, ``pc``) draw a
fresh Gaussian for every step with ``jax.random.normal(fold_in(key, i), ...)``; they use whatever
PRNG implementation the caller's key has. On CPU the default threefry is slow enough to dominate
a loop with a cheap network (``bench/scheduler_overhead.py``). This script times, alternating in
one process and reporting medians:

* one ``jax.random.normal`` of ``[16, 32, 32, 3]``;
* the ``ddpm`` and ``euler_ancestral`` loops, 50 steps, trivial network ``eps = 0.1 x``,
  ``[16, 32, 32, 3]`` (per step);

for keys made with ``jax.random.key(0, impl=IMPL)``, ``IMPL`` in ``threefry2x32`` (the default),
``rbg`` and ``unsafe_rbg``. The samples differ between implementations (different streams of the
same distribution); each implementation is reproducible for a given seed.

Commands (from the repository root)::

    python bench/rng.py
    python bench/rng.py --quick

Writes ``bench/results/rng.json``.
"""

from __future__ import annotations

import functools

import bench_utils as bu

IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
SHAPE = (16, 32, 32, 3)
STEPS = 50


def cases():
    import jax

    import jaxdiff
    from jaxdiff import samplers

    schedule = jaxdiff.linear_schedule(1000)
    out = {}
    for impl in IMPLS:
        key = jax.random.key(0, impl=impl)
        normal = jax.jit(lambda k: jax.random.normal(k, SHAPE))
        out[f"normal/{impl}"] = lambda f=normal, k=key: f(k).block_until_ready()
        for name in ("ddpm", "euler_ancestral"):
            fn = jax.jit(functools.partial(samplers.sample, schedule, lambda x, t: 0.1 * x, sampler=name,
                                           num_steps=STEPS), static_argnums=(1,))
            out[f"{name}/{impl}"] = lambda f=fn, k=key: f(k, SHAPE).block_until_ready()
    return out  # bu.alternate calls each once (compiling it) before timing


def main():
    p = bu.parser(__doc__)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    timing = bu.alternate(cases(), rounds=rounds, iters=3)
    rows = []
    for label, t in timing.items():
        what, impl = label.split("/")
        per = STEPS if what != "normal" else 1
        base = timing[f"{what}/threefry2x32"]["median_s"]
        t["us_per_step_or_call"] = 1e6 * t["median_s"] / per
        t["speedup_vs_threefry"] = base / t["median_s"]
        rows.append([what, impl, t["us_per_step_or_call"], t["speedup_vs_threefry"]])
    print(f"\n### PRNG implementations, CPU, {list(SHAPE)} (loops: trivial network, {STEPS} steps, per step)\n")
    print(bu.table(["what", "key impl", "us per step (loops) / per call", "x threefry"], rows))
    path = bu.write_json("rng", {"rounds": rounds, "shape": SHAPE, "steps": STEPS, "timing": timing},
                         out=args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

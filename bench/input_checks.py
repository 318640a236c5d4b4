"""The cost of q_sample's input rules: the NaN rule for out-of-range integer t under jit, and the
value check of a concrete t outside jit.

"unchecked" is the forward process without either (``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``
with the schedule's gathered coefficients, as q_sample computed it before); "q_sample" is
:func:`jaxdiff.diffusion.q_sample`. Both are timed jitted (the training step's case: t is
traced, so only the ``[B]``-sized NaN select is added) and called eagerly with a concrete t (the
value check then reads t back to the host). Timings alternate the two; medians.

Commands (from the repository root)::

    python bench/input_checks.py
    python bench/input_checks.py --quick

Writes ``bench/results/input_checks.json``.
"""

from __future__ import annotations

import bench_utils as bu

SHAPES = {"train batch": (64, 32, 32, 3), "small": (8, 8, 8, 1)}


def main():
    args = bu.parser(__doc__).parse_args()
    import jax

    from jaxdiff import diffusion as d
    from jaxdiff.schedules import linear_schedule

    schedule = linear_schedule(1000)

    def unchecked(x0, t, noise):
        a, s = d.alpha_sigma(schedule, t)
        return a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * noise

    def checked(x0, t, noise):
        return d.q_sample(schedule, x0, t, noise)

    rounds = args.rounds or (5 if args.quick else 30)
    rows, results = [], {}
    for label, shape in SHAPES.items():
        k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        x0, noise = jax.random.normal(k1, shape), jax.random.normal(k2, shape)
        t = jax.random.randint(k3, (shape[0],), 0, 1000)
        for mode, wrap in (("jit", jax.jit), ("eager", lambda f: f)):
            fa, fb = wrap(unchecked), wrap(checked)
            iters = 50 if mode == "jit" else 10
            args_ = (x0, t, noise)
            res = bu.alternate({"unchecked": lambda f=fa, a=args_: bu.block(f(*a)),
                                "q_sample": lambda f=fb, a=args_: bu.block(f(*a))}, rounds=rounds, iters=iters)
            a_us, b_us = res["unchecked"]["median_s"] * 1e6, res["q_sample"]["median_s"] * 1e6
            rows.append([label, str(shape), mode, a_us, b_us, b_us / a_us])
            results[f"{label}/{mode}"] = res
    print(bu.table(["shape", "x0", "mode", "unchecked us", "q_sample us", "ratio"], rows))
    bu.write_json("input_checks", {"rows": rows, "results": results}, args.out)


if __name__ == "__main__":
    main()

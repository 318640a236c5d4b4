"""Distance to the Gaussian-mixture oracle of every jaxdiff sampler at 10, 20 and 50 network evaluations.

The question: how close to the exact distribution does each jaxdiff sampler get for a given
number of network calls, by three independent distances (MMD against the exact mixture, sliced
W2, NLL gap)? ``bench/quality.py`` asks the same of jaxdiff *against diffusers' schedulers*
(SW2 and NLL gap only); the two share their metrics (``bench/bench_utils.py``).

    python bench/oracle_table.py                 # 8000 samples per cell
    python bench/oracle_table.py --quick         # 2000 samples

The model is exact (``jaxdiff.oracle.default_mixture(2)`` on a linear T=1000 schedule), so the
numbers measure only the samplers' discretization. Step counts per NFE budget ``N``: the most
steps whose NFE (the sampler registry's rule) is at most ``N``: ``n = N`` for ddpm / ddim /
dpm_solver++ / euler / euler_ancestral, ``n = (N + 1) // 2`` for heun (NFE ``2n - 1``),
``n = N // 2`` for pc with one corrector step (NFE ``2n``); the adaptive ODE is
listed by tolerance with the NFE it used. Metrics (lower is better):

* ``mmd2``: unbiased squared MMD (Gaussian kernel, bandwidth 0.5) against the *exact* mixture
  (its kernel mean embedding is analytic), times 1e4; 0 in expectation for exact samples.
* ``sw2``: sliced 2-Wasserstein distance (128 directions) to as many fresh mixture samples.
* ``nll_gap``: mean true ``-log p`` of the samples minus that of exact samples (nats; negative
  means too concentrated on the modes, positive too spread out).

A row of exact samples gives the metrics' Monte-Carlo floor. Prints markdown tables and
writes ``bench/results/oracle_table.json``. Runs on CPU in a few minutes (``--quick``: ~1).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxdiff.oracle import default_mixture
from jaxdiff.samplers import sample_with_info
from jaxdiff.schedules import linear_schedule

import bench_utils as bu
from bench_utils import budget_table, mmd2, sliced_w2, steps_for_budget

BUDGETS = (10, 20, 50)
# (label, sampler, static options); steps per NFE budget: bench_utils.steps_for_budget
CONFIGS = [
    ("ddpm", "ddpm", {}),
    ("ddim", "ddim", {}),
    ("dpm_solver++ (2M)", "dpm_solver++", {}),
    ("dpm_solver++ (3M)", "dpm_solver++", {"order": 3}),
    ("euler", "euler", {}),
    ("heun", "heun", {}),
    # the Karras-grid samplers and dpm_solver++ start at sigma_max = 80 by default; these rows start at sigma_T
    ("dpm_solver++ (2M), sigma_max = sigma_T", "dpm_solver++", {"sigma_max": None}),
    ("heun, sigma_max = sigma_T", "heun", {"sigma_max": None}),
    ("euler_ancestral", "euler_ancestral", {}),
    ("pc (M=1)", "pc", {}),
]
ODE_TOLERANCES = (3e-2, 1e-2, 1e-3, 1e-5)


def metrics(x, mix, ref, key, base_nll):
    x = jnp.asarray(x)
    return {
        "mmd2_x1e4": 1e4 * mmd2(x, mix),
        "sw2": sliced_w2(x, ref, jax.random.normal(key, (128, x.shape[1]))),
        "nll_gap": float(-jnp.mean(mix.log_prob(x))) - base_nll,
    }


def main():
    parser = bu.parser(__doc__.split("\n")[0])
    # (> ~9000 makes XLA:CPU hang in jax 0.10.2 on loop bodies with two oracle calls: pc, heun)
    parser.add_argument("--num-samples", type=int, default=None, help="samples per cell (default 8000, --quick 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.num_samples or (2000 if args.quick else 8000)

    schedule = linear_schedule(1000)
    mix = default_mixture(2)
    model = mix.model_fn(schedule)
    key = jax.random.key(args.seed)
    k_ref, k_exact, k_sw, k_run = jax.random.split(key, 4)
    ref = mix.sample(k_ref, n)
    exact = mix.sample(k_exact, n)
    base_nll = float(-jnp.mean(mix.log_prob(ref)))

    rows = [{"sampler": "exact samples", "budget": None, "num_steps": None, "nfe": 0, "seconds": 0.0,
             **metrics(exact, mix, ref, k_sw, base_nll)}]
    for label, name, options in CONFIGS:
        run = jax.jit(lambda k, s, name=name, options=options: sample_with_info(
            schedule, model, k, (n, 2), sampler=name, num_steps=s, **options))
        for budget in BUDGETS:
            s, _ = steps_for_budget(name, budget, options)
            t0 = time.time()
            x, info = run(k_run, s)
            x = jax.block_until_ready(x)
            rows.append({"sampler": label, "budget": budget, "num_steps": s, "nfe": int(info["nfe"]),
                         "seconds": time.time() - t0, **metrics(x, mix, ref, k_sw, base_nll)})
            print(f"{label:20s} NFE {int(info['nfe']):3d}  mmd2x1e4 {rows[-1]['mmd2_x1e4']:9.2f}", flush=True)
    ode = jax.jit(lambda k, tol: sample_with_info(schedule, model, k, (n, 2), sampler="ode", rtol=tol, atol=tol))
    ode_rows = []
    for tol in ODE_TOLERANCES:
        t0 = time.time()
        x, info = ode(k_run, tol)
        x = jax.block_until_ready(x)
        ode_rows.append({"sampler": "ode (tsit5)", "rtol=atol": tol, "nfe": int(info["nfe"]),
                         "seconds": time.time() - t0, **metrics(x, mix, ref, k_sw, base_nll)})

    fmt = lambda r: f"{r['mmd2_x1e4']:.2f} / {r['sw2']:.3f} / {r['nll_gap']:+.3f}"
    table = budget_table(rows, [c[0] for c in CONFIGS], BUDGETS, fmt)
    print(f"\n### Distance to the mixture ({n} samples of default_mixture(2), linear T=1000, exact model)\n")
    print("Each cell: MMD^2 x 1e4 / sliced W2 / NLL gap (nats); lower |value| is better. "
          "NFE in parentheses where it differs from the budget.\n")
    print(bu.table(["sampler"] + [f"{b} NFE" for b in BUDGETS], table))
    print()
    print(bu.table(["ode (tsit5, adaptive) rtol=atol", "NFE", "MMD^2 x 1e4 / sliced W2 / NLL gap"],
                   [[f"{r['rtol=atol']:g}", r["nfe"], fmt(r)] for r in ode_rows]))
    bu.write_json("oracle_table", {"num_samples": n, "seed": args.seed, "schedule": "linear_schedule(1000)",
                                   "mixture": "default_mixture(2)", "mmd_bandwidth": 0.5, "rows": rows,
                                   "ode": ode_rows}, args.out)


if __name__ == "__main__":
    main()

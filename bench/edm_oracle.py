"""EDM's sampler (Algorithm 2) against DDIM and DPM-Solver++ on the Gaussian-mixture oracle at 10, 20, 35 NFE.

    python bench/edm_oracle.py             # 8000 samples per cell
    python bench/edm_oracle.py --quick     # 2000 samples

The model is exact (``default_mixture(2)`` on ``linear_schedule(1000)``, whose sigma runs from 0.01
to 157), turned into an EDM denoiser by ``jaxdiff.edm.denoiser_from_eps``; the EDM chains start
from ``sigma_max * N(0, I)``. Steps per NFE budget ``N``: ``n = (N + 1) // 2`` for the Heun rows
(NFE ``2n - 1``: 9, 19, 35), ``n = N`` for ddim / dpm_solver++. Rows:

* ``edm``: ``karras_sigmas(n)`` (sigma 0.002 to 80, rho 7), deterministic (Algorithm 1);
* ``edm churn``: the same grid with EDM's stochastic settings (S_churn, S_tmin, S_tmax, S_noise);
* ``heun clipped``: the same sampler on the grid clipped to the schedule's range at the bottom
  (0.01 to 80), and ``heun (0.01..157)``: the library's ``heun`` sampler (the schedule's whole range);
* ``edm on ddim's grid``: Algorithm 1 on the sigmas of DDIM's evenly spaced timesteps (a probe of
  where the grid puts its points, not a recommended sampler);
* ``ddim`` (eta 0) and ``dpm_solver++ (2M)`` from the schedule's prior.

Metrics as ``bench/oracle_table.py`` (imported from it): MMD^2 x 1e4 against the exact mixture,
sliced W2, NLL gap; and the RMS distance of each sample from the probability-flow map of its own
starting noise (96 Heun steps, from ``80 z`` for the first three rows, from the schedule's top for
the others, where every chain starts from the same prior draw ``x_T = z``). That coupling bounds the
W2 distance to the mixture and carries little Monte-Carlo noise, so it orders samplers whose MMD^2
differ by less than the MMD's own noise (~1.3 x 1e-4 per run of 8000 points at these values). For the
churned row it is only a loose bound (the noise moves each chain off its deterministic path).
Prints a markdown table and writes ``bench/results/edm_oracle.json``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from oracle_table import metrics

from jaxdiff import edm
from jaxdiff.oracle import default_mixture
from jaxdiff.samplers import sample_with_info, spaced_timesteps
from jaxdiff.schedules import linear_schedule

import bench_utils as bu
from oracle_metrics import budget_table

BUDGETS = (10, 20, 35)
MAX_STEPS = 128
REF_STEPS = 96  # the probability-flow map: 96 vs 256 Heun steps differ by ~1e-3 RMS on this oracle
CHURN = {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}  # EDM Table 5, ImageNet-64
NO_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def heun_steps(budget):
    return (budget + 1) // 2


def ddim_grid(schedule, n):
    """``[MAX_STEPS + 1]``: the VE sigmas of DDIM's ``n`` timesteps, then zeros."""
    ts = np.array([int(spaced_timesteps(schedule.num_timesteps, n, i)[0]) for i in range(n)])
    grid = np.zeros(MAX_STEPS + 1, np.float32)
    grid[:n] = np.asarray(schedule.sigmas)[ts]
    return jnp.asarray(grid)


def main():
    parser = bu.parser(__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=None, help="samples per cell (default 8000, --quick 2000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = args.num_samples or (2000 if args.quick else 8000)

    schedule = linear_schedule(1000)
    mix = default_mixture(2)
    model = mix.model_fn(schedule)
    denoise = edm.denoiser_from_eps(schedule, model)
    key = jax.random.key(args.seed)
    k_ref, k_exact, k_sw, k_run, k_churn = jax.random.split(key, 5)
    ref = mix.sample(k_ref, n)
    base_nll = float(-jnp.mean(mix.log_prob(ref)))
    z = jax.random.normal(k_run, (n, 2))

    @jax.jit
    def run_edm(steps, sigma_min, sigma_max, churn):
        sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max, max_steps=MAX_STEPS)
        return edm.sample_with_info(denoise, sigma_max * z, sigmas, k_churn, **churn)

    @jax.jit
    def run_grid(x, sigmas):
        return edm.sample_with_info(denoise, x, sigmas)

    def library(name):  # from the prior draw x_T = z (VP coordinates at t = T-1)
        return jax.jit(lambda s: sample_with_info(schedule, model, k_run, (n, 2), sampler=name, num_steps=s, x_T=z))

    s_min, s_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    z_top = z * np.float32(np.sqrt(1.0 + s_max**2))  # x_T = z in EDM's coordinates at sigma = s_max
    # The probability-flow maps of the starting noise (REF_STEPS Heun steps), from 80 z and from z_top.
    exact = {"80": run_edm(REF_STEPS, 0.002, 80.0, NO_CHURN)[0],
             "top": run_grid(z_top, edm.karras_sigmas(REF_STEPS, s_min, s_max, max_steps=MAX_STEPS))[0]}
    configs = [  # (label, fn(steps) -> (x, info), steps for a budget, which exact map)
        ("edm (0.002..80)", lambda s: run_edm(s, 0.002, 80.0, NO_CHURN), heun_steps, "80"),
        ("edm churn (S_churn 40, 0.05..50, 1.003)", lambda s: run_edm(s, 0.002, 80.0, CHURN), heun_steps, "80"),
        (f"heun clipped ({s_min:.2g}..80)", lambda s: run_edm(s, s_min, 80.0, NO_CHURN), heun_steps, "80"),
        (f"heun ({s_min:.2g}..{s_max:.0f})", library("heun"), heun_steps, "top"),
        ("edm on ddim's grid", lambda s: run_grid(z_top, ddim_grid(schedule, s)), heun_steps, "top"),
        ("ddim", library("ddim"), lambda b: b, "top"),
        ("dpm_solver++ (2M)", library("dpm_solver++"), lambda b: b, "top"),
    ]
    rows = [{"sampler": "exact samples", "budget": None, "num_steps": None, "nfe": 0, "seconds": 0.0,
             **metrics(mix.sample(k_exact, n), mix, ref, k_sw, base_nll), "rms_to_pf_map": 0.0}]
    for label, fn, steps, start in configs:
        for budget in BUDGETS:
            s = steps(budget)
            t0 = time.time()
            x, info = fn(s)
            x = jax.block_until_ready(x)
            rms = float(jnp.sqrt(jnp.mean(jnp.sum((x - exact[start]) ** 2, axis=1))))
            rows.append({"sampler": label, "budget": budget, "num_steps": s, "nfe": int(info["nfe"]),
                         "seconds": time.time() - t0, **metrics(x, mix, ref, k_sw, base_nll), "rms_to_pf_map": rms})
            print(f"{label:42s} NFE {int(info['nfe']):3d}  mmd2x1e4 {rows[-1]['mmd2_x1e4']:9.2f}  rms {rms:.4f}",
                  flush=True)

    fmt = lambda r: f"{r['mmd2_x1e4']:.2f} / {r['sw2']:.3f} / {r['nll_gap']:+.3f} / {r['rms_to_pf_map']:.3f}"
    table = budget_table(rows, [c[0] for c in configs], BUDGETS, fmt)
    print(f"\n### EDM on the mixture oracle ({n} samples of default_mixture(2), linear T=1000, exact model)\n")
    print("Each cell: MMD^2 x 1e4 / sliced W2 / NLL gap (nats) / RMS distance to the probability-flow map of the "
          "same noise; lower |value| is better. NFE in parentheses where it differs from the budget.\n")
    print(bu.table(["sampler"] + [f"{b} NFE" for b in BUDGETS], table))
    bu.write_json("edm_oracle", {"num_samples": n, "seed": args.seed, "schedule": "linear_schedule(1000)",
                                 "mixture": "default_mixture(2)", "mmd_bandwidth": 0.5, "churn": CHURN,
                                 "reference_steps": REF_STEPS,
                                 "rows": rows}, args.out)


if __name__ == "__main__":
    main()

"""Quality per network call: every jaxdiff sampler against diffusers' schedulers, all driven by
the same exact "network", the Gaussian-mixture oracle (``jaxdiff.oracle.default_mixture``).

The question: at a budget of N network calls, is the best jaxdiff sampler at least as close to
the exact distribution as the best diffusers scheduler (the goal at 10 NFE)? Without torch only
the jaxdiff rows run. ``bench/oracle_table.py`` asks how close each jaxdiff sampler gets, with a
third distance (MMD against the exact mixture); both use ``bench/bench_utils.py``.

The oracle gives the exact eps of the noised mixture at any (integer or fractional) timestep, so
the only error left is the sampler's. Both stacks use the linear betas 1e-4..0.02, T = 1000,
timesteps on the [0, T-1] scale, epsilon prediction and the same starting noise ``z`` (diffusers
starts from ``z * init_noise_sigma``). For diffusers the oracle is wrapped as a torch function
through NumPy; its Karras-family schedulers get ``scale_model_input`` (the oracle is then called
in VP coordinates, as a diffusers UNet would be).

For a budget of N network calls each sampler gets the most steps whose call count is <= N
(e.g. Heun: 2n - 1 calls). The distance to the mixture is measured against fresh exact samples:

* SW2: sliced 2-Wasserstein distance (128 fixed random directions; the same reference set and
  directions for every row, so rows are paired). The noise floor (fresh exact sets against the
  reference, median of 3) is reported: differences below it are not resolved.
* NLL gap: mean -log p(samples) minus that of exact samples under the true mixture density
  (nats; 0 is perfect; negative means samples sit too close to the modes).

diffusers schedulers are run with their default timestep spacing and, where diffusers offers
it, with ``timestep_spacing="trailing"`` or ``use_karras_sigmas=True``; the best diffusers row
per budget is the best over all of those. UniPC and DEIS (no jaxdiff counterpart) are included
so that "best diffusers" is not cherry-picked. The adaptive probability-flow ODE is reported
separately (its call count is an outcome, not a budget).

Commands (from the repository root)::

    python bench/quality.py                 # dim 2, 8192 samples, NFE 5/10/20/50
    python bench/quality.py --quick         # 1024 samples, NFE 5/10
    python bench/quality.py --dim 8

Writes ``bench/results/quality.json``.
"""

from __future__ import annotations

import inspect

import numpy as np

import bench_utils as bu
from bench_utils import sliced_w2, steps_for_budget

# (row label, jaxdiff sampler, options) -- rows whose sampler is missing are skipped.
JAX_ROWS = [
    ("ddim", "ddim", {}),
    ("ddpm", "ddpm", {}),
    ("dpm_solver++ (2M)", "dpm_solver++", {}),
    ("dpm_solver++ (3M)", "dpm_solver++", {"order": 3}),
    ("dpm_solver++ (3M, 3rd order to the end)", "dpm_solver++", {"order": 3, "lower_order_final": False}),
    ("euler", "euler", {}),
    ("heun", "heun", {}),
    # diffusers' Karras sigmas span the schedule's whole range: sigma_max = None is the like-for-like row
    ("heun, sigma_max = sigma_T", "heun", {"sigma_max": None}),
    ("euler, sigma_max = sigma_T", "euler", {"sigma_max": None}),
    ("euler_ancestral", "euler_ancestral", {}),
    ("pc (M=1)", "pc", {}),
]
# (row label, diffusers class, kwargs, jaxdiff counterpart)
TORCH_ROWS = [
    ("DDIM", "DDIMScheduler", {"clip_sample": False}, "ddim"),
    ("DDIM trailing", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "ddim"),
    ("DDPM", "DDPMScheduler", {"clip_sample": False}, "ddpm"),
    ("DDPM trailing", "DDPMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}, "ddpm"),
    ("DPMSolverMultistep 2M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2},
     "dpm_solver++"),
    ("DPMSolverMultistep 2M karras", "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}, "dpm_solver++"),
    ("DPMSolverMultistep 3M", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3},
     "dpm_solver++"),
    ("EulerDiscrete", "EulerDiscreteScheduler", {}, "euler"),
    ("EulerDiscrete karras", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler"),
    ("HeunDiscrete", "HeunDiscreteScheduler", {}, "heun"),
    ("HeunDiscrete karras", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun"),
    ("EulerAncestralDiscrete", "EulerAncestralDiscreteScheduler", {}, "euler_ancestral"),
    ("EulerAncestralDiscrete trailing", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"},
     "euler_ancestral"),
    ("UniPCMultistep", "UniPCMultistepScheduler", {}, None),
    ("UniPCMultistep karras", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, None),
    ("DEISMultistep", "DEISMultistepScheduler", {}, None),
    ("LMSDiscrete", "LMSDiscreteScheduler", {}, None),
]
ODE_RTOLS = (1e-1, 3e-2, 1e-2, 1e-3)


# --------------------------------------------------------------------------- metrics
class Metrics:
    def __init__(self, mixture, n: int, dim: int, seed: int = 1):
        import jax

        self.mixture = mixture
        self.log_prob = jax.jit(mixture.log_prob)
        self.ref = np.asarray(mixture.sample(jax.random.key(seed), n), np.float64)
        rng = np.random.default_rng(seed)
        self.dirs = rng.standard_normal((128, dim))  # sliced_w2 normalises them
        self.ref_nll = -float(np.mean(np.asarray(self.log_prob(self.ref.astype(np.float32)))))
        # The noise floor: fresh exact sets of the same size against the reference (median of 3).
        floors = [self(np.asarray(mixture.sample(jax.random.key(seed + 1 + i), n))) for i in range(3)]
        self.floor = {k: float(np.median([f[k] for f in floors])) for k in floors[0]}

    def __call__(self, x) -> dict:
        x = np.asarray(x, np.float64)
        if not np.all(np.isfinite(x)):
            return {"sw2": float("nan"), "nll_gap": float("nan")}
        nll = -float(np.mean(np.asarray(self.log_prob(x.astype(np.float32)))))
        return {"sw2": sliced_w2(x, self.ref, self.dirs), "nll_gap": nll - self.ref_nll}


# --------------------------------------------------------------------------- jaxdiff
def jax_runner(schedule, eps_fn, z, sampler: str, options: dict):
    """``run(num_steps) -> samples`` (one compiled function; ``num_steps`` a runtime value)."""
    import jax

    from jaxdiff import samplers

    @jax.jit
    def run(key, num_steps):
        return samplers.sample(schedule, eps_fn, key, z.shape, sampler=sampler, num_steps=num_steps, x_T=z,
                               **options)

    return lambda n: np.asarray(run(jax.random.key(7), n))


def jax_ode(schedule, eps_fn, z, rtol: float):
    import jax

    from jaxdiff import samplers

    x, info = jax.jit(lambda key: samplers.sample_with_info(schedule, eps_fn, key, z.shape, sampler="ode",
                                                             x_T=z, rtol=rtol, atol=rtol))(jax.random.key(7))
    return np.asarray(x), int(info["nfe"])


# --------------------------------------------------------------------------- diffusers
def torch_runner(cls_name: str, kwargs: dict, eps_fn, z: np.ndarray):
    """``(run(num_steps) -> (samples, calls), calls_for(num_steps))`` driving a diffusers scheduler."""
    torch = bu.quiet_torch()
    import diffusers
    import jax

    cls = getattr(diffusers, cls_name)
    sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                prediction_type="epsilon", **kwargs)
    jitted = jax.jit(eps_fn)
    takes_gen = "generator" in inspect.signature(cls.step).parameters
    n_pts, dim = z.shape

    def oracle(x_t, t):
        t = float(t) if torch.is_floating_point(torch.as_tensor(t)) else int(t)
        tb = np.full((n_pts,), t, np.float32 if isinstance(t, float) else np.int32)
        eps = jitted(x_t.reshape(n_pts, dim).numpy(), tb)
        return torch.from_numpy(np.asarray(eps, np.float32).copy()).reshape(x_t.shape)

    def calls_for(n: int) -> int:
        sched.set_timesteps(n)
        return len(sched.timesteps)

    def run(n: int):
        gen = torch.Generator().manual_seed(7)
        sched.set_timesteps(n)
        x = torch.from_numpy(z.astype(np.float32)).reshape(n_pts, dim, 1, 1) * sched.init_noise_sigma
        calls = 0
        for t in sched.timesteps:
            eps = oracle(sched.scale_model_input(x, t), t)
            calls += 1
            kw = {"generator": gen} if takes_gen else {}
            x = sched.step(eps, t, x, **kw).prev_sample
        return x.reshape(n_pts, dim).numpy(), calls

    return run, calls_for


def torch_steps_for(calls_for, budget: int) -> int | None:
    for n in range(budget, 0, -1):
        try:
            if calls_for(n) <= budget:
                return n
        except Exception:  # some schedulers refuse very few steps (e.g. order > steps)
            continue
    return None


# --------------------------------------------------------------------------- main
def main():
    p = bu.parser(__doc__)
    p.add_argument("--dim", type=int, default=2)
    p.add_argument("--n", type=int, default=None, help="samples per run (default 8192; quick 1024)")
    p.add_argument("--nfe", default=None, help="comma list of budgets (default 5,10,20,50)")
    args = p.parse_args()
    n = args.n or (1024 if args.quick else 8192)
    budgets = [int(b) for b in (args.nfe or ("5,10" if args.quick else "5,10,20,50")).split(",")]
    import jax

    import jaxdiff
    from jaxdiff import samplers
    from jaxdiff.oracle import default_mixture

    schedule = jaxdiff.linear_schedule(1000)
    mixture = default_mixture(args.dim)
    eps_fn = mixture.model_fn(schedule, "epsilon")
    metrics = Metrics(mixture, n, args.dim)
    z = np.asarray(jax.random.normal(jax.random.key(3), (n, args.dim)), np.float32)
    results = {"dim": args.dim, "n": n, "budgets": budgets, "noise_floor": metrics.floor, "jaxdiff": {},
               "diffusers": {}, "ode": {}}
    bu.eprint(f"noise floor (exact vs exact): {metrics.floor}")

    for label, sampler, options in JAX_ROWS:
        if sampler not in samplers.SAMPLERS:
            bu.eprint(f"skip {label}: not in jaxdiff.samplers.SAMPLERS")
            continue
        run = jax_runner(schedule, eps_fn, z, sampler, options)
        results["jaxdiff"][label] = {}
        for b in budgets:
            found = steps_for_budget(sampler, b, options)
            if found is None:
                continue
            steps, calls = found
            results["jaxdiff"][label][b] = {"steps": steps, "nfe": calls, **metrics(run(steps))}
        bu.eprint(f"jaxdiff {label}: {results['jaxdiff'][label]}")
    if "ode" in samplers.SAMPLERS:
        for rtol in ODE_RTOLS:
            x, calls = jax_ode(schedule, eps_fn, z, rtol)
            results["ode"][rtol] = {"nfe": calls, **metrics(x)}
        bu.eprint(f"jaxdiff ode: {results['ode']}")

    if bu.have_torch():
        for label, cls_name, kwargs, counterpart in TORCH_ROWS:
            try:
                run, calls_for = torch_runner(cls_name, kwargs, eps_fn, z)
            except Exception as e:  # a scheduler or an option this diffusers version lacks
                bu.eprint(f"skip {label}: {type(e).__name__}: {e}")
                continue
            results["diffusers"][label] = {"counterpart": counterpart}
            for b in budgets:
                steps = torch_steps_for(calls_for, b)
                if steps is None:
                    continue
                try:
                    x, calls = run(steps)
                except Exception as e:
                    bu.eprint(f"  {label} at {steps} steps failed: {type(e).__name__}: {e}")
                    continue
                results["diffusers"][label][b] = {"steps": steps, "nfe": calls, **metrics(x)}
            bu.eprint(f"diffusers {label}: {results['diffusers'][label]}")

    # Tables.
    def cells(entry):
        return [f"{entry[b]['sw2']:.4f} ({entry[b]['nfe']})" if b in entry else "n/a" for b in budgets]

    def nll_cells(entry):
        return [f"{entry[b]['nll_gap']:+.3f}" if b in entry else "n/a" for b in budgets]

    rows = [["jaxdiff", k, *cells(v), *nll_cells(v)] for k, v in results["jaxdiff"].items()]
    rows += [["diffusers", k, *cells(v), *nll_cells(v)] for k, v in results["diffusers"].items()]
    best = {}
    for stack in ("jaxdiff", "diffusers"):
        for b in budgets:
            cands = [(v[b]["sw2"], k) for k, v in results[stack].items() if b in v and np.isfinite(v[b]["sw2"])]
            best[(stack, b)] = min(cands) if cands else (float("nan"), "none")
    results["best"] = {f"{s}@{b}": {"sw2": v[0], "row": v[1]} for (s, b), v in best.items()}
    results["goal_10nfe_met"] = (10 in budgets and best[("jaxdiff", 10)][0] <= best[("diffusers", 10)][0])
    floor = metrics.floor
    print(f"\n### Quality per network call: {args.dim}-D Gaussian mixture oracle, {n} samples\n")
    print(f"SW2 (calls used) and NLL gap in nats; noise floor SW2 {floor['sw2']:.4f}, "
          f"NLL gap {floor['nll_gap']:+.3f}\n")
    print(bu.table(["stack", "sampler / scheduler", *[f"SW2 @{b}" for b in budgets],
                    *[f"NLL gap @{b}" for b in budgets]], rows))
    if results["ode"]:
        print("\nAdaptive probability-flow ODE (jaxdiff 'ode'):\n")
        print(bu.table(["rtol = atol", "calls", "SW2", "NLL gap"],
                       [[r, v["nfe"], v["sw2"], v["nll_gap"]] for r, v in results["ode"].items()]))
    print("\nBest per budget (SW2):\n")
    print(bu.table(["budget", "best jaxdiff", "SW2", "best diffusers", "SW2"],
                   [[b, best[("jaxdiff", b)][1], best[("jaxdiff", b)][0], best[("diffusers", b)][1],
                     best[("diffusers", b)][0]] for b in budgets]))
    bu.write_json("quality", results, args.out)


if __name__ == "__main__":
    main()

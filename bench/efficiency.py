"""Efficiency against the machine's own limit: the train step's achieved FLOP/s against the
measured peak of a large matmul and a large convolution through the same stack (JAX/XLA), and
the same matmul / convolution in PyTorch (oneDNN) for comparison.

* FLOPs of a train step: XLA's own count, ``jax.jit(step).lower(...).compile().cost_analysis()
  ["flops"]`` (forward, backward, Adam, EMA; it counts a multiply-add as 2).
* Peaks: ``a @ b`` with ``N x N`` float32 matrices (2 N^3 FLOPs) and a 3x3 SAME convolution
  ``[B, H, W, C] -> [B, H, W, C]`` (2 B H W C^2 9 FLOPs; forward, and forward + both gradients).
  The conv peak is the higher of the two conv rates.
* Everything alternates in one loop (A B C ... A B C ...); medians. PyTorch is timed with its
  default thread count and with 1 thread (on a shared, oversubscribed machine the latter can
  win); the table shows both.

Goal: train step / conv peak >= 0.75.

Commands (from the repository root)::

    python bench/efficiency.py              # N = 2048, conv [32, 32, 32, 128], cifar_small + digits steps
    python bench/efficiency.py --steps cifar_small,digits_x10   # the networks of BENCHMARKS.md
    python bench/efficiency.py --quick

Writes ``bench/results/efficiency.json``.
"""

from __future__ import annotations

import functools

import numpy as np

import bench_utils as bu
import networks as nets


def jax_cases(n: int, conv_shape, steps: list[str]):
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((n, n)).astype(np.float32))
    mm = jax.jit(jnp.matmul)
    bsz, h, w, c = conv_shape
    x = jnp.asarray(rng.standard_normal(conv_shape).astype(np.float32))
    k = jnp.asarray(0.05 * rng.standard_normal((3, 3, c, c)).astype(np.float32))
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1), padding="SAME",
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ct = jnp.ones(conv_shape, jnp.float32)

    def fwd_bwd(x, k, ct):
        y, vjp = jax.vjp(conv, x, k)
        return (y,) + vjp(ct)

    f_conv = jax.jit(conv)
    f_conv_fb = jax.jit(fwd_bwd)
    conv_flops = 2.0 * bsz * h * w * c * c * 9
    xla_conv_flops = f_conv.lower(x, k).compile().cost_analysis()
    xla_conv_flops = (xla_conv_flops[0] if isinstance(xla_conv_flops, (list, tuple)) else xla_conv_flops)["flops"]
    cases = {
        f"jax matmul {n}": (lambda: mm(a, b).block_until_ready(), 2.0 * n**3),
        "jax conv fwd": (lambda: f_conv(x, k).block_until_ready(), conv_flops),
        "jax conv fwd+bwd": (lambda: jax.block_until_ready(f_conv_fb(x, k, ct)), 3 * conv_flops),
    }
    for name in steps:
        net = nets.get(name)
        run, info = nets.jax_train_step(net, net.batch)
        cases[f"jax train step {name} (batch {net.batch})"] = (functools.partial(run, 1), info["flops_per_step"])
    return cases, {"conv_flops_formula": conv_flops, "conv_flops_xla": float(xla_conv_flops)}


def torch_cases(n: int, conv_shape, threads):
    torch = bu.quiet_torch()
    import torch.nn.functional as F

    a, b = torch.randn(n, n), torch.randn(n, n)
    bsz, h, w, c = conv_shape
    x = torch.randn(bsz, c, h, w)
    k = 0.05 * torch.randn(c, c, 3, 3)
    xg, kg = x.clone().requires_grad_(), k.clone().requires_grad_()
    ct = torch.ones(bsz, c, h, w)
    conv_flops = 2.0 * bsz * h * w * c * c * 9

    def fwd():
        with torch.no_grad():
            F.conv2d(x, k, padding=1)

    def fwd_bwd():
        F.conv2d(xg, kg, padding=1).backward(ct)
        xg.grad = kg.grad = None

    cases = {}
    for t in threads:
        cases[f"torch matmul {n} {t}T"] = (bu.with_threads(lambda: a @ b, t), 2.0 * n**3)
        cases[f"torch conv fwd {t}T"] = (bu.with_threads(fwd, t), conv_flops)
        cases[f"torch conv fwd+bwd {t}T"] = (bu.with_threads(fwd_bwd, t), 3 * conv_flops)
    return cases


def main():
    p = bu.parser(__doc__)
    p.add_argument("--n", type=int, default=None, help="matmul size (default 2048; quick 1024)")
    p.add_argument("--conv", default=None, help="conv shape B,H,W,C (default 32,32,32,128; quick 8,32,32,128)")
    p.add_argument("--steps", default=None, help="train-step networks of bench/networks.py (default "
                   "cifar_small,digits; quick digits)")
    p.add_argument("--no-torch", action="store_true")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    n = args.n or (1024 if args.quick else 2048)
    conv_shape = tuple(int(v) for v in (args.conv or ("8,32,32,128" if args.quick else "32,32,32,128")).split(","))
    steps = (args.steps or ("digits" if args.quick else "cifar_small,digits")).split(",")
    cases, extra = jax_cases(n, conv_shape, steps)
    if not args.no_torch and bu.have_torch():
        cases.update(torch_cases(n, conv_shape, bu.torch_thread_counts(args.torch_threads)))
    bu.eprint(f"timing {len(cases)} cases x {rounds} rounds (alternating)")
    timing = bu.alternate({k: v[0] for k, v in cases.items()}, rounds=rounds)
    for k, t in timing.items():
        t["flops"] = cases[k][1]
        t["gflops_per_s"] = t["flops"] / t["median_s"] / 1e9
    g = {k: t["gflops_per_s"] for k, t in timing.items()}
    mm_peak = g[f"jax matmul {n}"]
    conv_peak = max(g["jax conv fwd"], g["jax conv fwd+bwd"])
    rows = [[k, t["flops"] / 1e9, t["median_s"] * 1e3, t["gflops_per_s"], t["gflops_per_s"] / conv_peak,
             t["gflops_per_s"] / mm_peak] for k, t in timing.items()]
    ratios = {k: g[k] / conv_peak for k in g if k.startswith("jax train step")}
    results = {"rounds": rounds, "matmul_n": n, "conv_shape": conv_shape, "timing": timing,
               "jax_matmul_peak_gflops": mm_peak, "jax_conv_peak_gflops": conv_peak,
               "train_over_conv_peak": ratios,
               "train_over_matmul_peak": {k: g[k] / mm_peak for k in ratios}, **extra}
    print(f"\n### Efficiency: achieved FLOP/s against the stack's own peaks (matmul {n}, conv "
          f"{list(conv_shape)} 3x3; median of alternating rounds)\n")
    print(bu.table(["what", "GFLOP", "ms", "GFLOP/s", "/ jax conv peak", "/ jax matmul peak"], rows))
    for k, r in ratios.items():
        print(f"- {k}: {r:.2f} of the JAX conv peak (goal >= 0.75)")
    bu.write_json("efficiency", results, args.out)


if __name__ == "__main__":
    main()

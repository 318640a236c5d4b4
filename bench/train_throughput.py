"""Train throughput (images/s): the jaxdiff UNet train step against the same network in
diffusers (``UNet2DModel``) trained with PyTorch, and how much of the gap is the conv backend.

Both sides do the same work per step: draw ``t ~ U{0..999}`` and Gaussian noise, form ``x_t``
(linear betas 1e-4..0.02), predict eps with the UNet, MSE loss, backward, global-norm clipping
(1.0), Adam (lr 2e-4) and an EMA update of the parameters; for the conditional digits networks,
classifier-free label dropout (0.1). jaxdiff runs ``jaxdiff.training.step.train_step`` under
``jax.jit`` with the state donated (as ``training/parallel.py`` does); it additionally checks
that the loss and gradient norm are finite. The timings alternate jaxdiff, torch, jaxdiff,
torch ... and the table reports medians.

The second table times every convolution of the UNet (forward + both gradients, the shapes
read from the jaxdiff network) in both stacks, to split the throughput gap into the part the
conv backend explains (XLA's conv emitter vs oneDNN) and the rest (ours: everything else).

The defaults are the configuration of BENCHMARKS.md's train-throughput table: networks
cifar_small (batch 16) and digits (batch 64), float32, ``UNet(conv_backward=...)`` ``taps``
(the CPU's default) and ``xla`` side by side, PyTorch at its default thread count and at 1
thread (ratios against the faster), 5 alternating rounds after one warm-up call, 2 steps per
timed call, then the convolution table. The PyTorch build matters as much as any of these
(the same torch version from another wheel index can be twice as fast on the same CPU), so the
output and the JSON record it with every other setting: versions, thread counts, the machine's
load before and after, the conv option and the exact command.

Commands (from the repository root)::

    python bench/train_throughput.py                      # BENCHMARKS.md's table
    python bench/train_throughput.py --quick              # smoke run
    python bench/train_throughput.py --configs cifar_small,digits_x10   # the networks of 2026-11-23
    # accelerators (no torch; the DDPM CIFAR-10 model, batch 128, both dtypes):
    python bench/train_throughput.py --configs ddpm_cifar10 --dtypes float32,bfloat16 --conv-backward auto --no-torch

Writes ``bench/results/train_throughput.json``.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

import bench_utils as bu
import networks as nets
from networks import STEPS_PER_SAMPLE, jax_train_step

WARMUP = 1  # untimed calls of each case before the alternating rounds


# --------------------------------------------------------------------------- PyTorch / diffusers
def torch_train_step(net: nets.BenchNet, batch: int):
    """Returns ``(run, info)`` for the diffusers UNet2DModel trained the same way in eager PyTorch."""
    torch = bu.quiet_torch()
    import torch.nn.functional as F

    import jaxdiff

    torch.manual_seed(0)
    model = nets.torch_unet(nets.build(net), net.image_shape).train()
    params = [p for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    ema = [p.detach().clone() for p in params]
    abar = torch.tensor(np.asarray(jaxdiff.linear_schedule(1000).alphas_cumprod), dtype=torch.float32)
    rng = np.random.default_rng(0)
    h, w, c = net.image_shape
    x0 = torch.from_numpy(rng.uniform(-1, 1, (batch, c, h, w)).astype(np.float32))
    labels = None
    if net.num_classes is not None:
        labels = torch.from_numpy(rng.integers(0, net.num_classes, batch)).long()

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = abar[t].sqrt().view(batch, 1, 1, 1)
        s = (1.0 - abar[t]).sqrt().view(batch, 1, 1, 1)
        y = None
        if labels is not None:
            y = torch.where(torch.rand(batch) < 0.1, net.num_classes, labels)
        out = model(a * x0 + s * noise, t, class_labels=y).sample
        loss = F.mse_loss(out, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)
        return loss

    def run(k: int = STEPS_PER_SAMPLE):
        for _ in range(k):
            loss = step()
        loss.item()

    return run, {"params": nets.torch_param_count(model)}


# --------------------------------------------------------------------------- conv attribution
def conv_layers(net: nets.BenchNet, batch: int) -> list[dict]:
    """Every ``conv_general_dilated`` of the jaxdiff UNet's forward pass, grouped by shape, with counts."""
    import jax
    import jax.numpy as jnp

    model = nets.build(net)
    x = jnp.zeros((batch, *net.image_shape))
    t = jnp.zeros((batch,), jnp.int32)
    y = None if net.num_classes is None else jnp.zeros((batch,), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, t, y))(params)
    found: dict[tuple, dict] = {}

    def walk(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
                key = (tuple(lhs), tuple(rhs), tuple(eqn.params["window_strides"]),
                       tuple(tuple(p) for p in eqn.params["padding"]))
                found.setdefault(key, {"lhs": key[0], "rhs": key[1], "strides": key[2], "padding": key[3],
                                       "count": 0})["count"] += 1
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    out = []
    for v in found.values():
        (b, hh, ww, ci), (kh, kw, _, co) = v["lhs"], v["rhs"]
        oh, ow = hh // v["strides"][0], ww // v["strides"][1]
        v["flops_fwd"] = 2.0 * b * oh * ow * co * ci * kh * kw
        out.append(v)
    return out


def conv_cases(layers: list[dict], torch_threads: tuple[int, ...] = (), conv_backward: str = "taps"):
    """``{stack: run()}`` where ``run`` does forward + input and weight gradients of every layer once.

    The jaxdiff side differentiates the convolutions as ``UNet(conv_backward=...)`` does."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models.conv import conv_for

    conv_fn = conv_for(conv_backward) or jax.lax.conv_general_dilated
    rng = np.random.default_rng(0)
    jfns, tfns = [], []
    for v in layers:
        lhs, rhs = v["lhs"], v["rhs"]
        x = jnp.asarray(rng.standard_normal(lhs).astype(np.float32))
        w = jnp.asarray(0.05 * rng.standard_normal(rhs).astype(np.float32))
        conv = functools.partial(conv_fn, window_strides=v["strides"], padding=v["padding"],
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = conv(x, w)
        ct = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))

        def fwd_bwd(x, w, ct, conv=conv):
            out, vjp = jax.vjp(conv, x, w)
            return (out,) + vjp(ct)  # the output too, or XLA would drop the forward conv

        f = jax.jit(fwd_bwd)
        jfns.append((v["count"], functools.partial(f, x, w, ct)))
        if torch_threads:
            torch = bu.quiet_torch()
            import torch.nn.functional as F

            tx_ = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
            tw = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()
            tct = torch.from_numpy(np.asarray(ct).transpose(0, 3, 1, 2).copy())
            pad = rhs[0] // 2  # diffusers' symmetric padding (same output shape)

            def tf(tx_=tx_, tw=tw, tct=tct, stride=v["strides"][0], pad=pad):
                out = F.conv2d(tx_, tw, stride=stride, padding=pad)
                out.backward(tct)
                tx_.grad = None
                tw.grad = None

            tfns.append((v["count"], tf))

    def run_jax():
        outs = [fn() for count, fn in jfns for _ in range(count)]
        jax.block_until_ready(outs)

    cases = {"jaxdiff (XLA)": run_jax}
    for n in torch_threads:
        cases[f"torch (oneDNN) {n}T"] = bu.with_threads(lambda: [fn() for count, fn in tfns for _ in range(count)], n)
    return cases


# --------------------------------------------------------------------------- settings
def run_settings(args, rounds: int, threads: tuple[int, ...]) -> dict:
    """Every setting the figures depend on, recorded in the JSON and printed above the table."""
    import jax

    out = {
        "command": " ".join(["python bench/train_throughput.py", *command_args(sys.argv[1:])]),
        "cpu_model": bu.cpu_model(),
        "configs": args.configs.split(","), "batch_override": args.batch, "quick": args.quick,
        "dtypes": args.dtypes.split(","), "conv_backward": args.conv_backward.split(","),
        "backend": jax.default_backend(), "rounds": rounds, "warmup_calls": WARMUP,
        "steps_per_timed_call": STEPS_PER_SAMPLE, "jax": jax.__version__,
        "torch": None, "torch_cuda_build": None, "diffusers": None, "torch_threads": list(threads),
        "torch_default_threads": None, "loadavg_1min_start": bu.load_average(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
    }
    if threads:
        torch = bu.quiet_torch()
        import diffusers

        out.update(torch=torch.__version__, torch_cuda_build=torch.version.cuda, diffusers=diffusers.__version__,
                   torch_default_threads=torch.get_num_threads())
    return out


def command_args(argv: list[str]) -> list[str]:
    """``argv`` without ``--out PATH`` (where the JSON goes is not a setting)."""
    out, skip = [], False
    for a in argv:
        if skip or a.startswith("--out="):
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        out.append(a)
    return out


def settings_line(s: dict) -> str:
    torch = (f"torch {s['torch']} (threads {', '.join(map(str, s['torch_threads']))}; the faster is the baseline), "
             f"diffusers {s['diffusers']}" if s["torch"] else "no torch")
    return (f"`{s['command']}`: {s['cpu_model']}, jax {s['jax']} ({s['backend']}), {torch}; conv_backward "
            f"{', '.join(s['conv_backward'])}; {s['rounds']} rounds after {s['warmup_calls']} warm-up call, "
            f"{s['steps_per_timed_call']} steps per timed call; load {s['loadavg_1min_start']:.2f} -> "
            f"{s['loadavg_1min_end']:.2f} on {s['cpu_count']} CPUs")


# --------------------------------------------------------------------------- main
def main():
    p = bu.parser(__doc__)
    p.add_argument("--configs", default="cifar_small,digits",
                   help=f"comma list of networks in bench/networks.py: {sorted(nets.NETWORKS)}")
    p.add_argument("--batch", type=int, default=None, help="override every config's batch size")
    p.add_argument("--dtypes", default="float32", help="jaxdiff compute dtypes, e.g. float32,bfloat16")
    p.add_argument("--no-torch", action="store_true", help="jaxdiff only (e.g. on an accelerator)")
    p.add_argument("--no-conv", action="store_true", help="skip the conv attribution table")
    p.add_argument("--conv-backward", default="taps,xla",
                   help="comma list of UNet.conv_backward values to time side by side (auto: taps on the CPU, "
                        "xla elsewhere); the first is the one the conv table and GFLOP/s use")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    with_torch = not args.no_torch and bu.have_torch()
    threads = bu.torch_thread_counts(args.torch_threads) if with_torch else ()
    import jax

    settings = run_settings(args, rounds, threads)
    results = {"settings": settings, "rounds": rounds, "steps_per_sample": STEPS_PER_SAMPLE, "configs": {}}
    rows, conv_rows = [], []
    for name in args.configs.split(","):
        net = nets.get(name)
        batch = args.batch or (min(net.batch, 8) if args.quick else net.batch)
        res = {"batch": batch, "image_shape": net.image_shape, "config": net}
        cases, infos = {}, {}
        backwards = args.conv_backward.split(",")
        for dtype in args.dtypes.split(","):
            for conv_backward in backwards:
                label = f"jaxdiff {dtype}" + (f" conv_backward={conv_backward}" if len(backwards) > 1 else "")
                bu.eprint(f"[{name}] compiling {label} ...")
                cases[label], infos[label] = jax_train_step(net, batch, dtype=dtype, conv_backward=conv_backward)
        if with_torch:
            run, info = torch_train_step(net, batch)
            for n in threads:
                cases[f"torch eager {n}T"], infos[f"torch eager {n}T"] = bu.with_threads(run, n), info
        bu.eprint(f"[{name}] timing {list(cases)} x {rounds} rounds (alternating)")
        timing = bu.alternate(cases, rounds=rounds, warmup=WARMUP)
        for label, t in timing.items():
            step_s = t["median_s"] / STEPS_PER_SAMPLE
            t.update(step_s=step_s, images_per_s=batch / step_s, **infos[label])
        torch_labels = [k for k in timing if k.startswith("torch")]
        first_jax = next(k for k in timing if k.startswith("jaxdiff"))
        best_torch = min(torch_labels, key=lambda k: timing[k]["step_s"]) if torch_labels else None
        res["best_torch"] = best_torch
        for label, t in timing.items():
            t["vs_torch"] = timing[best_torch]["step_s"] / t["step_s"] if best_torch else float("nan")
            flops = timing[first_jax]["flops_per_step"]
            t["achieved_gflops"] = flops / t["step_s"] / 1e9
            rows.append([name, batch, label, t["params"], t["step_s"] * 1e3, t["images_per_s"], t["vs_torch"],
                         t["achieved_gflops"], t.get("compile_s", float("nan"))])
        res["timing"] = timing

        if with_torch and not args.no_conv and jax.default_backend() == "cpu":
            layers = conv_layers(net, batch)
            n_best = int(best_torch.split()[-1][:-1])  # the thread count of the fastest torch run
            ccases = conv_cases(layers, torch_threads=(n_best,), conv_backward=backwards[0])
            bu.eprint(f"[{name}] timing {len(layers)} conv shapes ({sum(v['count'] for v in layers)} layers)")
            ct = bu.alternate(ccases, rounds=rounds, warmup=WARMUP)
            conv_j, conv_t = ct["jaxdiff (XLA)"]["median_s"], ct[f"torch (oneDNN) {n_best}T"]["median_s"]
            step_j = timing[first_jax]["step_s"]
            step_t = timing[best_torch]["step_s"]
            gap = step_j - step_t
            backend = conv_j - conv_t
            attrib = {
                "layers": layers, "timing": ct, "conv_s": {"jax": conv_j, "torch": conv_t},
                "step_s": {"jax": step_j, "torch": step_t}, "gap_s": gap, "backend_s": backend,
                "other_s": {"jax": step_j - conv_j, "torch": step_t - conv_t},
                "backend_fraction_of_gap": backend / gap if gap > 0 else float("nan"),
                "conv_flops_fwd_bwd": 3 * sum(v["flops_fwd"] * v["count"] for v in layers),
            }
            res["conv_attribution"] = attrib
            for stack, conv_s, step_s in (("jaxdiff (XLA)", conv_j, step_j),
                                          (f"torch (oneDNN) {n_best}T", conv_t, step_t)):
                conv_rows.append([name, stack, conv_s * 1e3, attrib["conv_flops_fwd_bwd"] / conv_s / 1e9,
                                  step_s * 1e3, (step_s - conv_s) * 1e3, 100 * conv_s / step_s])
            res["summary"] = (
                f"step time jaxdiff - {best_torch}: {gap * 1e3:+.1f} ms; of which convolutions "
                f"{backend * 1e3:+.1f} ms (the backend), everything else {(gap - backend) * 1e3:+.1f} ms (ours)")
        results["configs"][name] = res

    settings["loadavg_1min_end"] = bu.load_average()
    print("\n### Train throughput (median of alternating rounds)\n")
    print(settings_line(settings) + "\n")
    print(bu.table(["config", "batch", "stack", "params", "ms/step", "images/s", "x torch", "GFLOP/s (XLA count)",
                    "compile s"], rows))
    if conv_rows:
        print("\n### The UNet's convolutions alone (forward + both gradients, every layer once)\n")
        print(bu.table(["config", "stack", "conv ms", "conv GFLOP/s", "step ms", "non-conv ms", "conv % of step"],
                       conv_rows))
        for name, res in results["configs"].items():
            if "summary" in res:
                print(f"- {name}: {res['summary']}")
    bu.write_json("train_throughput", results, args.out)


if __name__ == "__main__":
    main()

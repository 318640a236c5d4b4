"""The DiT train step: jaxdiff's (``jax.jit``) against PyTorch's on the same network, diffusers'
``DiTTransformer2DModel`` holding the same weights (written by ``jaxdiff.models.to_diffusers``).

The network is ``bench/networks.py``'s ``dit_s_2``: DiT-S/2's block stack (width 384, 12 blocks,
6 heads, MLP 4x) on 16x16x4 latents (64 tokens), 1000 classes, float32, batch 8, built with
diffusers' layout (``DiTLayout(freq_shift=1, mlp_norm_eps=1e-5, pos_grid=8)``: the same FLOPs as
the native one) so that the export is the identical function; the script checks it (the two
forwards on one batch, relative error) before timing. Both sides do the same work per step as
``bench/train_throughput.py``'s: ``t ~ U{0..999}`` and Gaussian noise, ``x_t`` on linear betas,
epsilon prediction, MSE, backward, global-norm clipping (1.0), Adam (lr 2e-4), an EMA update of
the parameters, label dropout 0.1 (diffusers' label embedder drops labels itself in train mode).
jaxdiff runs ``jaxdiff.training.step.train_step`` with the state donated; PyTorch runs eager at
its default thread count and at 1 thread (ratios against the faster). The cases alternate
(jaxdiff, torch, jaxdiff, ...), medians reported. The issue's goal: >= 1.0x PyTorch.

Commands (from the repository root; the torch side needs torch and diffusers)::

    python bench/dit_step.py                # 5 rounds
    python bench/dit_step.py --quick        # smoke run (2 rounds, batch 2)
    python bench/dit_step.py --profile      # also: XLA's time per op category of one step, and
                                            # the blocks' matmuls alone in both stacks

Writes ``bench/results/dit_step.json``.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

import bench_utils as bu
import networks as nets
from networks import STEPS_PER_SAMPLE, jax_train_step

WARMUP = 1


def jax_model(net: nets.BenchNet):
    """``net``'s DiT with diffusers' layout (the function its export computes)."""
    from jaxdiff.models import DiTLayout

    h = net.image_shape[0]
    model = nets.build(net)
    return model.clone(layout=DiTLayout(freq_shift=1.0, mlp_norm_eps=1e-5, pos_grid=h // model.patch_size))


def torch_twin(model, params, net: nets.BenchNet, batch: int):
    """diffusers' DiT holding ``params`` (through ``to_diffusers``) and the relative error of its
    forward against jaxdiff's on one batch (``max |a - b| / max |b|``)."""
    import jax
    import jax.numpy as jnp

    torch = bu.quiet_torch()
    from diffusers import DiTTransformer2DModel

    from jaxdiff.models import to_diffusers

    with tempfile.TemporaryDirectory() as tmp:
        path = to_diffusers(model, params, os.path.join(tmp, "dit"), sample_size=net.image_shape[0])
        twin = DiTTransformer2DModel.from_pretrained(path).eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *net.image_shape)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, net.num_classes, batch)
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), timestep=torch.from_numpy(t),
                      class_labels=torch.from_numpy(y)).sample.numpy().transpose(0, 2, 3, 1)
    return twin, float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def torch_train_step(twin, net: nets.BenchNet, batch: int):
    """``(run, info)``: ``twin`` trained as jaxdiff's step trains (module docstring), eager PyTorch."""
    torch = bu.quiet_torch()
    import torch.nn.functional as F

    import jaxdiff

    torch.manual_seed(0)
    model = twin.train()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
    ema = [p.detach().clone() for p in params]
    abar = torch.tensor(np.asarray(jaxdiff.linear_schedule(1000).alphas_cumprod), dtype=torch.float32)
    rng = np.random.default_rng(0)
    h, w, c = net.image_shape
    x0 = torch.from_numpy(rng.uniform(-1, 1, (batch, c, h, w)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, net.num_classes, batch)).long()

    def step():
        t = torch.randint(0, 1000, (batch,))
        noise = torch.randn_like(x0)
        a = abar[t].sqrt().view(batch, 1, 1, 1)
        s = (1.0 - abar[t]).sqrt().view(batch, 1, 1, 1)
        out = model(a * x0 + s * noise, timestep=t, class_labels=labels).sample
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


def profile_step(run, path: str) -> list[list]:
    """Rows ``[op category, ms per step, % of step]`` from a ``jax.profiler`` trace of ``run``
    (the XLA:CPU ops' own times, grouped by the HLO op name's prefix: dot, fusion, ...)."""
    import glob
    import gzip
    import json
    import re

    import jax

    jax.profiler.start_trace(path)
    run(STEPS_PER_SAMPLE)
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(max(files, key=os.path.getmtime), "rt") as f:
        events = json.load(f).get("traceEvents", [])
    totals: dict[str, float] = {}
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        if not re.match(r"^[a-z][\w\-.]*$", name) or name.startswith(("pjit", "jit", "Thunk")):
            continue
        key = re.split(r"[.\d]", name, maxsplit=1)[0] or name
        totals[key] = totals.get(key, 0.0) + e["dur"] / 1e3 / STEPS_PER_SAMPLE
    total = sum(totals.values()) or float("nan")
    return [[k, v, 100 * v / total] for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:12]]


def block_matmuls(model, batch: int, tokens: int) -> list[tuple[int, int, int, int]]:
    """``(M, K, N, count)`` of the token-wise linear layers of the DiT's blocks (qkv, proj, fc1, fc2)."""
    d = model.hidden_size
    hidden = int(d * model.mlp_ratio)
    m = batch * tokens
    return [(m, d, 3 * d, model.depth), (m, d, d, model.depth), (m, d, hidden, model.depth),
            (m, hidden, d, model.depth)]


def matmul_cases(shapes, torch_threads: int | None):
    """``{stack: run()}``: forward and both gradients (``x @ w``, ``g @ w.T``, ``x.T @ g``) of every
    layer in ``shapes`` once, float32; jaxdiff's under one ``jax.jit``, torch's eager."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32),
               rng.standard_normal((m, n)).astype(np.float32), count) for m, k, n, count in shapes]

    @jax.jit
    def all_layers(ops):
        return [(x @ w, g @ w.T, x.T @ g) for x, w, g in ops]

    jops = [tuple(jnp.asarray(a) for a in (x, w, g)) for x, w, g, count in arrays for _ in range(count)]
    cases = {"jaxdiff (XLA)": lambda: jax.block_until_ready(all_layers(jops))}
    if torch_threads:
        torch = bu.quiet_torch()
        tops = [tuple(torch.from_numpy(a) for a in (x, w, g)) for x, w, g, count in arrays for _ in range(count)]
        cases[f"torch {torch_threads}T"] = bu.with_threads(
            lambda: [(x @ w, g @ w.T, x.T @ g) for x, w, g in tops], torch_threads)
    return cases


def main():
    p = bu.parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="batch (default: the network's, 8)")
    p.add_argument("--no-torch", action="store_true", help="jaxdiff only")
    p.add_argument("--profile", action="store_true", help="also profile one jaxdiff step (ops by category)")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    import jax

    rounds = args.rounds or (2 if args.quick else 5)
    net = nets.get("dit_s_2")
    batch = args.batch or (2 if args.quick else net.batch)
    with_torch = not args.no_torch and bu.have_torch()
    threads = bu.torch_thread_counts(args.torch_threads) if with_torch else ()
    command = " ".join(["python bench/dit_step.py", *sys.argv[1:]])
    print(f"`{command}`: {bu.cpu_model()}, jax {jax.__version__} ({jax.default_backend()}), {rounds} rounds after "
          f"{WARMUP} warm-up call, {STEPS_PER_SAMPLE} steps per timed call, batch {batch}, load "
          f"{bu.load_average():.2f} on {os.cpu_count()} CPUs\n")
    model = jax_model(net)
    bu.eprint("compiling the jaxdiff step ...")
    cases, infos = {}, {}
    cases["jaxdiff jit"], infos["jaxdiff jit"] = jax_train_step(net, batch, model=model)
    out = {"command": command, "network": net, "batch": batch, "rounds": rounds, "steps_per_sample": STEPS_PER_SAMPLE}
    if with_torch:
        from flax.core import unfreeze

        params = unfreeze(model.init(jax.random.key(0), *_dummy(net, batch))["params"])
        params = _perturbed(params)  # off the zero initialisation, so that the parity check means something
        twin, rel = torch_twin(model, params, net, batch)
        out["parity_max_rel_error"] = rel
        print(f"same network: jaxdiff and diffusers forwards agree to {rel:.2e} (max relative error)\n")
        run, info = torch_train_step(twin, net, batch)
        for n in threads:
            cases[f"torch eager {n}T"], infos[f"torch eager {n}T"] = bu.with_threads(run, n), info
    bu.eprint(f"timing {list(cases)} x {rounds} rounds (alternating)")
    timing = bu.alternate(cases, rounds=rounds, warmup=WARMUP)
    torch_labels = [k for k in timing if k.startswith("torch")]
    best = min(torch_labels, key=lambda k: timing[k]["median_s"]) if torch_labels else None
    rows = []
    for label, t in timing.items():
        step_s = t["median_s"] / STEPS_PER_SAMPLE
        t.update(step_s=step_s, images_per_s=batch / step_s, **infos[label])
        t["vs_torch"] = timing[best]["median_s"] / t["median_s"] if best else float("nan")
        rows.append([label, t["params"], step_s * 1e3, t["images_per_s"], t["vs_torch"],
                     infos["jaxdiff jit"]["flops_per_step"] / step_s / 1e9])
    out.update(timing=timing, best_torch=best)
    print(bu.table(["stack", "params", "ms/step", "images/s", "x torch", "GFLOP/s (XLA count)"], rows))
    if args.profile:
        with tempfile.TemporaryDirectory() as tmp:
            prof = profile_step(cases["jaxdiff jit"], tmp)
        out["profile"] = prof
        print("\n### One jaxdiff step by XLA op category\n")
        print(bu.table(["op", "ms/step", "% of op time"], prof))
        shapes = block_matmuls(model, batch, (net.image_shape[0] // model.patch_size) ** 2)
        n_best = int(best.split()[-1][:-1]) if best else None
        mm = bu.alternate(matmul_cases(shapes, n_best), rounds=rounds, warmup=WARMUP)
        flops = 6.0 * sum(m * k * n * c for m, k, n, c in shapes)
        out["matmuls"] = {"shapes": shapes, "timing": mm, "flops": flops}
        step = {"jaxdiff (XLA)": timing["jaxdiff jit"]["step_s"], f"torch {n_best}T": timing[best]["step_s"] if best
                else float("nan")}
        print("\n### The blocks' linear layers alone (forward + both gradients, every layer once)\n")
        print(bu.table(["stack", "matmul ms", "GFLOP/s", "step ms", "rest of the step ms"],
                       [[k, 1e3 * v["median_s"], flops / v["median_s"] / 1e9, 1e3 * step[k],
                         1e3 * (step[k] - v["median_s"])] for k, v in mm.items()]))
    bu.write_json("dit_step", out, args.out)


def _dummy(net: nets.BenchNet, batch: int):
    import jax.numpy as jnp

    return (jnp.zeros((batch, *net.image_shape)), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))


def _perturbed(params, scale: float = 0.02):
    import jax

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


if __name__ == "__main__":
    main()

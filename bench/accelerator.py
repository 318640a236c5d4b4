"""One accelerator: train images/s and MFU of the UNet and DiT presets, peak memory, sampling wall time, compile times.

Cases (each in its own process, so that ``peak_bytes_in_use`` is that case's peak):

* ``train``: the library's train step (``bench/networks.py``) under ``jax.jit`` with the state donated.
  The DDPM CIFAR-10 UNet at global batch 128, float32 and bfloat16 compute, with and without
  ``remat``; dropout 0.1 as in the preset (per-example keys). DiT-B/2 (batch 128) and DiT-XL/2
  (batch 64) class-conditional on 32x32x4 latents (ImageNet 256 through the SD autoencoder, 1,000
  classes, learned variance as in the paper) in bfloat16. Images/s over ``steps`` steps after two
  warm-up steps, and the model FLOPs utilisation (``jaxdiff.training.throughput``: the compiled
  step's FLOPs from XLA's cost analysis times steps/s over the device's peak bf16 dense FLOP/s;
  ``--peak-flops`` overrides the table, e.g. to exercise it on a CPU).
* ``sample``: 256 samples, 1,000-step ancestral DDPM and 50-step DDIM
  (:func:`jaxdiff.training.generate.generate` through ``bench/networks.py``, under ``jax.jit``),
  float32 and bfloat16; the wall time of one call after the compiling call.

The weights are random (speed does not depend on them). Goals on one H100/H200: >= 8,000 train
images/s in bfloat16 for the UNet; 256 x 1,000-step DDPM in <= 10 s; >= 35% MFU for DiT-XL/2 in
bfloat16 (anchor: fast-DiT, ~108 images/s and ~12% MFU on one A100 in fp16).

Commands (from the repository root)::

    bash bench/accelerator.sh                        # installs, runs, prints the table
    python bench/accelerator.py --quick              # CPU smoke run: tiny UNet and DiT, a few steps
    python bench/accelerator.py --quick --peak-flops 1e12   # the same, with an MFU column

Writes ``$OUT/accelerator.json`` (``bench/results`` when ``$OUT`` is unset), or ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import networks as nets


def _peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_train(preset, image_shape, batch, dtype, remat, steps, overrides=None, num_classes=None,
              learn_sigma=False, peak_flops=None):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdiff
    from jaxdiff.models import count_params, get_model
    from jaxdiff.objectives import Diffusion
    from jaxdiff.training import throughput
    from jaxdiff.training.state import make_optimizer

    model = get_model(preset, dtype=getattr(jnp, dtype), remat=remat, num_classes=num_classes,
                      learn_sigma=learn_sigma, **(overrides or {}))
    tx = make_optimizer(2e-4, warmup_steps=0, grad_clip=1.0)
    state = nets.init_train_state(model, tx, image_shape, num_classes=num_classes)
    objective = Diffusion(schedule=jaxdiff.linear_schedule(1000), variance=learn_sigma)  # the hybrid loss if learned
    fn = jax.jit(nets.library_train_step(objective), donate_argnums=(0,))
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.uniform(-1, 1, (batch, *image_shape)).astype(np.float32)),
            "index": jnp.arange(batch, dtype=jnp.int32)}
    if num_classes:
        data["label"] = jnp.asarray(rng.integers(0, num_classes, (batch,)), jnp.int32)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = fn.lower(state, data, key).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, data, key)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - t0
    flops = throughput.step_flops(compiled)  # one device's; the bench runs on one
    peak = peak_flops or throughput.peak_flops(jax.devices()[0].device_kind)
    mfu = throughput.mfu(flops, steps / wall, peak) if flops and peak else None
    return {"params": count_params(state.params), "compile_s": compile_s, "step_ms": 1e3 * wall / steps,
            "images_per_s": batch * steps / wall, "step_flops": flops, "peak_flops": peak, "mfu": mfu,
            "finite": float(metrics["finite"]), "peak_bytes": _peak_bytes()}


def run_sample(preset, image_shape, num, dtype, sampler, num_steps, overrides=None):
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import get_model

    model = get_model(preset, dtype=getattr(jnp, dtype), **(overrides or {}))
    x = jnp.zeros((1, *image_shape))
    params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    # Random weights everywhere (the zero-initialised output conv would make every prediction 0).
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [0.02 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    fn = jax.jit(nets.library_generate(model, image_shape, sampler=sampler, num_steps=num_steps))
    labels = jnp.zeros((num,), jnp.int32)
    key = jax.random.key(3)
    t0 = time.perf_counter()
    compiled = fn.lower(params, key=key, labels=labels).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params, key=key, labels=labels))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "compile_s": compile_s, "finite": bool(jnp.isfinite(out).all()),
            "peak_bytes": _peak_bytes()}


# The DiTs train class-conditional on ImageNet-256 latents (32x32x4, 1,000 classes), learned variance.
DIT = {"image_shape": (32, 32, 4), "num_classes": 1000, "learn_sigma": True}


def cases(quick: bool, peak_flops=None):
    extra = {"peak_flops": peak_flops} if peak_flops else {}
    if quick:  # one level, no attention; a one-block DiT: compiles in seconds on a CPU
        common = {"preset": "tiny", "image_shape": (8, 8, 1), "overrides": {"ch_mult": (1,), "attn_resolutions": ()}}
        dit = dict(DIT, image_shape=(8, 8, 4), overrides={"hidden_size": 32, "depth": 1, "num_heads": 2})
        train = [dict(common, kind="train", batch=8, dtype=d, remat=r, steps=2, **extra)
                 for d, r in (("float32", False), ("bfloat16", True))]
        train += [dict(dit, kind="train", preset=p, batch=4, dtype="bfloat16", remat=False, steps=2, **extra)
                  for p in ("dit_b_2", "dit_xl_2")]
        sample = [dict(common, kind="sample", num=4, dtype="bfloat16", sampler=s, num_steps=n)
                  for s, n in (("ddpm", 10), ("ddim", 5))]
        return train + sample
    common = {"preset": "ddpm_cifar10", "image_shape": (32, 32, 3)}
    train = [dict(common, kind="train", batch=128, dtype=d, remat=r, steps=30, **extra)
             for d in ("float32", "bfloat16") for r in (False, True)]
    # bf16 DiTs: batch 128 (B/2) and 64 (XL/2: its activations at 256 tokens x 28 blocks fill ~30 GB).
    train += [dict(DIT, kind="train", preset=p, batch=b, dtype="bfloat16", remat=False, steps=20, **extra)
              for p, b in (("dit_b_2", 128), ("dit_xl_2", 64))]
    sample = [dict(common, kind="sample", num=256, dtype=d, sampler=s, num_steps=n)
              for d, s, n in (("bfloat16", "ddpm", 1000), ("bfloat16", "ddim", 50), ("float32", "ddim", 50),
                              ("float32", "ddpm", 1000))]
    return train + sample


def run_case(case: dict) -> dict:
    import jax

    case = dict(case)
    kind = case.pop("kind")
    case["image_shape"] = tuple(case["image_shape"])
    if "overrides" in case:  # JSON turned tuples into lists
        case["overrides"] = {k: tuple(v) if isinstance(v, list) else v for k, v in case["overrides"].items()}
    res = run_train(**case) if kind == "train" else run_sample(**case)
    return dict(res, backend=jax.default_backend(), device=str(jax.devices()[0].device_kind), jax=jax.__version__)


def _label(case):
    if case["kind"] == "train":
        return f"train {case['preset']} {case['dtype']}{' remat' if case['remat'] else ''} batch {case['batch']}"
    return f"sample {case['num']} x {case['num_steps']}-step {case['sampler']} {case['dtype']}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: the tiny preset, a few steps")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/accelerator.json or bench/results/)")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # one case, JSON, in a child process
    p.add_argument("--timeout", type=float, default=300, help="seconds allowed for one case")
    p.add_argument("--budget", type=float, default=None, help="skip the cases left after this many seconds")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="the device's peak FLOP/s for the MFU (default: jaxdiff.training.throughput.PEAK_FLOPS)")
    args = p.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return

    # This process never touches the device (it would hold its memory): the children report it.
    results = {"cases": []}
    rows = []
    start = time.perf_counter()
    for case in cases(args.quick, args.peak_flops):
        label = _label(case)
        if args.budget is not None and time.perf_counter() - start > args.budget:
            results["cases"].append({"case": case, "label": label, "error": "skipped: over --budget"})
            rows.append((label, "skipped (over --budget)", "", "", ""))
            continue
        print(f"running {label} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            errors = [ln for ln in proc.stderr.splitlines() if ln and not ln.startswith((" ", "For simplicity", "---"))]
            res = json.loads(lines[-1][7:]) if lines else {"error": errors[-1] if errors else "no result"}
        except subprocess.TimeoutExpired:
            res = {"error": f"timed out after {args.timeout:.0f} s"}
        res["process_s"] = time.perf_counter() - t0
        for k in ("backend", "device", "jax"):
            if k in res:
                results[k] = res.pop(k)
        results["cases"].append({"case": case, "label": label, **res})
        peak = res.get("peak_bytes")
        rate = (f"{res['images_per_s']:.0f} img/s" if "images_per_s" in res
                else f"{res['wall_s']:.2f} s" if "wall_s" in res else str(res.get("error")))
        mfu = res.get("mfu")
        rows.append((label, rate, "" if "images_per_s" not in res else "n/a" if mfu is None else f"{mfu:.1%}",
                     f"{res.get('compile_s', float('nan')):.1f}", "n/a" if peak is None else f"{peak / 2**30:.2f}"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    print(f"\n### {results.get('device')} ({results.get('backend')}, jax {results.get('jax')})\n")
    print("| case | images/s or wall | MFU | compile s | peak GiB |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                                   "accelerator_quick.json" if args.quick else "accelerator.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

"""Sampling time: a 50-step DDIM batch with the UNet, jaxdiff against diffusers' ``DDIMScheduler``.

jaxdiff: ``jax.jit`` of ``jaxdiff.samplers.sample(..., sampler="ddim", num_steps=n, eta=0)`` with
the UNet's ``apply`` as ``model_fn`` (the whole chain is one compiled ``lax`` loop; ``num_steps``
is a runtime argument). diffusers: the documented loop ``for t in scheduler.timesteps:
eps = unet(x, t).sample; x = scheduler.step(eps, t, x).prev_sample`` under
``torch.inference_mode()`` with the same architecture (``UNet2DModel``, same parameter count),
the same batch and the same number of network calls. Timings alternate A B A B; medians.

Commands (from the repository root)::

    python bench/sampling.py                 # cifar_small (batch 16) + digits (batch 64), 50 DDIM steps
    python bench/sampling.py --configs cifar_small,digits_x10   # the networks of BENCHMARKS.md
    python bench/sampling.py --quick         # smoke run (5 steps, small batches)
    # accelerators: the DDPM CIFAR-10 model, 1000 ancestral steps for 256 images, both dtypes
    python bench/sampling.py --configs ddpm_cifar10 --sampler ddpm --num-steps 1000 --batch 256 \\
        --dtypes float32,bfloat16 --no-torch

Writes ``bench/results/sampling.json``.
"""

from __future__ import annotations

import functools
import time

import bench_utils as bu
import networks as nets

DEFAULT_BATCH = {"cifar_small": 16, "digits": 64, "digits_x10": 64, "ddpm_cifar10": 256}  # others: the network's


def jax_sampler(net: nets.BenchNet, batch: int, sampler: str, dtype: str = "float32"):
    """``(run(num_steps), info)``: one jitted call samples the whole batch."""
    import jax
    import jax.numpy as jnp

    import jaxdiff
    from jaxdiff import samplers

    model = nets.build(net, dtype=dtype)
    x = jnp.zeros((1, *net.image_shape))
    t = jnp.zeros((1,), jnp.int32)
    y = None if net.num_classes is None else jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(0), x, t, y)["params"]
    schedule = jaxdiff.linear_schedule(1000)
    labels = None if net.num_classes is None else jnp.arange(batch, dtype=jnp.int32) % net.num_classes

    @jax.jit
    def generate(params, key, num_steps):
        def model_fn(x_t, t_):
            return model.apply({"params": params}, x_t, t_, labels, train=False)

        return samplers.sample(schedule, model_fn, key, (batch, *net.image_shape), sampler=sampler,
                               num_steps=num_steps)

    key = jax.random.key(0)
    t0 = time.perf_counter()
    generate(params, key, 2).block_until_ready()
    first_s = time.perf_counter() - t0

    def run(num_steps):
        generate(params, key, num_steps).block_until_ready()

    return run, {"time_to_first_sample_s": first_s}


def torch_sampler(net: nets.BenchNet, batch: int, sampler: str):
    torch = bu.quiet_torch()
    from diffusers import DDIMScheduler, DDPMScheduler

    torch.manual_seed(0)
    model = nets.torch_unet(nets.build(net), net.image_shape).eval()
    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    scheduler = DDIMScheduler(**kw) if sampler == "ddim" else DDPMScheduler(**kw)
    h, w, c = net.image_shape
    labels = None if net.num_classes is None else torch.arange(batch) % net.num_classes
    gen = torch.Generator().manual_seed(0)

    def run(num_steps):
        with torch.inference_mode():
            scheduler.set_timesteps(num_steps)
            x = torch.randn(batch, c, h, w, generator=gen)
            for t in scheduler.timesteps:
                eps = model(x, t, class_labels=labels).sample
                x = scheduler.step(eps, t, x).prev_sample
        return x

    return run, {}


def main():
    p = bu.parser(__doc__)
    p.add_argument("--configs", default="cifar_small,digits",
                   help=f"comma list of networks in bench/networks.py: {sorted(nets.NETWORKS)}")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--num-steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--no-torch", action="store_true")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    steps = 5 if args.quick else args.num_steps
    with_torch = not args.no_torch and bu.have_torch()
    threads = bu.torch_thread_counts(args.torch_threads) if with_torch else ()

    results = {"rounds": rounds, "num_steps": steps, "sampler": args.sampler, "configs": {}}
    rows = []
    for name in args.configs.split(","):
        net = nets.get(name)
        batch = args.batch or (4 if args.quick else DEFAULT_BATCH.get(name, net.batch))
        cases, infos = {}, {}
        for dtype in args.dtypes.split(","):
            label = f"jaxdiff {args.sampler} {dtype}"
            bu.eprint(f"[{name}] compiling {label} ...")
            run, infos[label] = jax_sampler(net, batch, args.sampler, dtype)
            cases[label] = functools.partial(run, steps)
        if with_torch:
            run, info = torch_sampler(net, batch, args.sampler)
            for n in threads:
                label = f"diffusers {'DDIMScheduler' if args.sampler == 'ddim' else 'DDPMScheduler'} {n}T"
                cases[label], infos[label] = bu.with_threads(functools.partial(run, steps), n), info
        bu.eprint(f"[{name}] timing {list(cases)} x {rounds} rounds (alternating)")
        timing = bu.alternate(cases, rounds=rounds)
        ref = [v["median_s"] for k, v in timing.items() if k.startswith("diffusers")]
        for label, t in timing.items():
            t.update(infos[label])
            t["images_per_s"] = batch / t["median_s"]
            t["ms_per_step"] = 1e3 * t["median_s"] / steps
            t["vs_best_diffusers"] = min(ref) / t["median_s"] if ref else float("nan")
            rows.append([name, batch, steps, label, t["median_s"], t["ms_per_step"], t["images_per_s"],
                         t["vs_best_diffusers"]])
        results["configs"][name] = {"batch": batch, "timing": timing}

    print(f"\n### Sampling: {steps} {args.sampler} steps (median of alternating rounds)\n")
    print(bu.table(["config", "batch", "steps", "stack", "s / batch", "ms / step", "images/s", "x best diffusers"],
                   rows))
    bu.write_json("sampling", results, args.out)


if __name__ == "__main__":
    main()

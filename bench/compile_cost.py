"""Compile cost: time to the first sample and the first train step, and how many compilations
happen when the number of steps, eta or the guidance scale change (goal: none).

* Time to first: each measurement runs in a fresh Python process (no warm in-process caches,
  no persistent compilation cache): the first call of the jitted function (trace + compile +
  run) against the median of later calls (run only); their difference is the compile cost.
* Recompilations: one ``jax.jit`` of a sampling function whose ``num_steps``, ``eta`` and
  classifier-free guidance scale ``w`` are arguments, called over a grid of values with every
  sampler of ``jaxdiff.samplers.SAMPLERS`` that samples diffusion models (a class-conditional
  network; ``eta`` only for the samplers that take it, ``rtol`` instead of steps for the adaptive
  ``"ode"``). Counted twice: ``jitted._cache_size()`` and JAX's
  ``/jax/core/compile/backend_compile_duration`` monitoring events. The train step is checked
  the same way over several steps.
* Network initialisation: ``create_train_state`` as the library runs it (eager Flax ``init``,
  one dispatch per operation) against the same function under ``jax.jit``, fresh processes.

Commands (from the repository root)::

    python bench/compile_cost.py              # first sample / step / init: digits (+ cifar_small step); counts: tiny
    python bench/compile_cost.py --quick      # tiny sample, digits step at batch 32, fewer grid points
    python bench/compile_cost.py --networks digits_x10,cifar_small   # the train-step networks of BENCHMARKS.md

Writes ``bench/results/compile_cost.json``.
"""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys
import time

import bench_utils as bu
import networks as nets

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def _conditional_setup(name: str, batch: int):
    """A class-conditional network of bench/networks.py, its parameters, ``batch`` labels, the sample shape."""
    import jax
    import jax.numpy as jnp

    import jaxdiff

    net = nets.get(name)
    if net.num_classes is None:
        raise ValueError(f"network {name!r} is not class-conditional")
    model = nets.build(net)
    params = model.init(jax.random.key(0), jnp.zeros((1, *net.image_shape)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    labels = jnp.arange(batch, dtype=jnp.int32) % net.num_classes
    return model, params, labels, (batch, *net.image_shape), jaxdiff.linear_schedule(1000)


def make_generate(model, schedule, shape, sampler: str):
    """``jit(generate)(params, key, labels, steps_or_rtol, eta, w)``: every knob a runtime argument."""
    import jax

    from jaxdiff import guidance, samplers

    spec = samplers.SAMPLERS[sampler]
    takes_eta = "eta" in spec.options
    adaptive = spec.adaptive

    @jax.jit
    def generate(params, key, labels, knob, eta, w):
        net = lambda x, t, y: model.apply({"params": params}, x, t, y, train=False)
        fn = guidance.classifier_free_guidance(net, labels, null_label=model.num_classes, guidance_scale=w)
        kw = {"eta": eta} if takes_eta else {}
        if adaptive:
            kw.update(rtol=knob, atol=knob)
        else:
            kw["num_steps"] = knob
        return samplers.sample(schedule, fn, key, shape, sampler=sampler, **kw)

    return generate, takes_eta, adaptive


# --------------------------------------------------------------------------- child processes
def child_first_sample(name: str, batch: int, num_steps: int) -> dict:
    import jax

    t_start = time.perf_counter()
    model, params, labels, shape, schedule = _conditional_setup(name, batch)
    gen, _, _ = make_generate(model, schedule, shape, "ddim")
    key = jax.random.key(0)
    t0 = time.perf_counter()
    setup = t0 - t_start
    gen(params, key, labels, num_steps, 0.0, 2.0).block_until_ready()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        gen(params, key, labels, num_steps, 0.0, 2.0).block_until_ready()
        runs.append(time.perf_counter() - t0)
    return {"what": f"first DDIM sample ({num_steps} steps, batch {batch}, guidance 2, {name} network)",
            "setup_s": setup, "first_call_s": first, "steady_s": statistics.median(runs),
            "compile_s": first - statistics.median(runs)}


def child_first_step(name: str, batch: int) -> dict:
    run, info = nets.jax_train_step(nets.get(name), batch)  # create_train_state, then lower + compile the step
    t1 = time.perf_counter()
    run(1)
    first_exec = time.perf_counter() - t1
    runs = []
    for _ in range(3):
        t2 = time.perf_counter()
        run(1)
        runs.append(time.perf_counter() - t2)
    return {"what": f"first train step ({name} network, batch {batch})", "setup_s": info["init_s"],
            "compile_s": info["compile_s"], "first_call_s": info["compile_s"] + first_exec,
            "steady_s": statistics.median(runs)}


def child_init(name: str, mode: str) -> dict:
    """Time of ``create_train_state`` as the library runs it (eager Flax init, op by op) or under ``jax.jit``."""
    import jax

    from jaxdiff.training.state import make_optimizer

    net = nets.get(name)
    model = nets.build(net)
    tx = make_optimizer(2e-4, warmup_steps=0, grad_clip=1.0)
    fn = nets.init_train_state if mode == "eager" else jax.jit(nets.init_train_state, static_argnums=(0, 1, 2, 3))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model, tx, net.image_shape, net.num_classes, jax.random.key(0)))
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model, tx, net.image_shape, net.num_classes, jax.random.key(1)))
    return {"what": f"create_train_state, {mode} ({name} network)", "first_s": first,
            "second_s": time.perf_counter() - t0}


def run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- recompilation counts
def count_recompiles(name: str, batch: int, quick: bool) -> dict:
    import jax

    from jaxdiff import samplers

    events: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.append(event) if event == COMPILE_EVENT else None)
    model, params, labels, shape, schedule = _conditional_setup(name, batch)
    key = jax.random.key(0)
    steps = (5, 10) if quick else (5, 10, 20, 50)
    etas = (0.0, 1.0) if quick else (0.0, 0.5, 1.0)
    ws = (1.0, 3.0) if quick else (1.0, 2.0, 4.0)
    rtols = (1e-2, 1e-3)
    out = {}
    for name in samplers.registry.names("diffusion"):  # the network here is an epsilon UNet
        gen, takes_eta, adaptive = make_generate(model, schedule, shape, name)
        knobs = rtols if adaptive else steps
        grid = list(itertools.product(knobs, etas if takes_eta else (0.0,), ws))
        before = len(events)
        t0 = time.perf_counter()
        gen(params, key, labels, *grid[0]).block_until_ready()
        first = len(events) - before
        for knob, eta, w in grid[1:]:
            gen(params, key, labels, knob, eta, w).block_until_ready()
        out[name] = {"calls": len(grid), "jit_cache_size": gen._cache_size(), "compiles_first_call": first,
                     "compiles_after_first": len(events) - before - first,
                     "varied": ("rtol" if adaptive else "num_steps") + (", eta" if takes_eta else "") + ", guidance",
                     "seconds": time.perf_counter() - t0}
        bu.eprint(f"  {name}: {out[name]}")
    return out


def count_train_recompiles(batch: int) -> dict:
    import jax

    events: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: events.append(event) if event == COMPILE_EVENT else None)
    from jaxdiff.training.state import make_optimizer

    net = nets.get("tiny")
    model = nets.build(net)
    tx = make_optimizer(2e-4, warmup_steps=10, grad_clip=1.0)
    state = nets.init_train_state(model, tx, net.image_shape, net.num_classes)
    step = jax.jit(nets.library_train_step(),
                   donate_argnums=(0,))
    batches = [nets.make_jax_batch(net, batch, seed=s) for s in range(5)]
    key = jax.random.key(1)
    before = len(events)
    state, m = step(state, batches[0], key)
    jax.block_until_ready(m)
    first = len(events) - before
    for b in batches[1:]:
        state, m = step(state, b, key)
    jax.block_until_ready(m)
    return {"calls": 5, "jit_cache_size": step._cache_size(), "compiles_first_call": first,
            "compiles_after_first": len(events) - before - first,
            "varied": "step counter, batch contents (warmup learning rate)"}


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "sample":
            res = child_first_sample(rest[0], int(rest[1]), int(rest[2]))
        elif kind == "init":
            res = child_init(rest[0], rest[1])
        else:
            res = child_first_step(rest[0], int(rest[1]))
        print(json.dumps(res))
        return
    p = bu.parser(__doc__)
    p.add_argument("--networks", default=None,
                   help="train-step / init networks of bench/networks.py (default digits,cifar_small; quick digits)")
    args = p.parse_args()
    sample_net = "tiny" if args.quick else "digits"
    step_nets = (args.networks or ("digits" if args.quick else "digits,cifar_small")).split(",")
    results = {"first": {}, "recompiles": {}}
    bu.eprint("time to first sample / step (fresh processes) ...")
    results["first"]["sample"] = run_child("sample", sample_net, 16, 50)
    for name in step_nets:
        batch = nets.get(name).batch
        results["first"][f"train_step_{name}"] = run_child("step", name, min(batch, 32) if args.quick else batch)
    results["init"] = {mode: run_child("init", step_nets[0], mode) for mode in ("eager", "jit")}
    bu.eprint("recompilations (tiny conditional network, batch 8) ...")
    results["recompiles"] = count_recompiles("tiny", 8, args.quick)
    results["recompiles"]["train_step"] = count_train_recompiles(8)

    rows = [[v["what"], v["setup_s"], v["compile_s"], v["first_call_s"], v["steady_s"]]
            for v in results["first"].values()]
    print("\n### Time to first result (fresh process)\n")
    print(bu.table(["what", "network init s", "compile s", "first call s", "later calls s"], rows))
    print("\n### Network initialisation (create_train_state), fresh process\n")
    print(bu.table(["what", "first call s", "second call s"],
                   [[v["what"], v["first_s"], v["second_s"]] for v in results["init"].values()]))
    rows = [[k, v["varied"], v["calls"], v["jit_cache_size"], v["compiles_first_call"], v["compiles_after_first"]]
            for k, v in results["recompiles"].items()]
    print("\n### Compilations while the knobs change (goal: none after the first call)\n")
    print(bu.table(["function", "varied", "calls", "jit cache entries", "compiles in 1st call",
                    "compiles after"], rows))
    bu.write_json("compile_cost", results, args.out)


if __name__ == "__main__":
    main()

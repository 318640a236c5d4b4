"""The cost of MeanFlow's jvp: its train step against flow matching's on the same network.

MeanFlow (``jaxdiff.objectives.MeanFlow``) differentiates the network forward (one ``jax.jvp`` with
tangent ``(v, 0, 1)``) inside the loss and then backward through it; flow matching
(``jaxdiff.objectives.FlowMatching``) runs the plain forward and backward. Both steps are the
library's ``train_step`` under ``jax.jit`` (``bench/networks.py``), timed alternately, medians
reported. Memory is XLA's scratch for one compiled step (``memory_analysis().temp_size_in_bytes``:
the peak beyond the train state and the batch). The issue's goal: <= 1.6x the time and <= 1.5x
the memory of the flow-matching step. ``dit_s_2`` is the DiT-S/2 block stack on 16x16x4 latents
(``bench/networks.py``; MeanFlow's second time input is the DiT's ``time_inputs=2``).

Commands (from the repository root)::

    python bench/jvp_cost.py                  # digits, cifar_small and dit_s_2, 5 rounds
    python bench/jvp_cost.py --quick          # smoke run
    python bench/jvp_cost.py --configs ddpm_cifar10 --conv-backward xla   # accelerators

Writes ``bench/results/jvp_cost.json``.
"""

from __future__ import annotations

import sys

import bench_utils as bu
import networks as nets
from networks import STEPS_PER_SAMPLE, jax_train_step


def main():
    p = bu.parser(__doc__)
    p.add_argument("--configs", default="digits,cifar_small,dit_s_2", help="networks of bench/networks.py")
    p.add_argument("--conv-backward", default="taps", choices=("taps", "xla"), help="the UNet's convolution rule")
    args = p.parse_args()
    from jaxdiff import objectives

    rounds = args.rounds or (2 if args.quick else 5)
    cases = {"flow_matching": objectives.FlowMatching(), "meanflow": objectives.MeanFlow()}
    rows, out = [], {"command": "python bench/jvp_cost.py " + " ".join(sys.argv[1:]), "results": {}}
    print(f"`{out['command'].strip()}`: {bu.cpu_model()}, {rounds} rounds, {STEPS_PER_SAMPLE} steps per timed call, "
          f"load {bu.load_average():.2f}\n")
    for name in args.configs.split(","):
        net = nets.get(name)
        batch = 8 if args.quick else net.batch
        runs, infos = {}, {}
        for label, obj in cases.items():
            bu.eprint(f"[{name}] compiling {label} ...")
            runs[label], infos[label] = jax_train_step(net, batch, conv_backward=args.conv_backward, objective=obj)
        timing = bu.alternate(runs, rounds)
        base = timing["flow_matching"]["median_s"]
        for label in cases:
            ms = 1e3 * timing[label]["median_s"] / STEPS_PER_SAMPLE
            rows.append([name, batch, label, ms, timing[label]["median_s"] / base, infos[label]["temp_bytes"] / 2**20,
                         infos[label]["temp_bytes"] / infos["flow_matching"]["temp_bytes"],
                         infos[label]["flops_per_step"] / infos["flow_matching"]["flops_per_step"]])
        out["results"][name] = {"batch": batch, "timing": timing, "info": infos}
    print(bu.table(["network", "batch", "objective", "ms/step", "x time", "scratch MiB", "x memory", "x FLOPs"], rows))
    bu.write_json("jvp_cost", out, args.out)


if __name__ == "__main__":
    main()

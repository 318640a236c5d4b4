"""FID Inception features per second: jaxdiff's ``load_inception`` callable against pytorch-fid.

Both networks get the same random weights (He-normal convolutions, identity BatchNorm statistics;
speed does not depend on the values) and the same batch of uint8 images, and do the whole
pipeline per batch: uint8 -> [0, 1], bilinear resize to 299x299, ``2x - 1``, Inception to pool3.

* jaxdiff: ``inception_from_state_dict(weights, batch_size=B)(images)`` (host uint8 in, host
  float32 ``[B, 2048]`` out; compiled once, before timing).
* pytorch-fid: ``InceptionV3([3])`` in eval mode under ``torch.no_grad()`` on
  ``torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255``, at each ``--torch-threads`` count.

Each timed sample is one batch; cases alternate A B A B; medians. A batch of 200 299x299 images
is ~1.1 TFLOP, so on a small CPU machine each sample takes tens of seconds: the default is 3
rounds (``--rounds``). Also reports the two networks' max relative feature difference.

Commands (from the repository root; pytorch-fid and torch must be importable)::

    python bench/inception_speed.py               # batch 200 of 32x32 images, 3 rounds
    python bench/inception_speed.py --quick       # batch 8, 2 rounds

Writes ``bench/results/inception_speed.json``.
"""

from __future__ import annotations

import numpy as np

import bench_utils as bu


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """pytorch-fid's key names and shapes (fc included), random convolutions, identity BatchNorm."""
    from jaxdiff.metrics.inception import OPTIONAL_SHAPES, expected_state_dict_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in {**expected_state_dict_shapes(), **OPTIONAL_SHAPES}.items():
        if key.endswith("conv.weight") or key == "fc.weight":
            fan_in = int(np.prod(shape[1:]))
            out[key] = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif key.endswith(("bn.weight", "running_var")):
            out[key] = np.ones(shape, np.float32)
        else:
            out[key] = np.zeros(shape, np.float32)
    return out


def pytorch_fid_model(state: dict[str, np.ndarray]):
    """pytorch-fid's ``InceptionV3([3])`` loaded with ``state`` (its loader is handed the dict)."""
    torch = bu.quiet_torch()
    from pytorch_fid import inception as pfi

    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    pfi.load_state_dict_from_url = lambda *args, **kwargs: tensors
    return pfi.InceptionV3([3]).eval()


def main() -> None:
    p = bu.parser(__doc__)
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 200; --quick: 8)")
    p.add_argument("--size", type=int, default=32, help="input image height = width")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    batch = args.batch or (8 if args.quick else 200)
    rounds = args.rounds or (2 if args.quick else 3)

    from jaxdiff.metrics import inception_from_state_dict

    torch = bu.quiet_torch()
    state = random_state_dict()
    images = np.random.default_rng(1).integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
    jax_net = inception_from_state_dict(state, batch_size=batch)
    torch_net = pytorch_fid_model(state)

    def torch_features():
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            return torch_net(x)[0][:, :, 0, 0].numpy()

    cases = {"jaxdiff": lambda: jax_net(images)}
    threads = bu.torch_thread_counts(args.torch_threads)
    for n in threads:
        cases[f"pytorch-fid ({n} threads)"] = bu.with_threads(torch_features, n)

    ref = torch_features()
    got = jax_net(images)
    max_rel = float(np.abs(got - ref).max() / np.abs(ref).max())

    bu.eprint(f"timing {list(cases)}: batch {batch}, {rounds} rounds (one batch per sample)")
    stats = bu.alternate(cases, rounds=rounds, iters=1, warmup=0)  # the parity run above warmed up
    best_torch = min(v["median_s"] for k, v in stats.items() if k != "jaxdiff")
    rows, results = [], {}
    for name, s in stats.items():
        rate = batch / s["median_s"]
        ratio = best_torch / s["median_s"]
        rows.append([name, s["median_s"], s["min_s"], rate, ratio])
        results[name] = {**s, "images_per_s": rate, "speed_vs_best_pytorch_fid": ratio}
    print(f"\nInception pool3 features, batch {batch} of {args.size}x{args.size} uint8 images, "
          f"median of {rounds} alternating rounds; max relative feature difference {max_rel:.2e}")
    print(bu.table(["case", "median s/batch", "min s/batch", "images/s", "x best pytorch-fid"], rows))
    bu.write_json("inception_speed", {
        "question": "FID Inception features per second, jaxdiff vs pytorch-fid (same weights, same images)",
        "batch": batch, "image_size": args.size, "rounds": rounds, "torch": torch.__version__,
        "torch_threads": list(threads), "max_rel_feature_difference": max_rel, "results": results,
    }, args.out)


if __name__ == "__main__":
    main()

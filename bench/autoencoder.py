"""The Stable Diffusion autoencoder's encode and decode: jaxdiff (``jax.jit``) against diffusers'
``AutoencoderKL`` (PyTorch, ``torch.no_grad``) on the same random weights.

The network is an SD-like ``AutoencoderKL`` shrunk to CPU size (``--channels``, default
32-64-128-128, 2 resnet blocks a level, 32 norm groups, 4 latent channels, f = 8) on 64x64 images,
batch 2. diffusers builds it with random weights, saves the folder, and
``jaxdiff.models.from_diffusers`` loads that folder, so both sides hold the same tensors (the
script checks the outputs agree before timing). Encode maps images to the posterior's
``(mean, logvar)``; decode maps latents to images. The cases alternate (jaxdiff encode, torch
encode, jaxdiff decode, torch decode, ...) after one warm-up call each, medians reported;
PyTorch runs at its default thread count and at 1 thread, and the ratio is against the faster.
"speed vs torch" is torch's time over jaxdiff's (the goal: >= 0.75). Without torch and
diffusers (or with ``--no-torch``, e.g. on an accelerator) jaxdiff alone is timed, on weights from
``init``.

Commands (from the repository root, with a Python that has jax, torch and diffusers)::

    python bench/autoencoder.py               # 64x64, batch 2, 7 rounds
    python bench/autoencoder.py --quick       # smoke run

Writes ``bench/results/autoencoder.json``.
"""

from __future__ import annotations

import math
import sys
import tempfile

import numpy as np

import bench_utils as bu


def torch_vae(channels: tuple[int, ...], layers: int, seed: int = 0):
    """diffusers' ``AutoencoderKL`` with every parameter random (norm scales around 1)."""
    torch = bu.quiet_torch()
    from diffusers import AutoencoderKL

    levels = len(channels)
    model = AutoencoderKL(block_out_channels=channels, layers_per_block=layers, latent_channels=4,
                          norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * levels,
                          up_block_types=("UpDecoderBlock2D",) * levels).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=gen)
            p.copy_(z / math.sqrt(math.prod(p.shape[1:])) if p.ndim >= 2 else
                    (1.0 + 0.3 * z if "norm" in name and name.endswith("weight") else 0.3 * z))
    return model


def main():
    p = bu.parser(__doc__)
    p.add_argument("--channels", default="32,64,128,128", help="block_out_channels")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--size", type=int, default=64, help="image height and width")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--no-torch", action="store_true", help="jaxdiff only")
    bu.add_torch_threads_option(p)
    args = p.parse_args()
    import jax

    from jaxdiff.models import AutoencoderKL, from_diffusers

    rounds = args.rounds or (2 if args.quick else 7)
    channels = tuple(int(c) for c in args.channels.split(","))
    size = 32 if args.quick else args.size
    with_torch = not args.no_torch and bu.have_torch()
    threads = bu.torch_thread_counts(args.torch_threads) if with_torch else ()
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype(np.float32)
    if with_torch:
        tmodel = torch_vae(channels, args.layers)
        with tempfile.TemporaryDirectory() as folder:
            tmodel.save_pretrained(folder, safe_serialization=True)
            vae, params = from_diffusers(folder)
    else:
        vae = AutoencoderKL(block_out_channels=channels, layers_per_block=args.layers)
        params = jax.jit(vae.init)(jax.random.key(0), x)["params"]
    f = vae.downsample_factor
    z = rng.standard_normal((args.batch, size // f, size // f, 4)).astype(np.float32)
    jx, jz = jax.device_put(x), jax.device_put(z)
    j_encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode))
    j_decode = jax.jit(lambda p, z: vae.apply({"params": p}, z, method=vae.decode))
    cases = {"jaxdiff encode": lambda: bu.block(j_encode(params, jx)),
             "jaxdiff decode": lambda: bu.block(j_decode(params, jz))}
    parity = {}
    if with_torch:
        parity = torch_cases(cases, tmodel, threads, x, z, j_encode(params, jx), j_decode(params, jz))
    command = "python bench/autoencoder.py " + " ".join(sys.argv[1:])
    torch_line = "no torch"
    if threads:
        torch_line = f"torch {bu.quiet_torch().__version__} (threads {', '.join(map(str, threads))})"
    print(f"`{command.strip()}`: {bu.cpu_model()}, jax {jax.__version__} ({jax.default_backend()}), {torch_line}; "
          f"AutoencoderKL {channels} x {args.layers} blocks, {size}x{size}, batch {args.batch}; {rounds} rounds; "
          f"load {bu.load_average():.2f}\n")
    bu.eprint("timing ...")
    timing = bu.alternate(cases, rounds)
    rows = []
    for op in ("encode", "decode"):
        jt = timing[f"jaxdiff {op}"]["median_s"]
        torch_ms = [1e3 * timing[f"torch {op} {n}T"]["median_s"] for n in threads]
        speed = min(torch_ms) / (1e3 * jt) if threads else float("nan")
        err = parity.get("decode") if op == "decode" else max(parity.get("encode_mean", np.nan),
                                                               parity.get("encode_logvar", np.nan))
        rows.append([op, 1e3 * jt, *torch_ms, speed, float("nan") if err is None else err])
    print(bu.table(["op", "jaxdiff ms", *(f"torch {n}T ms" for n in threads), "speed vs torch", "max rel err"], rows))
    bu.write_json("autoencoder", {
        "command": command, "channels": channels, "layers_per_block": args.layers, "size": size,
        "batch": args.batch, "rounds": rounds, "torch_threads": list(threads), "parity": parity, "timing": timing,
        "speed_vs_torch": {r[0]: r[-2] for r in rows},
    }, args.out)


def torch_cases(cases: dict, tmodel, threads, x, z, encoded, decoded) -> dict:
    """Adds the torch cases to ``cases``; returns jaxdiff's max relative errors against torch (same weights)."""
    torch = bu.quiet_torch()
    tx, tz = (torch.from_numpy(a.transpose(0, 3, 1, 2).copy()) for a in (x, z))

    def t_encode():
        with torch.no_grad():
            d = tmodel.encode(tx).latent_dist
            return d.mean, d.logvar

    def t_decode():
        with torch.no_grad():
            return tmodel.decode(tz).sample

    # Same weights, same outputs (max relative error), before anything is timed.
    (mean, logvar), out = encoded, decoded
    tm, tl = t_encode()
    to = t_decode()
    nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
    rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))
    parity = {"encode_mean": rel(mean, nhwc(tm)), "encode_logvar": rel(logvar, nhwc(tl)),
              "decode": rel(out, nhwc(to))}

    for op, tfn in (("encode", t_encode), ("decode", t_decode)):
        for n in threads:
            cases[f"torch {op} {n}T"] = bu.with_threads(tfn, n)
    return parity


if __name__ == "__main__":
    main()

"""Convolution weight gradient on XLA:CPU: XLA's own against the matmul layouts of
``jaxdiff.models.conv`` (``UNet(conv_backward="taps")``), on the UNet's 3x3 shapes.

Cases, each timed alone (jit, alternating rounds, medians), for ``x [B, H, W, C]`` and
``dy [B, H, W, D]``:

- ``xla``: the weight gradient of ``lax.conv_general_dilated`` (what ``conv_backward="xla"`` runs);
- ``per tap``: one ``[C, BHW] @ [BHW, D]`` matmul per kernel tap, slicing dy (padded by the kernel);
- ``per column``: one matmul per kernel column, the three row shifts of dy side by side
  (``[C, BHW] @ [BHW, 3D]``);
- ``library``: what ``jaxdiff.models.conv`` picks (per tap when ``C >= 3 D``, else per column).

Also the forward convolution alone, for scale. The shapes are the 3x3 convolutions of
``cifar_small`` (bench/networks.py) at batch 16, and the decoder's concatenated inputs.

    python bench/conv_backward.py [--quick] [--rounds N]

Writes ``bench/results/conv_backward.json``.
"""

from __future__ import annotations

import numpy as np

import bench_utils as bu

SHAPES = [  # (B, H, C, D)
    (16, 32, 32, 32), (16, 32, 96, 32), (16, 32, 64, 32), (16, 16, 64, 64), (16, 16, 128, 64),
    (16, 8, 64, 64), (16, 8, 128, 64),
]
DN = ("NHWC", "HWIO", "NHWC")


def weight_grads():
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxdiff.models.conv import conv_general_dilated

    contract = (((0,), (0,)), ((), ()))

    def xla(x, dy):
        w0 = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
        return jax.vjp(lambda w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), w0)[1](dy)[0]

    def per_tap(x, dy):
        _, h, w, c = x.shape
        d = dy.shape[-1]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)
        dyp = jnp.pad(dy, ((0, 0), (2, 2), (2, 2), (0, 0)))
        taps = [lax.dot_general(xp, dyp[:, 2 - i:4 - i + h, 2 - j:4 - j + w].reshape(-1, d), contract)
                for i in range(3) for j in range(3)]
        return jnp.stack(taps).reshape(3, 3, c, d)

    def per_column(x, dy):
        _, h, w, c = x.shape
        d = dy.shape[-1]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        rows = jnp.concatenate([jnp.pad(dy, ((0, 0), (i, 2 - i), (0, 0), (0, 0))) for i in range(3)], -1)
        cols = [lax.dot_general(xp[:, :, j:j + w].reshape(-1, c), rows.reshape(-1, 3 * d), contract).reshape(c, 3, d)
                for j in range(3)]
        return jnp.stack(cols).transpose(2, 0, 1, 3)

    def library(x, dy):
        w0 = jnp.zeros((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
        return jax.vjp(lambda w: conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN), w0)[1](dy)[0]

    def forward(x, dy):
        w0 = jnp.ones((3, 3, x.shape[-1], dy.shape[-1]), x.dtype)
        return lax.conv_general_dilated(x, w0, (1, 1), "SAME", dimension_numbers=DN)

    return {"xla": xla, "per tap": per_tap, "per column": per_column, "library": library, "forward": forward}


def main():
    p = bu.parser(__doc__)
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 7)
    import jax

    fns = weight_grads()
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows, results = [], {"rounds": rounds, "shapes": {}}
    rng = np.random.default_rng(0)
    for b, h, c, d in shapes:
        x = jax.numpy.asarray(rng.standard_normal((b, h, h, c)).astype(np.float32))
        dy = jax.numpy.asarray(rng.standard_normal((b, h, h, d)).astype(np.float32))
        ref = np.asarray(fns["xla"](x, dy), np.float64)
        cases = {}
        for name, fn in fns.items():
            jf = jax.jit(fn)
            if name != "forward":  # every layout computes the same gradient
                np.testing.assert_allclose(np.asarray(jf(x, dy)), ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
            cases[name] = lambda jf=jf, x=x, dy=dy: jax.block_until_ready(jf(x, dy))
        bu.eprint(f"[{(b, h, c, d)}] timing {list(cases)} x {rounds} rounds (alternating)")
        timing = bu.alternate(cases, rounds=rounds, iters=5)
        flops = 2.0 * b * h * h * 9 * c * d
        results["shapes"][str((b, h, c, d))] = {
            k: {**v, "gflops": flops / v["median_s"] / 1e9} for k, v in timing.items()}
        base = timing["xla"]["median_s"]
        rows.append([f"[{b}, {h}, {h}, {c}] -> {d}"]
                    + [f"{timing[k]['median_s'] * 1e3:.2f} ({flops / timing[k]['median_s'] / 1e9:.0f})" for k in fns]
                    + [base / timing["library"]["median_s"]])
    print("\n### 3x3 convolution weight gradient, ms (GFLOP/s)\n")
    print(bu.table(["x -> D"] + list(fns) + ["library speed-up"], rows))
    bu.write_json("conv_backward", results, args.out)


if __name__ == "__main__":
    main()

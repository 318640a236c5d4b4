"""A convolution whose weight gradient is written as one matmul per kernel tap.

XLA:CPU runs the forward convolution and the input gradient (itself a forward convolution) at
about 110 GFLOP/s on this project's 2-core machines, but the weight gradient of a 3x3
convolution at about 30. The weight gradient of a stride-1 convolution is a sum over kernel
taps: for tap ``(i, j)``,

    dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j, :]^T dy[b, h, w, :]      # [C_in, C_out]

that is one ``[C_in, B H W] @ [B H W, C_out]`` matmul per tap, which XLA:CPU runs at matmul
speed. :func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (it is passed
to ``flax.linen.Conv(conv_general_dilated=...)``), computes the same forward pass, and swaps
in that weight gradient for stride-1, undilated, ungrouped NHWC/HWIO convolutions; every other
convolution is ``lax.conv_general_dilated`` itself. The UNet uses it on the CPU
(``UNet.conv_backward``); accelerators keep their own convolution kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["CONV_BACKWARDS", "conv_for", "conv_general_dilated"]

# UNet.conv_backward values: "auto" picks "taps" on the CPU backend and "xla" elsewhere.
CONV_BACKWARDS = ("auto", "xla", "taps")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _unit(v) -> bool:
    return v is None or all(int(s) == 1 for s in v)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_taps(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


def _conv_taps_fwd(x, w, padding):
    return _conv_taps(x, w, padding), (x, w)


def _conv_taps_bwd(padding, res, dy):
    x, w = res
    kh, kw, c_in, c_out = w.shape
    (top, bottom), (left, right) = padding
    # Input gradient: the forward convolution of dy with the flipped, transposed kernel.
    dx = lax.conv_general_dilated(
        dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1),
        ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)), dimension_numbers=_NHWC,
    )
    # Weight gradient: dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j]^T dy[b, h, w], as matmuls
    # over the B*H*W positions. Each matmul reads a shifted window of one operand, which XLA
    # copies; which layout copies least was measured (bench/conv_backward.py):
    ho, wo = dy.shape[1:3]
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
    hp, wp = xp.shape[1:3]
    contract = (((0,), (0,)), ((), ()))
    if c_in >= 3 * c_out:
        # Wide input: shift dy (padded by the kernel size) instead, one matmul per tap:
        # dW[i, j] = sum_p x_pad[p]^T dy[p - (i, j)].
        dyp = lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (kh - 1, kh - 1, 0), (kw - 1, kw - 1, 0), (0, 0, 0)))
        x2 = xp.reshape(-1, c_in)
        taps = [
            lax.dot_general(x2, dyp[:, kh - 1 - i:kh - 1 - i + hp, kw - 1 - j:kw - 1 - j + wp].reshape(-1, c_out),
                            contract)
            for i in range(kh) for j in range(kw)
        ]
        dw = jnp.stack(taps).reshape(kh, kw, c_in, c_out)
    else:
        # One matmul per kernel column j: x_pad shifted by j columns against the kh row-shifts of
        # dy side by side (dy_rows[b, p, w, (i, d)] = dy[b, p - i, w, d]), giving every row i at once.
        dy_rows = jnp.concatenate(
            [lax.pad(dy, jnp.zeros((), dy.dtype), ((0, 0, 0), (i, kh - 1 - i, 0), (0, 0, 0), (0, 0, 0)))
             for i in range(kh)], axis=-1).reshape(-1, kh * c_out)
        cols = [lax.dot_general(xp[:, :, j:j + wo].reshape(-1, c_in), dy_rows, contract).reshape(c_in, kh, c_out)
                for j in range(kw)]
        dw = jnp.stack(cols).transpose(2, 0, 1, 3)  # [kw, C_in, kh, C_out] -> [kh, kw, C_in, C_out]
    dw = dw.astype(w.dtype)
    return dx.astype(x.dtype), dw


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments, same values) with the per-tap weight gradient.

    Used when the convolution is 2-D, NHWC/HWIO, stride 1, undilated and ungrouped, with the
    default precision and result type (``lhs: [B, H, W, C_in]``, ``rhs: [KH, KW, C_in, C_out]``
    -> ``[B, H', W', C_out]``); otherwise this is ``lax.conv_general_dilated``.
    """
    simple = (
        _is_nhwc(dimension_numbers, lhs.ndim) and _unit(window_strides) and _unit(lhs_dilation)
        and _unit(rhs_dilation) and feature_group_count == 1 and batch_group_count == 1
        and precision is None and preferred_element_type is None
    )
    if not simple:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv_taps(lhs, rhs, pads)


def conv_for(conv_backward: str):
    """The ``conv_general_dilated`` for ``UNet.conv_backward`` (None means ``lax``'s)."""
    if conv_backward not in CONV_BACKWARDS:
        raise ValueError(f"conv_backward must be one of {CONV_BACKWARDS}, got {conv_backward!r}")
    if conv_backward == "auto":
        conv_backward = "taps" if jax.default_backend() == "cpu" else "xla"
    return conv_general_dilated if conv_backward == "taps" else None

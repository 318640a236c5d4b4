"""A convolution whose weight gradient is computed with matmuls.

XLA:CPU runs a 3x3 convolution's forward pass and input gradient (itself a forward
convolution) at 40-65 GFLOP/s on this project's 2-core machines, but the weight gradient at
17-21 (bench/conv_backward.py). The weight gradient of a stride-1 convolution is a sum over
kernel taps: for tap ``(i, j)``,

    dW[i, j] = sum_{b, h, w} x_pad[b, h + i, w + j, :]^T dy[b, h, w, :]      # [C_in, C_out]

that is ``[C_in, B H W] @ [B H W, C_out]`` matmuls, which XLA:CPU runs at matmul speed (grouped
per kernel column, 1.8-2.7x faster than its own on the UNet's larger shapes).
:func:`conv_general_dilated` has ``lax.conv_general_dilated``'s signature (it is passed to
``flax.linen.Conv(conv_general_dilated=...)``) and computes the same values. For stride-1,
undilated, ungrouped NHWC/HWIO convolutions it carries a JVP rule whose tangent in the kernel
is the convolution written as matmuls, so reverse mode transposes it into the matmul weight
gradient, while forward mode (``jax.jvp``) keeps working; every other convolution is
``lax.conv_general_dilated`` itself.

The UNet uses XLA's convolution unless told otherwise: ``UNet(conv_backward="taps")`` selects this
one. Nothing here asks which backend runs; choosing ``"taps"`` for XLA:CPU is the training
setup's decision (accelerators keep their own kernels, ``"xla"``).

When to remove it: once XLA:CPU's own weight gradient is within 10% of this matmul form on
every shape ``bench/conv_backward.py`` times (its ``xla`` and ``taps`` rows), drop this module
and ``CONV_BACKWARDS`` with it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

__all__ = ["CONV_BACKWARDS", "conv_for", "conv_general_dilated"]

#: ``UNet.conv_backward`` values: ``"xla"`` (the default) differentiates ``lax.conv_general_dilated``
#: as XLA does; ``"taps"`` uses :func:`conv_general_dilated` (the matmul weight gradient, faster
#: on XLA:CPU, bench/conv_backward.py).
CONV_BACKWARDS = ("xla", "taps")

_NHWC = ("NHWC", "HWIO", "NHWC")


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
    if ndim != 4 or dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _unit(v) -> bool:
    return v is None or all(int(s) == 1 for s in v)


def _conv(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC)


def _pad_hw(a: jax.Array, hpad: tuple[int, int], wpad: tuple[int, int]) -> jax.Array:
    return lax.pad(a, jnp.zeros((), a.dtype), ((0, 0, 0), (*hpad, 0), (*wpad, 0), (0, 0, 0)))


@partial(jax.checkpoint, static_argnums=(2,))
def _conv_by_matmuls(x: jax.Array, w: jax.Array, padding) -> jax.Array:
    """``conv(x, w)`` written as matmuls, so that its transpose in ``w`` (the weight gradient) is too.

    Checkpointed: the reverse pass keeps ``x`` and recomputes the shifted copies it needs. The
    layout was chosen by measuring the weight gradient it transposes into (bench/conv_backward.py):
    """
    kh, kw, c_in, c_out = w.shape
    xp = _pad_hw(x, *padding)
    b, hp, wp, _ = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    y = None
    if c_in >= 3 * c_out:
        # Wide input, one matmul per tap over the padded positions: z_ij = x_pad @ w[i, j] and
        # y[h, w] = sum_ij z_ij[h + i, w + j]; the transpose shifts dy (the smaller copies).
        x2 = xp.reshape(-1, c_in)
        for i in range(kh):
            for j in range(kw):
                z = (x2 @ w[i, j]).reshape(b, hp, wp, c_out)[:, i:i + ho, j:j + wo]
                y = z if y is None else y + z
        return y
    # One matmul per kernel column j against the kh rows side by side:
    # z_j[b, p, w, (i, d)] = x_pad[b, p, w + j] @ w[i, j] and y[h] = sum_{i, j} z_j[h + i, ..., i, :];
    # the transpose is x_pad[:, :, j:j+wo]^T @ (the kh row-shifts of dy, side by side).
    for j in range(kw):
        xs = xp[:, :, j:j + wo].reshape(-1, c_in)
        z = (xs @ w[:, j].transpose(1, 0, 2).reshape(c_in, kh * c_out)).reshape(b, hp, wo, kh, c_out)
        for i in range(kh):
            y = z[:, i:i + ho, :, i] if y is None else y + z[:, i:i + ho, :, i]
    return y


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_taps(x: jax.Array, w: jax.Array, padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    return _conv(x, w, padding)


@partial(_conv_taps.defjvp, symbolic_zeros=True)
def _conv_taps_jvp(padding, primals, tangents):
    # A JVP rule (not a VJP rule), so forward-mode users (jax.jvp, ode_nll's divergence) work too:
    # the tangent in x goes through XLA's convolution (its transpose, the input gradient, is XLA's);
    # the tangent in w through the matmul form, whose transpose is the fast weight gradient.
    x, w = primals
    dx, dw = tangents
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_conv(dx, w, padding))
    if not isinstance(dw, SymbolicZero):
        terms.append(_conv_by_matmuls(x, dw, padding).astype(x.dtype))
    y = _conv(x, w, padding)
    if not terms:
        return y, jnp.zeros_like(y)
    return y, terms[0] if len(terms) == 1 else terms[0] + terms[1]


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
    """The ``conv_general_dilated`` for ``UNet.conv_backward`` in :data:`CONV_BACKWARDS` (None means ``lax``'s)."""
    if conv_backward not in CONV_BACKWARDS:
        raise ValueError(f"conv_backward must be one of {CONV_BACKWARDS}, got {conv_backward!r}")
    return conv_general_dilated if conv_backward == "taps" else None

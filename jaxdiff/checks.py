"""Checks of argument *values* at the library's boundary, shared by every module that takes them.

Shape and dtype checks are free under ``jax.jit`` and live next to the functions that need them
(e.g. :func:`jaxdiff.diffusion.check_t`). The checks here look at values, so they run only when
the value is concrete (a Python number, a NumPy array, or a JAX array outside any transformation):
a traced value passes through, and the function that takes it documents what it does with a bad
one. Each raises ``ValueError`` naming the argument and what was seen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_concrete", "concrete_value", "check_key", "as_float_array", "check_finite", "check_int_range",
           "check_nonnegative", "check_shape", "check_callable", "shape_checked", "check_data", "layout_hint"]


def is_concrete(x) -> bool:
    """``True`` unless ``x`` is (or holds) a tracer of a JAX transformation."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(x))


def concrete_value(x):
    """``x`` as a NumPy array if it is concrete, else ``None`` (a traced value cannot be inspected)."""
    if x is None or not is_concrete(x):
        return None
    try:
        return np.asarray(x)
    except (TypeError, ValueError):
        return None


def check_key(key, name: str = "key"):
    """``key`` must be a PRNG key: a typed key (``jax.random.key``) of shape ``()`` or a legacy
    ``uint32 [2]`` key (``jax.random.PRNGKey``). Works on tracers (it looks at dtype and shape only)."""
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"{name} must be a single PRNG key, got a key array of shape {shape} "
                             f"(vmap over keys for independent chains)")
        return key
    if dtype is not None and dtype == jnp.uint32 and shape == (2,):
        return key
    seen = f"{type(key).__name__} {key!r}" if dtype is None else f"an array of dtype {dtype} and shape {shape}"
    raise ValueError(f"{name} must be a PRNG key (e.g. jax.random.key(0)), got {seen}")


def as_float_array(x, name: str) -> jax.Array:
    """``x`` (an array or a nested list of numbers) as a floating JAX array, or ``ValueError`` naming ``name``."""
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be an array of floats, got {type(x).__name__}: {error}") from None
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.integer) and not isinstance(x, jax.Array) and not isinstance(x, np.ndarray):
            return arr.astype(jnp.float32)  # a list of Python numbers
        raise ValueError(f"{name} must be a floating array, got dtype {arr.dtype}")
    return arr


def check_finite(x, name: str):
    """A concrete ``x`` must be finite everywhere (traced values pass)."""
    v = concrete_value(x)
    if v is not None and np.issubdtype(v.dtype, np.number) and not np.all(np.isfinite(v)):
        bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
        raise ValueError(f"{name} must be finite, got {bad} non-finite value(s) (NaN or inf) of {np.size(v)}")
    return x


def check_int_range(x, name: str, low: int, high: int, what: str = ""):
    """A concrete ``x`` must lie in ``[low, high]`` (traced values pass). ``what`` explains the range."""
    v = concrete_value(x)
    if v is None or v.size == 0:
        return x
    lo, hi = v.min(), v.max()
    if lo < low or hi > high:
        seen = lo if lo < low else hi
        raise ValueError(f"{name} must lie in [{low}, {high}]{what}, got {seen.item()!r}")
    return x


def check_nonnegative(x, name: str, *, strict: bool = False):
    """A concrete ``x`` must be ``>= 0`` (``> 0`` with ``strict``); traced values pass."""
    v = concrete_value(x)
    if v is not None and v.size and (np.any(v <= 0) if strict else np.any(v < 0)):
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {v.min().item()!r}")
    return x


def check_shape(shape, name: str = "shape") -> tuple[int, ...]:
    """A static sample shape ``(B, ...)``: a tuple of at least 2 positive ints, the batch axis first."""
    example = "e.g. (64, 2) for 64 samples of 2-D data, (16, 32, 32, 3) for 16 RGB images"
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"{name} must be a tuple (B, ...) of positive ints ({example}), got {shape!r}") from None
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in dims):
        raise ValueError(f"{name} must be a tuple (B, ...) of positive ints ({example}), got {shape!r}")
    if len(dims) < 2:
        raise ValueError(f"{name} must be (B, ...) with the batch axis first and at least 2 entries ({example}), "
                         f"got {shape!r}")
    if min(dims) < 1:
        raise ValueError(f"{name} must hold positive ints, got {shape!r}")
    return tuple(int(s) for s in dims)


def check_callable(fn, name: str):
    """``fn`` must be callable (a function ``f(x, t)``): ``TypeError`` naming ``name`` otherwise."""
    if not callable(fn):
        raise TypeError(f"{name} must be a callable f(x, t) -> prediction, got {type(fn).__name__} {fn!r}")
    return fn


def shape_checked(fn, name: str, channels: int = 1):
    """``fn(x, t, ...)`` that raises ``ValueError`` naming ``name`` unless its output has the shape of ``x``.

    ``channels``: the output's last axis is ``channels`` times that of ``x`` (2: a learned variance).
    The check looks at static shapes, so it costs nothing under ``jit``.
    """

    def checked(x, t, *args):
        out = fn(x, t, *args)
        want = tuple(x.shape[:-1]) + (channels * x.shape[-1],)
        if tuple(jnp.shape(out)) != want:
            raise ValueError(f"{name} returned shape {tuple(jnp.shape(out))} for an input of shape {tuple(x.shape)}; "
                             f"it must return {want}")
        return out

    return checked


def layout_hint(shape) -> str:
    """A hint for what looks like an NCHW batch (axis 1 of size 1 or 3, a large last axis), else ``""``.

    Appended to the messages about image sizes and channels: every image in the library is NHWC.
    """
    shape = tuple(shape)
    if len(shape) == 4 and shape[1] in (1, 3) and shape[3] > 4:
        return (f"; images are NHWC [B, H, W, C], and shape {shape} looks like NCHW: "
                f"pass x.transpose(0, 2, 3, 1)")
    return ""


def check_data(x, name: str = "x0") -> jax.Array:
    """Training data ``x`` as a float array (:func:`as_float_array`), refusing what looks like ``[0, 255]`` images.

    Float data are taken as they are (float64 becomes float32 unless ``jax_enable_x64`` is on, as
    everywhere in JAX). A concrete batch of images ``[B, H, W, C]`` whose values are all ``>= 0``
    and reach above 1.5 is the pixels of image files, not data scaled to ``[-1, 1]``: ``ValueError``
    naming ``name`` (traced values pass). Integer arrays (uint8 pixels) are refused by
    :func:`as_float_array`.
    """
    if getattr(x, "dtype", None) is not None and np.issubdtype(np.dtype(x.dtype), np.integer) and jnp.ndim(x) == 4:
        raise ValueError(f"{name} must be float images in [-1, 1], got dtype {np.dtype(x.dtype)} "
                         f"(uint8 pixels: pass x / 127.5 - 1)")
    arr = as_float_array(x, name)
    v = concrete_value(arr) if arr.ndim == 4 and arr.size else None
    if v is not None:
        lo, hi = float(v.min()), float(v.max())
        if lo >= 0.0 and hi > 1.5:
            raise ValueError(f"{name} must be images scaled to [-1, 1], got values in [{lo:.4g}, {hi:.4g}], which "
                             f"looks like [0, 255] pixels: pass x / 127.5 - 1")
    return arr

"""Building blocks of the DDPM UNet (Ho et al. 2020), channels-last (NHWC).

Every module takes ``dtype`` (the computation dtype, e.g. ``jnp.bfloat16`` on accelerators)
while its parameters stay float32. Layer names follow the reference code
(``diffusion_tf/models/unet.py``): ``norm1``, ``conv1``, ``temb_proj``, ``q``, ``proj_out``...
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import checks

__all__ = [
    "check_call",
    "AttnBlock",
    "Downsample",
    "ResBlock",
    "Upsample",
    "dropout_salt",
    "example_dropout",
    "group_norm",
    "num_groups",
    "timestep_embedding",
]


def timestep_embedding(
    t: jax.Array, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> jax.Array:
    """Sinusoidal timestep embedding, DDPM convention.

    ``freqs[i] = exp(-log(max_period) * i / (half - freq_shift))`` for ``i < half = dim // 2``,
    and the embedding is ``concat([sin(t * freqs), cos(t * freqs)])`` (``[cos, sin]`` with
    ``flip_sin_to_cos``), padded with one zero column when ``dim`` is odd. The defaults are
    DDPM's (``freq_shift=1``); diffusers' ``Timesteps(dim, flip_sin_to_cos, freq_shift)`` is
    the same function.

    Args:
      t: ``[B]`` integer or float timesteps (samplers may evaluate fractional ones).
      dim: embedding width; at least 4 (so that ``half - 1 > 0``).
      max_period: the longest wavelength, ``10000`` as in the Transformer.
      flip_sin_to_cos: put the cosines first.
      freq_shift: the shift of the frequency denominator, ``half - freq_shift``.

    Returns:
      ``[B, dim]`` float32.
    """
    t = jnp.asarray(t)
    if t.ndim != 1:
        raise ValueError(f"timestep_embedding: t must have shape [B], got shape {t.shape}")
    if dim < 4:
        raise ValueError(f"timestep_embedding: dim must be >= 4, got dim={dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    parts = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
    emb = jnp.concatenate(parts, axis=1)  # [B, 2 * half]
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def num_groups(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: 32 for wide layers, fewer for narrow ones.

    The largest divisor of ``channels`` that is ``<= max_groups`` and leaves at least two
    channels per group (one group for a single channel). With one channel per group the
    norm would subtract each channel's mean and so erase the per-channel time-embedding bias
    that :class:`ResBlock` adds just before its second norm: the model would ignore ``t``.
    """
    limit = max(1, min(max_groups, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def group_norm(
    channels: int, dtype: jnp.dtype, name: str | None = None, groups: int | None = None, eps: float = 1e-6
) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (default: :func:`num_groups`); epsilon 1e-6 as in the reference code."""
    if groups is None:
        groups = num_groups(channels)
    elif channels % groups:
        raise ValueError(f"group_norm: {channels} channels do not divide into norm_groups={groups} groups")
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def dropout_salt(name: str) -> int:
    """The integer a layer folds into each example's key for its mask: CRC-32 of ``name``, 31 bits."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


def example_dropout(x: jax.Array, rate: float, keys: jax.Array, salt: int) -> jax.Array:
    """Inverted dropout whose mask for example ``b`` depends on ``keys[b]`` alone.

    ``out[b] = x[b] * m_b / (1 - rate)`` with ``m_b ~ Bernoulli(1 - rate)`` of shape ``x.shape[1:]``
    drawn by ``jax.random.bernoulli(fold_in(keys[b], salt), 1 - rate, x.shape[1:])``. So the mask
    of an example does not depend on which other examples share the batch (or the device), and
    the network can be applied to the whole batch at once.

    Args:
      x: ``[B, ...]`` activations. rate: drop probability in ``[0, 1]``.
      keys: ``[B]`` typed PRNG keys, one per example. salt: the layer's integer (:func:`dropout_salt`).
    Returns: ``[B, ...]`` of ``x``'s dtype.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"example_dropout: rate must be in [0, 1], got {rate}")
    if keys.shape != x.shape[:1]:
        raise ValueError(f"example_dropout: keys must have shape [B]=({x.shape[0]},), got {keys.shape}")
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = 1.0 - rate
    mask = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, salt), keep, x.shape[1:]))(keys)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


def _conv3x3(features: int, dtype: jnp.dtype, name: str, zero_init: bool = False, conv=None) -> nn.Conv:
    kernel_init = nn.initializers.zeros if zero_init else nn.linear.default_kernel_init
    return nn.Conv(
        features, (3, 3), padding="SAME", dtype=dtype, kernel_init=kernel_init, name=name,
        conv_general_dilated=conv,
    )


class ResBlock(nn.Module):
    """Pre-activation residual block conditioned on a time embedding.

    ``x -> GN -> SiLU -> Conv3x3 -> (+ Dense(SiLU(temb)))  -> GN -> SiLU -> Dropout -> Conv3x3``
    with the last conv zero-initialised, plus a skip path (a 1x1 conv when the channel count
    changes). ``dropout_keys`` (``[B]`` typed keys), when given with ``train``, draws each
    example's mask from its own key (:func:`example_dropout`, salt :func:`dropout_salt` of the
    block's name) instead of from the module's ``"dropout"`` rng.
    With ``scale_shift=True`` the embedding instead modulates the second norm
    (Nichol & Dhariwal 2021): ``GN(h) * (1 + scale) + shift``. ``norm_groups`` / ``norm_eps``
    set every GroupNorm's groups (default: :func:`num_groups`) and epsilon. ``conv``, when
    given, replaces ``lax.conv_general_dilated`` in the convolutions (see :mod:`jaxdiff.models.conv`).
    """

    out_ch: int
    dropout: float = 0.0
    scale_shift: bool = False
    dtype: jnp.dtype = jnp.float32
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    conv: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False,
                 dropout_keys: jax.Array | None = None) -> jax.Array:
        """``x``: ``[B, H, W, C_in]``; ``temb``: ``[B, E]``; ``dropout_keys``: ``[B]`` or None.

        Returns ``[B, H, W, out_ch]``."""
        c_in = x.shape[-1]
        gn = partial(group_norm, dtype=self.dtype, groups=self.norm_groups, eps=self.norm_eps)
        h = nn.silu(gn(c_in, name="norm1")(x))
        h = _conv3x3(self.out_ch, self.dtype, "conv1", conv=self.conv)(h)
        n_emb = 2 * self.out_ch if self.scale_shift else self.out_ch
        emb = nn.Dense(n_emb, dtype=self.dtype, name="temb_proj")(nn.silu(temb))
        emb = emb[:, None, None, :]  # [B, 1, 1, n_emb]
        if self.scale_shift:
            scale, shift = jnp.split(emb, 2, axis=-1)
            h = gn(self.out_ch, name="norm2")(h) * (1 + scale) + shift
        else:
            h = gn(self.out_ch, name="norm2")(h + emb)
        h = nn.silu(h)
        if train and dropout_keys is not None:
            h = example_dropout(h, self.dropout, dropout_keys, dropout_salt(self.name))
        else:
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv3x3(self.out_ch, self.dtype, "conv2", zero_init=True, conv=self.conv)(h)
        if c_in != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name="nin_shortcut", conv_general_dilated=self.conv)(x)
        return x + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the ``H * W`` positions, with a residual connection.

    ``GN -> q, k, v (1x1 projections) -> softmax(q k^T / sqrt(d)) v -> proj_out`` where
    ``proj_out`` is zero-initialised (the block starts as the identity). The attention is
    ``jax.nn.dot_product_attention`` (fused kernels where the backend has them; the
    ``[B, heads, HW, HW]`` logits are not formed here), its logits and softmax in float32
    whatever ``dtype`` is. ``head_dim``, when set, fixes the
    width of a head instead (``C // head_dim`` heads); ``use_norm=False`` drops the GroupNorm.
    """

    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    head_dim: int | None = None
    use_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[B, H, W, C]`` -> ``[B, H, W, C]``; ``C`` must divide by ``num_heads`` (or ``head_dim``)."""
        b, hgt, wid, c = x.shape
        if self.head_dim is not None:
            if c % self.head_dim:
                raise ValueError(f"AttnBlock: channels ({c}) must be divisible by head_dim ({self.head_dim})")
            num_heads = c // self.head_dim
        else:
            num_heads = self.num_heads
        if c % num_heads:
            raise ValueError(
                f"AttnBlock: channels ({c}) must be divisible by num_heads ({num_heads})"
            )
        d = c // num_heads
        h = x
        if self.use_norm:
            h = group_norm(c, self.dtype, "norm", groups=self.norm_groups, eps=self.norm_eps)(x)

        def proj(name: str) -> jax.Array:  # [B, H*W, heads, d]
            y = nn.Dense(c, dtype=self.dtype, name=name)(h)
            return y.reshape(b, hgt * wid, num_heads, d)

        q, k, v = proj("q"), proj("k"), proj("v")
        # jax.nn.dot_product_attention: XLA's form computes the logits with float32 accumulation
        # and the softmax in float32 for bf16/f16 inputs; the fused (cuDNN/TPU) kernels do too.
        out = jax.nn.dot_product_attention(q, k, v, scale=d**-0.5).reshape(b, hgt, wid, c)
        out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(out)
        return x + out


class Downsample(nn.Module):
    """Conv 3x3 with stride 2 and SAME padding: ``[B, H, W, C] -> [B, H/2, W/2, C]``.

    For even sizes SAME pads one row/column at the bottom/right only, as TensorFlow does in
    the reference code (``padding=0``, diffusers' ``downsample_padding=0``); ``padding=1`` pads
    one row/column on every side instead.
    """

    dtype: jnp.dtype = jnp.float32
    padding: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if self.padding not in (0, 1):
            raise ValueError(f"Downsample: padding must be 0 or 1, got {self.padding!r}")
        pad = "SAME" if self.padding == 0 else ((1, 1), (1, 1))
        return nn.Conv(c, (3, 3), strides=(2, 2), padding=pad, dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then conv 3x3: ``[B, H, W, C] -> [B, 2H, 2W, C]`` (``conv``: as in :class:`ResBlock`)."""

    dtype: jnp.dtype = jnp.float32
    conv: Callable | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv3x3(c, self.dtype, "conv", conv=self.conv)(x)


def check_call(name: str, x, t, y, dropout_keys, *, num_classes: int | None, time_inputs: int = 1) -> None:
    """The checks of the networks' shared call ``(x [B, H, W, C], t [B] or [B, time_inputs], y [B], dropout_keys [B])``.

    ``ValueError`` naming ``name`` (``"UNet"``, ``"DiT"``) and the argument; labels must lie in
    ``[0, num_classes]`` (``num_classes`` is the null label).
    """
    if x.ndim != 4:
        raise ValueError(f"{name}: x must be [B, H, W, C], got shape {x.shape}")
    b = x.shape[0]
    want = (b,) if time_inputs == 1 else (b, time_inputs)
    if t.shape != want:
        raise ValueError(f"{name}: t must have shape {list(want)} (time_inputs={time_inputs}), got shape {t.shape}")
    if y is not None:
        if num_classes is None:
            raise ValueError(f"{name}: labels y were given but the model has num_classes=None")
        if y.shape != (b,):
            raise ValueError(f"{name}: y must have shape [B]=({b},), got {y.shape}")
        checks.check_int_range(y, f"{name}: y", 0, num_classes, f" (num_classes={num_classes} is the null label)")
    if dropout_keys is not None and dropout_keys.shape != (b,):
        raise ValueError(f"{name}: dropout_keys must have shape [B]=({b},), got {dropout_keys.shape}")

"""The Stable Diffusion autoencoder (diffusers' ``AutoencoderKL``) in Flax Linen, channels-last (NHWC).

The network maps images to a diagonal Gaussian posterior over latents and latents back to
images; ``f = 2 ** (len(block_out_channels) - 1)`` is the downsampling factor::

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512))      # sd-vae-ft-ema's layout
    params = vae.init(jax.random.key(0), x)["params"]                  # x: [B, H, W, 3] in [-1, 1]
    mean, logvar = vae.apply({"params": params}, x, method=vae.encode)  # each [B, H/f, W/f, latent_channels]
    z = sample_latents(mean, logvar, key)                              # or z = mean
    images = vae.apply({"params": params}, z, method=vae.decode)       # [B, H, W, 3], about [-1, 1]

Encoder: ``conv_in``; per level ``layers_per_block`` resnet blocks (GroupNorm
``norm_num_groups`` groups, epsilon 1e-6, SiLU, conv 3x3, twice, plus a 1x1 shortcut where the
width changes) and, except on the last level, a stride-2 conv after padding one row and column
at the bottom and right (diffusers' ``Downsample2D(padding=0)``); the mid block (resnet,
single-head self-attention over ``H W`` positions, resnet); GroupNorm, SiLU, ``conv_out`` to
``2 * latent_channels``; ``quant_conv`` (1x1). The moments split into ``mean`` and ``logvar``,
the latter clipped to ``[-30, 20]`` as diffusers' ``DiagonalGaussianDistribution``.
Decoder: ``post_quant_conv`` (1x1), ``conv_in``, the mid block, per level (widest first)
``layers_per_block + 1`` resnet blocks and, except on the last, nearest x2 upsampling and a
conv 3x3; GroupNorm, SiLU, ``conv_out``.

``scaling_factor`` and ``shift_factor`` are the folder's metadata, carried by the module for
the latent pipeline (which trains on ``(z - shift_factor) * scaling_factor``); the module never
applies them. :func:`jaxdiff.models.from_diffusers` reads a diffusers folder into this module
(:mod:`jaxdiff.models.diffusers_vae`). Parameters are float32; ``dtype`` is the computation
dtype; ``encode`` and ``decode`` return float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.layers import AttnBlock, Upsample, group_norm

__all__ = ["LOGVAR_RANGE", "AutoencoderKL", "Decoder", "Encoder", "ResnetBlock", "sample_latents", "sd_vae"]

LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this range
NORM_EPS = 1e-6  # every GroupNorm of the autoencoder (diffusers' resnet_eps)
_PAD1 = ((1, 1), (1, 1))


def _conv(features: int, dtype, name: str, size: int = 3) -> nn.Conv:
    return nn.Conv(features, (size, size), padding=_PAD1 if size == 3 else "VALID", dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` without a time embedding: ``[B, H, W, C_in] -> [B, H, W, out_ch]``.

    ``h = conv2(SiLU(GN(conv1(SiLU(GN(x))))))``; returns ``shortcut(x) + h`` where ``shortcut`` is
    a 1x1 conv (``conv_shortcut``) when ``C_in != out_ch``, else the identity.
    """

    out_ch: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in = x.shape[-1]
        h = nn.silu(group_norm(c_in, self.dtype, "norm1", self.groups, NORM_EPS)(x))
        h = _conv(self.out_ch, self.dtype, "conv1")(h)
        h = nn.silu(group_norm(self.out_ch, self.dtype, "norm2", self.groups, NORM_EPS)(h))
        h = _conv(self.out_ch, self.dtype, "conv2")(h)
        if c_in != self.out_ch:
            x = _conv(self.out_ch, self.dtype, "conv_shortcut", size=1)(x)
        return x + h


class _MidBlock(nn.Module):
    """resnet, attention (one head, optional), resnet at constant width."""

    groups: int
    attention: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.dtype, name="resnets_0")(x)
        if self.attention:
            x = AttnBlock(num_heads=1, dtype=self.dtype, norm_groups=self.groups, norm_eps=NORM_EPS,
                          name="attentions_0")(x)
        return ResnetBlock(c, self.groups, self.dtype, name="resnets_1")(x)


class Encoder(nn.Module):
    """Images ``[B, H, W, C]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]`` (before ``quant_conv``)."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    latent_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        chans = tuple(self.block_out_channels)
        h = _conv(chans[0], self.dtype, "conv_in")(x)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block):
                h = ResnetBlock(ch, self.groups, self.dtype, name=f"down_blocks_{i}_resnets_{j}")(h)
            if i < len(chans) - 1:  # pad (0, 1) on H and W, then a valid stride-2 conv (Downsample2D)
                h = nn.Conv(ch, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), dtype=self.dtype,
                            name=f"down_blocks_{i}_downsamplers_0_conv")(h)
        h = _MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(h)
        h = nn.silu(group_norm(chans[-1], self.dtype, "conv_norm_out", self.groups, NORM_EPS)(h))
        return _conv(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """Latents ``[B, h, w, latent_channels]`` (after ``post_quant_conv``) -> images ``[B, f h, f w, out_channels]``."""

    block_out_channels: Sequence[int]
    layers_per_block: int
    out_channels: int
    groups: int
    mid_block_add_attention: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        chans = tuple(reversed(tuple(self.block_out_channels)))
        h = _conv(chans[0], self.dtype, "conv_in")(z)
        h = _MidBlock(self.groups, self.mid_block_add_attention, self.dtype, name="mid_block")(h)
        for i, ch in enumerate(chans):
            for j in range(self.layers_per_block + 1):
                h = ResnetBlock(ch, self.groups, self.dtype, name=f"up_blocks_{i}_resnets_{j}")(h)
            if i < len(chans) - 1:
                h = Upsample(dtype=self.dtype, name=f"up_blocks_{i}_upsamplers_0")(h)
        h = nn.silu(group_norm(chans[-1], self.dtype, "conv_norm_out", self.groups, NORM_EPS)(h))
        return _conv(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (see the module docstring); the fields are its ``config.json``'s.

    ``block_out_channels``: the width of each level (``f = 2 ** (levels - 1)``);
    ``layers_per_block``: resnet blocks per encoder level (the decoder has one more);
    ``latent_channels``; ``norm_num_groups``: every GroupNorm's groups (each width must divide by it);
    ``use_quant_conv`` / ``use_post_quant_conv``: the 1x1 convs around the latent (SD, SDXL: true;
    SD3 / Flux layouts: false); ``mid_block_add_attention``: the mid blocks' attention;
    ``in_channels`` / ``out_channels``: image channels; ``scaling_factor`` / ``shift_factor``:
    metadata for the latent pipeline, not applied here (sd-vae-ft-ema: 0.18215 / None; SDXL:
    0.13025 / None); ``dtype``: the computation dtype.
    """

    block_out_channels: Sequence[int] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """``f``: images of ``H x W`` have latents of ``H/f x W/f``."""
        return 2 ** (len(self.block_out_channels) - 1)

    def setup(self) -> None:
        """Checks the fields (``ValueError`` naming them) and builds the encoder, decoder and 1x1 convs."""
        chans = tuple(self.block_out_channels)
        if not chans or any(c < 1 or c % self.norm_num_groups for c in chans):
            raise ValueError(f"AutoencoderKL: block_out_channels={chans} must be non-empty and each divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"AutoencoderKL: layers_per_block={self.layers_per_block} must be >= 1")
        common = dict(block_out_channels=chans, layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                      mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        c = 2 * self.latent_channels
        self.quant_conv = _conv(c, self.dtype, "quant_conv", size=1) if self.use_quant_conv else None
        self.post_quant_conv = (_conv(self.latent_channels, self.dtype, "post_quant_conv", size=1)
                                if self.use_post_quant_conv else None)

    def _check(self, x: jax.Array, channels: int, what: str, method: str) -> None:
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"AutoencoderKL.{method}: {what} must be [B, H, W, {channels}], got shape {x.shape}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x``: images ``[B, H, W, in_channels]`` in ``[-1, 1]`` -> ``(mean, logvar)``, each
        ``[B, H // f, W // f, latent_channels]`` float32 (``logvar`` clipped to ``LOGVAR_RANGE``)."""
        self._check(x, self.in_channels, "x", "encode")
        moments = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z``: latents ``[B, h, w, latent_channels]`` -> images ``[B, f h, f w, out_channels]``, float32."""
        self._check(z, self.latent_channels, "z", "decode")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The reconstruction ``decode(mean)`` of ``x [B, H, W, in_channels]`` (``init`` builds every parameter)."""
        return self.decode(self.encode(x)[0])


def sample_latents(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the posterior ``N(mean, exp(logvar))``: ``mean + exp(logvar / 2) * eps``, ``[B, h, w, c]``."""
    if mean.shape != logvar.shape:
        raise ValueError(f"sample_latents: mean {mean.shape} and logvar {logvar.shape} must have the same shape")
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)


def sd_vae(**overrides) -> AutoencoderKL:
    """The Stable Diffusion 1.x / 2.x autoencoder's layout (stabilityai/sd-vae-ft-ema; SDXL's is the same with
    ``scaling_factor=0.13025``): 4 levels 128-256-512-512, 2 blocks each, 4 latent channels, f = 8."""
    return AutoencoderKL(**{"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 4,
                            "norm_num_groups": 32, "scaling_factor": 0.18215, **overrides})

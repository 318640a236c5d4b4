"""The DDPM UNet (Ho et al. 2020) in Flax Linen, channels-last, and its presets.

The network only predicts: it maps ``(x_t, t[, y])`` to an output of the input's spatial
shape and knows nothing about schedules or objectives.

Example::

    model = tiny()                                             # or jaxdiff.models.get_model("tiny")
    params = model.init(jax.random.key(0), x, t)["params"]     # x: [B, 8, 8, 1], t: [B]
    out = model.apply({"params": params}, x, t, train=True,
                      rngs={"dropout": jax.random.key(1)})       # [B, 8, 8, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff import checks
from jaxdiff.models.conv import conv_for
from jaxdiff.models.layers import (
    AttnBlock,
    Downsample,
    ResBlock,
    Upsample,
    check_call,
    group_norm,
    timestep_embedding,
)

__all__ = [
    "Layout",
    "UNet",
    "check_image_size",
    "count_params",
    "ddpm_cifar10",
    "digits",
    "small",
    "tiny",
    "UNET_PRESETS",
]


def check_image_size(image_size: int, ch_mult: Sequence[int]) -> None:
    """Raise ``ValueError`` unless the UNet can halve ``image_size`` ``len(ch_mult) - 1`` times."""
    factor = 2 ** (len(ch_mult) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"image_size={image_size} is not divisible by 2**(len(ch_mult)-1)={factor} "
            f"for ch_mult={tuple(ch_mult)}: the UNet cannot downsample it"
        )


def count_params(params) -> int:
    """Total number of scalars in a params pytree (arrays or ``jax.ShapeDtypeStruct``)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


class Layout(NamedTuple):
    """Details of the UNet that DDPM fixes (these defaults) and other code bases vary.

    ``norm_eps``: every GroupNorm's epsilon. ``flip_sin_to_cos`` / ``freq_shift``: of
    :func:`~jaxdiff.models.layers.timestep_embedding`. ``downsample_padding``: 0 pads
    bottom/right, 1 every side. ``attn_levels``: attention after every ResBlock of these level
    indices (counted from the input resolution) instead of by ``UNet.attn_resolutions``.
    ``head_dim``: heads of this width instead of ``UNet.num_heads`` heads. ``mid_attn``: the
    middle attention block; ``mid_attn_norm``: its GroupNorm.
    """

    norm_eps: float = 1e-6
    flip_sin_to_cos: bool = False
    freq_shift: float = 1.0
    downsample_padding: int = 0
    attn_levels: tuple[int, ...] | None = None
    head_dim: int | None = None
    mid_attn: bool = True
    mid_attn_norm: bool = True


class UNet(nn.Module):
    """DDPM UNet: ``(x [B, H, W, C], t [B], y [B] | None) -> [B, H, W, C_out]``.

    ``C_out`` is ``out_channels`` (default: ``C``), doubled when ``learn_sigma``.
    ``attn_resolutions`` are the spatial sizes (``H``) at which attention follows a ResBlock.
    With ``num_classes`` set, label ``num_classes`` is the null label used for
    classifier-free guidance and is used when ``y`` is ``None``. Labels must lie in
    ``[0, num_classes]``: concrete ones are checked (``ValueError``); under ``jit`` a label above
    ``num_classes`` gives a NaN output and a negative one wraps around (``-1`` is the null label).
    ``dtype`` is the computation dtype (parameters stay float32; the output is float32);
    ``remat`` recomputes each ResBlock's activations on the backward pass.
    ``dropout_keys`` (``[B]`` typed keys, with ``train=True``) draws each example's dropout
    masks from its own key (see :class:`~jaxdiff.models.layers.ResBlock`), so that a batch gives
    every example the output it would get alone: the train step applies the whole batch at once
    and its result still does not depend on how the batch is split over devices. Without them
    dropout uses the ``"dropout"`` rng as usual.

    As in the reference code, each ResBlock projects ``SiLU(temb)``; GroupNorm uses 32 groups,
    fewer for layers narrower than 64 channels (see :func:`jaxdiff.models.layers.num_groups`),
    or ``norm_groups`` groups in every layer when set (one count for every width, as diffusers'
    ``norm_num_groups``: the ``digits`` preset sets it so that it exports).

    The details that DDPM fixes and other code bases vary (GroupNorm epsilon, timestep-embedding
    convention, downsampling padding, attention placement and heads, middle attention) are
    :class:`~jaxdiff.models.unet.Layout`; this UNet has DDPM's (:meth:`layout`). Imported diffusers checkpoints use
    :class:`~jaxdiff.models.diffusers_config.DiffusersUNet`, whose fields set them.

    ``conv_backward`` (one of :data:`jaxdiff.models.conv.CONV_BACKWARDS`) chooses how the
    stride-1 convolutions are differentiated (values, and results, are the same): ``"xla"``
    (default) keeps XLA's, ``"taps"`` writes the weight gradient as matmuls over the kernel taps
    (:mod:`jaxdiff.models.conv`, faster on XLA:CPU; the training setup selects it there).

    ``time_inputs=2`` takes ``t`` ``[B, 2]`` (MeanFlow's ``(t, t - r)``): each column gets its own
    sinusoidal embedding and MLP, and the two are added (Geng et al. 2025); the parameters of the
    second are ``temb2_dense0`` / ``temb2_dense1``. With 1 (default) ``t`` is ``[B]``.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_classes: int | None = None
    learn_sigma: bool = False
    out_channels: int | None = None
    scale_shift: bool = False
    num_heads: int = 1
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    norm_groups: int | None = None
    conv_backward: str = "xla"
    time_inputs: int = 1

    def layout(self) -> Layout:
        """The layout details this network uses: DDPM's (subclasses for other checkpoints override it)."""
        return Layout()

    def _check_inputs(self, x: jax.Array, t: jax.Array, y: jax.Array | None, dropout_keys) -> None:
        check_call("UNet", x, t, y, dropout_keys, num_classes=self.num_classes, time_inputs=self.time_inputs)
        try:
            check_image_size(x.shape[1], self.ch_mult)
            check_image_size(x.shape[2], self.ch_mult)
        except ValueError as error:
            raise ValueError(f"UNet: {error}{checks.layout_hint(x.shape)}") from None

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Predict from ``x [B, H, W, C]``, ``t [B]`` (int or float; ``[B, time_inputs]``), ``y [B]`` int labels,
        ``dropout_keys [B]``."""
        x, t = jnp.asarray(x), jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, t, y, dropout_keys)
        dt = self.dtype
        emb_dim = 4 * self.ch
        block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        lay = self.layout()
        norm = {"norm_groups": self.norm_groups, "norm_eps": lay.norm_eps}
        conv = conv_for(self.conv_backward)

        def res_block(h, out_ch, name):
            block = block_cls(out_ch, self.dropout, self.scale_shift, dt, **norm, conv=conv, name=name)
            return block(h, temb, train, dropout_keys)

        def attn(h, name, use_norm=True):
            return AttnBlock(self.num_heads, dt, **norm, head_dim=lay.head_dim, use_norm=use_norm, name=name)(h)

        def maybe_attn(h, level, name):
            if lay.attn_levels is not None:
                wanted = level in lay.attn_levels
            else:
                wanted = h.shape[1] in self.attn_resolutions
            return attn(h, name) if wanted else h

        # Time (and class) embedding: [B, 4 * ch].
        def time_mlp(t, prefix):
            e = timestep_embedding(t, self.ch, flip_sin_to_cos=lay.flip_sin_to_cos, freq_shift=lay.freq_shift)
            e = nn.Dense(emb_dim, dtype=dt, name=f"{prefix}_dense0")(e)
            return nn.Dense(emb_dim, dtype=dt, name=f"{prefix}_dense1")(nn.silu(e))

        if self.time_inputs == 1:
            temb = time_mlp(t, "temb")
        else:
            temb = sum(time_mlp(t[:, i], "temb" if i == 0 else f"temb{i + 1}") for i in range(self.time_inputs))
        if self.num_classes is not None:
            if y is None:
                y = jnp.full((x.shape[0],), self.num_classes, dtype=jnp.int32)
            temb = temb + nn.Embed(self.num_classes + 1, emb_dim, dtype=dt, name="class_emb")(y)

        # Downsampling; every intermediate h is kept for the skip connections.
        num_levels = len(self.ch_mult)
        conv_in = nn.Conv(self.ch, (3, 3), padding="SAME", dtype=dt, name="conv_in", conv_general_dilated=conv)
        hs = [conv_in(x.astype(dt))]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = res_block(hs[-1], self.ch * mult, f"down_{i}_block_{j}")
                hs.append(maybe_attn(h, i, f"down_{i}_attn_{j}"))
            if i != num_levels - 1:
                hs.append(Downsample(dt, lay.downsample_padding, name=f"down_{i}_downsample")(hs[-1]))

        # Middle.
        h = hs[-1]
        h = res_block(h, h.shape[-1], "mid_block_1")
        if lay.mid_attn:
            h = attn(h, "mid_attn_1", use_norm=lay.mid_attn_norm)
        h = res_block(h, h.shape[-1], "mid_block_2")

        # Upsampling.
        for i in reversed(range(num_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = res_block(h, self.ch * self.ch_mult[i], f"up_{i}_block_{j}")
                h = maybe_attn(h, i, f"up_{i}_attn_{j}")
            if i != 0:
                h = Upsample(dt, conv, name=f"up_{i}_upsample")(h)
        assert not hs, "every skip connection is consumed"

        # Out.
        out_ch = self.out_channels if self.out_channels is not None else x.shape[-1]
        if self.learn_sigma:
            out_ch *= 2
        h = nn.silu(group_norm(h.shape[-1], dt, "norm_out", self.norm_groups, lay.norm_eps)(h))
        h = nn.Conv(
            out_ch, (3, 3), padding="SAME", dtype=dt,
            kernel_init=nn.initializers.zeros, name="conv_out", conv_general_dilated=conv,
        )(h)
        return h.astype(jnp.float32)


# Presets (flax imagenet style).
# DDPM's CIFAR-10 model: 35.7M parameters (35,746,307 for 32x32x3 inputs).
ddpm_cifar10 = partial(
    UNet, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
)
# 28x28 MNIST-like data (28 -> 14 -> 7, attention at 7x7): 6.5M parameters.
small = partial(
    UNet, ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(7,), dropout=0.1
)
# 8x8 single-channel digits, sized for 2 CPU cores: 0.28M parameters, 5.1 GFLOP per
# forward+backward pass of a batch of 128 (ch=64, ch_mult=(1, 2) would be 2.8M and 40 GFLOP).
# One GroupNorm group count for every layer (what num_groups gives its narrowest, 32 channels),
# so that it exports to diffusers (one norm_num_groups).
digits = partial(
    UNet, ch=32, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, norm_groups=16
)
# For tests: 0.18M parameters.
tiny = partial(UNet, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)

#: The UNet presets by name; :data:`jaxdiff.models.PRESETS` holds every preset, the DiTs too.
UNET_PRESETS = {"ddpm_cifar10": ddpm_cifar10, "small": small, "digits": digits, "tiny": tiny}

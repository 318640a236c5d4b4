"""DiT, the diffusion transformer (Peebles & Xie 2023), in Flax Linen, channels-last, and its presets.

The network only predicts, with the UNet's contract (:class:`~jaxdiff.models.unet.UNet`):
``model.apply({"params": p}, x [B, H, W, C], t [B], y [B] | None, train=..., dropout_keys=...)
-> [B, H, W, C_out]``, so every objective, sampler and guidance serves it unchanged.

``x`` is cut into ``patch_size x patch_size`` patches by a convolution of that stride, each patch
a token of width ``hidden_size`` plus a fixed 2-D sin-cos position; the conditioning ``c`` is the
timestep MLP on a 256-frequency sinusoidal embedding (plus a label table with one extra row, the
null label, for classifier-free guidance). ``depth`` blocks, each

    h = h + gate_msa * Attn(LN(h) * (1 + scale_msa) + shift_msa)
    h = h + gate_mlp * MLP(LN(h) * (1 + scale_mlp) + shift_mlp)

with the six modulations a zero-initialised linear map of ``SiLU(c)`` (adaLN-Zero: every block
starts as the identity), then the final adaLN layer (zero-initialised linear) and unpatchify.

The details that the original code fixes and diffusers' ``DiTTransformer2DModel`` varies are
:class:`DiTLayout`. **Native models and the presets use the original DiT's**
(``freq_shift=0``: timestep frequencies ``exp(-ln(10^4) i / 128)``; LayerNorm epsilon ``1e-6``
before the MLP; positions ``0, 1, ...`` in patches); a model imported by
:func:`jaxdiff.models.from_diffusers` carries diffusers' (its ``Timesteps`` uses
``downscale_freq_shift=1``: ``exp(-ln(10^4) i / 127)``; its MLP LayerNorm takes
``norm_eps``, 1e-5 by default; on a grid other than ``sample_size / patch_size`` its positions are
rescaled onto that grid), so that it reproduces diffusers.

Parameter counts: the presets have the paper's sizes (DiT-XL/2 with learned sigma for 1000
classes on 32x32x4 latents: 675,129,632 in the reference code, of which 294,912 are its fixed
positional table, which jaxdiff computes instead of storing: 674,834,720 parameters here).

Example::

    model = get_model("dit_s_2", num_classes=1000, learn_sigma=True)
    params = model.init(jax.random.key(0), x, t, y)["params"]   # x: [B, 32, 32, 4], t: [B], y: [B]
    out = model.apply({"params": params}, x, t, y)              # [B, 32, 32, 8]
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.conv import conv_for
from jaxdiff.models.layers import check_call, dropout_salt, example_dropout, timestep_embedding

__all__ = ["DIT_PRESETS", "DiT", "DiTBlock", "DiTLayout", "check_patch_size", "sincos_2d"]

FREQ_DIM = 256  # the timestep embedding's width before the MLP (the paper's)


class DiTLayout(NamedTuple):
    """Details of DiT that the original code fixes (these defaults) and diffusers varies.

    ``freq_shift``: of the timestep's sinusoidal embedding
    (:func:`~jaxdiff.models.layers.timestep_embedding`, cosines first): 0 in the original code,
    1 in diffusers.
    ``mlp_norm_eps``: the epsilon of the LayerNorm before the MLP (diffusers' ``norm_eps``).
    ``pos_grid``: when set, positions on an ``h x w`` patch grid are ``i * pos_grid / h`` and
    ``j * pos_grid / w`` (diffusers' ``base_size``, ``sample_size // patch_size``); ``None``:
    ``i`` and ``j``.
    """

    freq_shift: float = 0.0
    mlp_norm_eps: float = 1e-6
    pos_grid: int | None = None


def sincos_2d(dim: int, h: int, w: int, pos_grid: int | None = None) -> np.ndarray:
    """Fixed 2-D sin-cos positions ``[h * w, dim]`` (row-major over the ``h x w`` grid), float32.

    The first ``dim / 2`` columns embed the column index ``j``, the rest the row index ``i``
    (as the reference code's ``meshgrid(grid_w, grid_h)``); each half is
    ``[sin(p * omega), cos(p * omega)]`` with ``omega_k = 10000^(-k / (dim / 4))``, ``k < dim / 4``.
    ``pos_grid``: see :class:`DiTLayout`. Computed in float64 NumPy (a constant under ``jit``).
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    rows = np.arange(h, dtype=np.float64)
    cols = np.arange(w, dtype=np.float64)
    if pos_grid is not None:
        rows, cols = rows / (h / pos_grid), cols / (w / pos_grid)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def one_d(pos):  # [h * w] -> [h * w, dim / 2]
        out = pos[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    ii, jj = np.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    return np.concatenate([one_d(jj.reshape(-1)), one_d(ii.reshape(-1))], axis=1).astype(np.float32)


def check_patch_size(size: int, patch_size: int, what: str = "x") -> None:
    """Raise ``ValueError`` unless the spatial ``size`` is a positive multiple of ``patch_size``."""
    if size <= 0 or size % patch_size:
        raise ValueError(f"DiT: {what} size {size} is not divisible by patch_size={patch_size}")


_xavier = nn.initializers.xavier_uniform()
# The reference code's patch kernel init: Xavier-uniform of the kernel seen as a [p*p*C, D] matrix.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
_zeros = nn.initializers.zeros


class DiTBlock(nn.Module):
    """One adaLN-Zero block: ``(h [B, N, D], c [B, D]) -> [B, N, D]`` (the identity at initialisation).

    ``dropout`` acts on the attention output and on the MLP's hidden layer; with ``dropout_keys``
    (``[B]`` typed keys) and ``train``, each example's masks come from its own key
    (:func:`~jaxdiff.models.layers.example_dropout`), else from the ``"dropout"`` rng.
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    mlp_norm_eps: float = 1e-6

    def _dropout(self, h, train, dropout_keys, name):
        if train and dropout_keys is not None:
            return example_dropout(h, self.dropout, dropout_keys, dropout_salt(f"{self.name}/{name}"))
        return nn.Dropout(self.dropout, deterministic=not train, name=name)(h)

    @nn.compact
    def __call__(self, h: jax.Array, c: jax.Array, train: bool = False,
                 dropout_keys: jax.Array | None = None) -> jax.Array:
        b, n, d = h.shape
        if d % self.num_heads:
            raise ValueError(f"DiT: hidden_size ({d}) must be divisible by num_heads ({self.num_heads})")
        dt = self.dtype
        mod = nn.Dense(6 * d, dtype=dt, kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)

        def norm(name, eps):
            return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dt, name=name)

        a = norm("norm1", 1e-6)(h) * (1 + scale_msa) + shift_msa
        heads, hd = self.num_heads, d // self.num_heads
        qkv = nn.Dense(3 * d, dtype=dt, kernel_init=_xavier, name="qkv")(a).reshape(b, n, 3, heads, hd)
        a = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=hd**-0.5)
        a = nn.Dense(d, dtype=dt, kernel_init=_xavier, name="proj")(a.reshape(b, n, d))
        h = h + gate_msa * self._dropout(a, train, dropout_keys, "attn_dropout")

        m = norm("norm2", self.mlp_norm_eps)(h) * (1 + scale_mlp) + shift_mlp
        m = nn.gelu(nn.Dense(int(d * self.mlp_ratio), dtype=dt, kernel_init=_xavier, name="fc1")(m), approximate=True)
        m = self._dropout(m, train, dropout_keys, "mlp_dropout")
        m = nn.Dense(d, dtype=dt, kernel_init=_xavier, name="fc2")(m)
        return h + gate_mlp * m


class DiT(nn.Module):
    """DiT: ``(x [B, H, W, C], t [B], y [B] | None) -> [B, H, W, C_out]``, ``H`` and ``W`` multiples of ``patch_size``.

    ``C_out`` is ``out_channels`` (default: ``C``), doubled when ``learn_sigma``. With
    ``num_classes`` set, label ``num_classes`` is the null label used for classifier-free guidance
    and is used when ``y`` is ``None``; labels must lie in ``[0, num_classes]`` (concrete ones are
    checked). ``dtype`` is the computation dtype (parameters and output float32); ``remat``
    recomputes each block's activations on the backward pass. ``dropout`` and ``dropout_keys``:
    see :class:`~jaxdiff.models.dit.DiTBlock` (the paper's models use none). ``conv_backward`` selects the patch
    convolution's gradient as the UNet's (:mod:`jaxdiff.models.conv`; it matters only for
    ``patch_size=1``, a strided convolution is XLA's own). ``time_inputs=2`` takes ``t`` ``[B, 2]``
    (MeanFlow's ``(t, t - r)``): the second column gets its own timestep MLP (``t_embedder2``),
    added to the first's. ``layout``: :class:`DiTLayout` (default: the original code's).

    Parameters: ``patch_embed`` (conv ``[p, p, C, D]``), ``t_embedder`` (``mlp_0``, ``mlp_1``),
    ``y_embedder`` (``[num_classes + 1, D]``), ``block_{i}`` (``adaLN_modulation``, ``qkv``,
    ``proj``, ``fc1``, ``fc2``), ``final_adaLN``, ``final_linear``. Initialisation as the
    reference code: Xavier-uniform linears and patch kernel, normal(0.02) timestep MLP and label
    table, zero modulations and final linear.
    """

    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_classes: int | None = None
    learn_sigma: bool = False
    out_channels: int | None = None
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    conv_backward: str = "xla"
    time_inputs: int = 1
    layout: DiTLayout = DiTLayout()

    def _check_inputs(self, x, t, y, dropout_keys) -> None:
        if self.time_inputs not in (1, 2):
            raise ValueError(f"DiT: time_inputs must be 1 or 2, got {self.time_inputs}")
        check_call("DiT", x, t, y, dropout_keys, num_classes=self.num_classes, time_inputs=self.time_inputs)
        if self.patch_size < 1:
            raise ValueError(f"DiT: patch_size must be >= 1, got {self.patch_size}")
        check_patch_size(x.shape[1], self.patch_size, "x height")
        check_patch_size(x.shape[2], self.patch_size, "x width")
        if self.hidden_size % 4:
            raise ValueError(f"DiT: hidden_size must be divisible by 4 (2-D sin-cos positions), got {self.hidden_size}")

    def _time_mlp(self, t: jax.Array, name: str) -> jax.Array:
        e = timestep_embedding(t, FREQ_DIM, flip_sin_to_cos=True, freq_shift=self.layout.freq_shift)
        init = nn.initializers.normal(0.02)
        e = nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=init, name=f"{name}_mlp_0")(e)
        return nn.Dense(self.hidden_size, dtype=self.dtype, kernel_init=init, name=f"{name}_mlp_1")(nn.silu(e))

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *, train: bool = False,
        dropout_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Predict from ``x [B, H, W, C]``, ``t [B]`` (``[B, 2]`` with ``time_inputs=2``), ``y [B]`` int labels,
        ``dropout_keys [B]``."""
        x, t = jnp.asarray(x), jnp.asarray(t)
        y = None if y is None else jnp.asarray(y)
        self._check_inputs(x, t, y, dropout_keys)
        dt, d, p = self.dtype, self.hidden_size, self.patch_size
        b, height, width, c_in = x.shape
        gh, gw = height // p, width // p

        h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dt, kernel_init=_patch_init,
                    name="patch_embed", conv_general_dilated=conv_for(self.conv_backward))(x.astype(dt))
        pos = jnp.asarray(sincos_2d(d, gh, gw, self.layout.pos_grid))
        h = (h.reshape(b, gh * gw, d) + pos[None].astype(dt)).astype(dt)  # [B, N, D]

        if self.time_inputs == 1:
            cond = self._time_mlp(t, "t_embedder")
        else:
            cond = self._time_mlp(t[:, 0], "t_embedder") + self._time_mlp(t[:, 1], "t_embedder2")
        if self.num_classes is not None:
            if y is None:
                y = jnp.full((b,), self.num_classes, dtype=jnp.int32)
            table = nn.Embed(self.num_classes + 1, d, dtype=dt, embedding_init=nn.initializers.normal(0.02),
                             name="y_embedder")
            cond = cond + table(y)

        block_cls = nn.remat(DiTBlock, static_argnums=(3,)) if self.remat else DiTBlock
        for i in range(self.depth):
            block = block_cls(self.num_heads, self.mlp_ratio, self.dropout, dt, self.layout.mlp_norm_eps,
                              name=f"block_{i}")
            h = block(h, cond, train, dropout_keys)

        out_ch = (self.out_channels if self.out_channels is not None else c_in) * (2 if self.learn_sigma else 1)
        mod = nn.Dense(2 * d, dtype=dt, kernel_init=_zeros, name="final_adaLN")(nn.silu(cond))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dt, name="final_norm")(h)
        h = h * (1 + scale) + shift
        h = nn.Dense(p * p * out_ch, dtype=dt, kernel_init=_zeros, name="final_linear")(h)  # [B, N, p*p*C_out]
        h = h.reshape(b, gh, gw, p, p, out_ch).transpose(0, 1, 3, 2, 4, 5)
        return h.reshape(b, height, width, out_ch).astype(jnp.float32)


# Presets (the paper's Table 1: hidden size, depth, heads; MLP ratio 4), for any patch size.
_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}

#: ``dit_{s,b,l,xl}_{2,4,8}``: the paper's models (defaults sized for 32x32x4 latents; any
#: ``H, W`` divisible by the patch work), and ``dit_digits`` (pixel-space 8x8 digits), as
#: ``functools.partial`` of :class:`DiT`.
DIT_PRESETS = {
    f"dit_{size}_{p}": partial(DiT, patch_size=p, hidden_size=hid, depth=depth, num_heads=heads)
    for size, (hid, depth, heads) in _SIZES.items()
    for p in (2, 4, 8)
}
# 8x8 single-channel digits in pixel space (16 tokens of width 96): 0.72M parameters with 10 classes.
DIT_PRESETS["dit_digits"] = partial(DiT, patch_size=2, hidden_size=96, depth=4, num_heads=4)

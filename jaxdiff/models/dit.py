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

Optional block choices of SiT / LightningDiT (Yao et al. 2025), all off by default (the paper's
DiT, and the only one diffusers holds: :func:`~jaxdiff.models.to_diffusers` refuses the others,
naming the field): ``norm="rmsnorm"`` (:class:`RMSNorm`, parameter-free as the LayerNorms it
replaces: adaLN supplies the scale), ``qk_norm`` (RMSNorm with a learned ``[head_dim]`` scale on
q and k of every head, before RoPE), ``mlp="swiglu"`` (:func:`swiglu_hidden` units,
``fc2(SiLU(a) * b)`` with ``[a, b] = fc1(x)``) and ``rope`` (2-D rotary positions on q and k,
:func:`rope_2d_angles` / :func:`apply_rope`). With ``rope`` the absolute sin-cos positions are
kept, as LightningDiT keeps them.

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

__all__ = ["DIT_PRESETS", "MLPS", "NORMS", "DiT", "DiTBlock", "DiTLayout", "RMSNorm", "apply_rope",
           "check_patch_size", "rope_2d_angles", "sincos_2d", "swiglu_hidden"]

FREQ_DIM = 256  # the timestep embedding's width before the MLP (the paper's)
NORMS = ("layernorm", "rmsnorm")  # DiT.norm
MLPS = ("gelu", "swiglu")  # DiT.mlp
ROPE_THETA = 10000.0  # the rotary frequencies' base (LightningDiT's, from EVA-02)


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


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: ``x / sqrt(mean(x^2) + epsilon)`` (times a learned scale, initialised
    to 1, when ``use_scale``); any shape ``[..., D]``, statistics in float32, output in ``dtype``."""

    epsilon: float = 1e-6
    use_scale: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        if self.use_scale:
            scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
            y = y * scale.reshape((1,) * (x.ndim - 1) + (-1,))
        return y.astype(self.dtype)


def swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    """SwiGLU's hidden units: ``int(2/3 * int(hidden_size * mlp_ratio))`` (LightningDiT's rounding, which
    keeps the parameters of the 4x GELU MLP: DiT-S's 384 wide: 1024)."""
    return int(2 / 3 * int(hidden_size * mlp_ratio))


def rope_2d_angles(head_dim: int, h: int, w: int) -> np.ndarray:
    """The rotation angles ``[h * w, head_dim / 2]`` (float64, row-major grid) of 2-D RoPE.

    Pair ``k`` of a head's channels (``(x_{2k}, x_{2k+1})``, interleaved as EVA-02 / LightningDiT)
    turns by ``i * omega_k`` for the first ``head_dim / 4`` pairs (the token's row ``i``) and by
    ``j * omega_{k - head_dim / 4}`` for the rest (its column ``j``), ``omega_k = 10000^(-k / (head_dim / 4))``.
    """
    if head_dim % 4:
        raise ValueError(f"rope_2d_angles: head_dim must be divisible by 4, got {head_dim}")
    omega = ROPE_THETA ** (-np.arange(head_dim // 4, dtype=np.float64) / (head_dim // 4))
    ii, jj = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return np.concatenate([ii.reshape(-1, 1) * omega, jj.reshape(-1, 1) * omega], axis=1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate ``x [..., N, heads, head_dim]``: channel pair ``k`` of token ``n`` by ``angles [N, head_dim / 2]``
    (``(a, b) -> (a cos - b sin, a sin + b cos)``), in float32; output in ``x``'s dtype."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    lead = (1,) * (x.ndim - 3) + (angles.shape[0], 1, angles.shape[1])  # [..., N, 1, head_dim / 2]
    cos, sin = jnp.cos(angles).reshape(lead), jnp.sin(angles).reshape(lead)
    a, b = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([a * cos - b * sin, a * sin + b * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


_xavier = nn.initializers.xavier_uniform()
# The reference code's patch kernel init: Xavier-uniform of the kernel seen as a [p*p*C, D] matrix.
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)
_zeros = nn.initializers.zeros


def _block_norm(kind: str, eps: float, dtype, name: str) -> nn.Module:
    """The parameter-free normalisation of a DiT block (``kind``: ``"layernorm"`` or ``"rmsnorm"``)."""
    if kind == "rmsnorm":
        return RMSNorm(eps, use_scale=False, dtype=dtype, name=name)
    return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, dtype=dtype, name=name)


class DiTBlock(nn.Module):
    """One adaLN-Zero block: ``(h [B, N, D], c [B, D]) -> [B, N, D]`` (the identity at initialisation).

    ``dropout`` acts on the attention output and on the MLP's hidden layer; with ``dropout_keys``
    (``[B]`` typed keys) and ``train``, each example's masks come from its own key
    (:func:`~jaxdiff.models.layers.example_dropout`), else from the ``"dropout"`` rng.
    ``norm``, ``qk_norm``, ``mlp``: see :class:`DiT`; ``rope_grid``: ``(h, w)``, the patch grid of
    the tokens for 2-D RoPE (``None``: none).
    """

    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    mlp_norm_eps: float = 1e-6
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    rope_grid: tuple[int, int] | None = None

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
            return _block_norm(self.norm, eps, dt, name)

        a = norm("norm1", 1e-6)(h) * (1 + scale_msa) + shift_msa
        heads, hd = self.num_heads, d // self.num_heads
        qkv = nn.Dense(3 * d, dtype=dt, kernel_init=_xavier, name="qkv")(a).reshape(b, n, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, hd]
        if self.qk_norm:
            q = RMSNorm(1e-6, use_scale=True, dtype=dt, name="q_norm")(q)
            k = RMSNorm(1e-6, use_scale=True, dtype=dt, name="k_norm")(k)
        if self.rope_grid is not None:
            angles = jnp.asarray(rope_2d_angles(hd, *self.rope_grid), jnp.float32)
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        a = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5)
        a = nn.Dense(d, dtype=dt, kernel_init=_xavier, name="proj")(a.reshape(b, n, d))
        h = h + gate_msa * self._dropout(a, train, dropout_keys, "attn_dropout")

        m = norm("norm2", self.mlp_norm_eps)(h) * (1 + scale_mlp) + shift_mlp
        if self.mlp == "swiglu":
            units = swiglu_hidden(d, self.mlp_ratio)
            gate, value = jnp.split(nn.Dense(2 * units, dtype=dt, kernel_init=_xavier, name="fc1")(m), 2, axis=-1)
            m = nn.silu(gate) * value
        else:
            m = nn.gelu(nn.Dense(int(d * self.mlp_ratio), dtype=dt, kernel_init=_xavier, name="fc1")(m),
                        approximate=True)
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

    Block options (module docstring; the defaults are the paper's): ``norm`` (``"layernorm"`` or
    ``"rmsnorm"``: the blocks' and the final layer's normalisation), ``qk_norm``, ``mlp``
    (``"gelu"`` or ``"swiglu"``), ``rope`` (needs ``hidden_size / num_heads`` divisible by 4).

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
    norm: str = "layernorm"
    qk_norm: bool = False
    mlp: str = "gelu"
    rope: bool = False

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
        if self.norm not in NORMS:
            raise ValueError(f"DiT: norm must be one of {NORMS}, got {self.norm!r}")
        if self.mlp not in MLPS:
            raise ValueError(f"DiT: mlp must be one of {MLPS}, got {self.mlp!r}")
        for flag in ("qk_norm", "rope"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"DiT: {flag} must be a bool, got {getattr(self, flag)!r}")
        if self.rope and (self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4):
            raise ValueError(f"DiT: rope=True needs hidden_size / num_heads divisible by 4 (half the head for rows, "
                             f"half for columns), got hidden_size={self.hidden_size}, num_heads={self.num_heads}")

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
                              norm=self.norm, qk_norm=self.qk_norm, mlp=self.mlp,
                              rope_grid=(gh, gw) if self.rope else None, name=f"block_{i}")
            h = block(h, cond, train, dropout_keys)

        out_ch = (self.out_channels if self.out_channels is not None else c_in) * (2 if self.learn_sigma else 1)
        mod = nn.Dense(2 * d, dtype=dt, kernel_init=_zeros, name="final_adaLN")(nn.silu(cond))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        h = _block_norm(self.norm, 1e-6, dt, "final_norm")(h)
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

"""diffusers ``DiTTransformer2DModel`` folders <-> :class:`~jaxdiff.models.dit.DiT` (the facebook/DiT-XL-2-* layout).

Used by :func:`jaxdiff.models.from_diffusers` / :func:`~jaxdiff.models.to_diffusers`, which read
and write the folder; here are the config and the tensor names.

Supported ``config.json`` settings (missing keys take diffusers' defaults, ``DEFAULTS``):
``num_attention_heads``, ``attention_head_dim`` (their product, the width, a multiple of 4),
``in_channels``, ``out_channels`` (``2 * in_channels`` is read as ``learn_sigma``), ``num_layers``,
``sample_size``, ``patch_size``, ``num_embeds_ada_norm`` (the classes; the table has one more row,
the null label), ``norm_eps``, ``dropout``, ``norm_type`` ``ada_norm_zero``, ``activation_fn``
``gelu-approximate``, ``attention_bias`` true, ``norm_elementwise_affine`` false,
``upcast_attention`` (float32 attention either way), ``norm_num_groups`` (unused by the network).
Anything else is refused naming the setting.

The imported :class:`~jaxdiff.models.dit.DiT` has diffusers' layout (:class:`~jaxdiff.models.dit.DiTLayout`
``freq_shift=1``, ``mlp_norm_eps=norm_eps``, ``pos_grid=sample_size // patch_size``) and
reproduces diffusers' output, on other grid sizes too. diffusers keeps a copy of the time and
label embedders in every block (``transformer_blocks.<i>.norm1.emb``) and uses block 0's for the
final layer; the copies must be equal (they are in the published folders) or the import refuses
naming the first that differs. Export writes block 0's copy into every block. Its ``q``, ``k``,
``v`` projections are the DiT's one ``qkv`` (concatenated in that order).
"""

from __future__ import annotations

import numpy as np

from jaxdiff.models.dit import DiT, DiTLayout

__all__ = ["CLASS_NAME", "DEFAULTS", "config_from_dit", "dit_from_config", "params_from_tensors", "tensors_from_params"]

CLASS_NAME = "DiTTransformer2DModel"

# DiTTransformer2DModel.__init__ defaults (diffusers 0.42).
DEFAULTS = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
_ONLY = {"norm_type": ("ada_norm_zero",), "activation_fn": ("gelu-approximate",), "attention_bias": (True,),
         "norm_elementwise_affine": (False,), "upcast_attention": (False, True)}
# The DiT block options that diffusers' class lacks, at the only values it holds (export refuses others).
_PLAIN_BLOCK = {"norm": "layernorm", "qk_norm": False, "mlp": "gelu", "rope": False}
_EMB = "transformer_blocks.{i}.norm1.emb."
_EMBEDDERS = {  # jaxdiff path -> diffusers' name inside block i's embedder copy
    ("t_embedder_mlp_0",): "timestep_embedder.linear_1", ("t_embedder_mlp_1",): "timestep_embedder.linear_2",
    ("y_embedder",): "class_embedder.embedding_table",
}
_TOP = {("patch_embed",): "pos_embed.proj", ("final_adaLN",): "proj_out_1", ("final_linear",): "proj_out_2"}
_BLOCK = {"adaLN_modulation": "norm1.linear", "proj": "attn1.to_out.0", "fc1": "ff.net.0.proj", "fc2": "ff.net.2"}
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")


def _int(config: dict, key: str, low: int = 1) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.json: {key}={value!r} must be an int >= {low}")
    return value


def dit_from_config(config: dict) -> tuple[DiT, dict]:
    """The :class:`~jaxdiff.models.dit.DiT` of a ``DiTTransformer2DModel`` ``config.json`` and
    ``{"in_channels", "sample_size"}``; ``ValueError`` names the first setting it cannot reproduce."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in DEFAULTS)
    if unknown:
        raise ValueError(f"config.json: unsupported setting(s) {unknown} for {CLASS_NAME}")
    c = {**DEFAULTS, **config}
    for key, allowed in _ONLY.items():
        if c[key] not in allowed:
            raise ValueError(f"config.json: {key}={c[key]!r} is not supported (supported: {list(allowed)})")
    heads, head_dim = _int(c, "num_attention_heads"), _int(c, "attention_head_dim")
    if (heads * head_dim) % 4:
        raise ValueError(f"config.json: num_attention_heads * attention_head_dim = {heads * head_dim} "
                         "must be a multiple of 4 (2-D sin-cos positions)")
    c_in, patch, size = _int(c, "in_channels"), _int(c, "patch_size"), _int(c, "sample_size")
    c_out = c_in if c["out_channels"] is None else _int(c, "out_channels")
    if size % patch:
        raise ValueError(f"config.json: sample_size={size} is not divisible by patch_size={patch}")
    if c["num_embeds_ada_norm"] is None:
        raise ValueError("config.json: num_embeds_ada_norm=None is not supported (ada_norm_zero needs the label table)")
    eps, dropout = c["norm_eps"], c["dropout"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or eps <= 0:
        raise ValueError(f"config.json: norm_eps={eps!r} must be a positive number")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise ValueError(f"config.json: dropout={dropout!r} must be in [0, 1)")
    learn_sigma = c_out == 2 * c_in
    model = DiT(
        patch_size=patch, hidden_size=heads * head_dim, depth=_int(c, "num_layers"), num_heads=heads,
        mlp_ratio=4.0, dropout=float(dropout), num_classes=_int(c, "num_embeds_ada_norm"), learn_sigma=learn_sigma,
        out_channels=None if learn_sigma or c_out == c_in else c_out,
        layout=DiTLayout(freq_shift=1.0, mlp_norm_eps=float(eps), pos_grid=size // patch),
    )
    return model, {"in_channels": c_in, "sample_size": size}


def config_from_dit(model: DiT, in_channels: int, sample_size: int | None) -> dict:
    """The ``config.json`` of ``model`` (``ValueError`` names a field diffusers cannot hold).

    ``sample_size`` defaults to ``layout.pos_grid * patch_size``; a model without ``pos_grid``
    needs it, and reproduces diffusers at that size (elsewhere diffusers rescales its positions).
    """
    lay = model.layout
    if lay.freq_shift != 1:
        raise ValueError(f"layout.freq_shift={lay.freq_shift} (the original DiT's is 0): diffusers' "
                         f"{CLASS_NAME} embeds timesteps with downscale_freq_shift=1")
    if model.time_inputs != 1:
        raise ValueError(f"time_inputs={model.time_inputs}: {CLASS_NAME} takes one timestep")
    if model.num_classes is None:
        raise ValueError(f"num_classes=None: {CLASS_NAME} (ada_norm_zero) always has a label table")
    if model.mlp_ratio != 4:
        raise ValueError(f"mlp_ratio={model.mlp_ratio}: {CLASS_NAME}'s feed-forward is 4x wide")
    for field, plain in _PLAIN_BLOCK.items():
        if getattr(model, field) != plain:
            raise ValueError(f"{field}={getattr(model, field)!r}: {CLASS_NAME} has only the original DiT block "
                             f"(export needs {field}={plain!r})")
    if sample_size is None:
        if lay.pos_grid is None:
            raise ValueError("sample_size is needed: the model has no layout.pos_grid")
        sample_size = lay.pos_grid * model.patch_size
    if lay.pos_grid is not None and lay.pos_grid * model.patch_size != sample_size:
        raise ValueError(f"sample_size={sample_size} disagrees with layout.pos_grid={lay.pos_grid} "
                         f"(patch_size={model.patch_size})")
    c_out = model.out_channels if model.out_channels is not None else in_channels
    return {
        "_class_name": CLASS_NAME, **DEFAULTS, "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads, "in_channels": in_channels,
        "out_channels": c_out * (2 if model.learn_sigma else 1), "num_layers": model.depth,
        "dropout": model.dropout, "sample_size": sample_size, "patch_size": model.patch_size,
        "num_embeds_ada_norm": model.num_classes, "norm_eps": lay.mlp_norm_eps,
    }


def _layout(value: np.ndarray, to_jax: bool) -> np.ndarray:
    if value.ndim == 4:  # conv [O, I, kh, kw] <-> [kh, kw, I, O]
        return value.transpose((2, 3, 1, 0) if to_jax else (3, 2, 0, 1))
    return value.T if value.ndim == 2 else value


def _leaf(keys: tuple[str, ...]) -> str:
    return {"kernel": "weight", "bias": "bias", "embedding": "weight"}[keys[-1]]


def params_from_tensors(model: DiT, shapes, tensors: dict[str, np.ndarray], file: str) -> dict:
    """The params of ``model`` (shaped as ``shapes``) from a folder's ``tensors``; every tensor used once."""
    import jax

    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise ValueError(f"{file}: tensor {name} missing")
        used.add(name)
        return np.asarray(tensors[name])

    def fill(path, leaf):
        keys = tuple(p.key for p in path)
        kind = _leaf(keys)
        if keys[:-1] in _EMBEDDERS:
            name = _EMB.format(i=0) + _EMBEDDERS[keys[:-1]] + "." + kind
            value = take(name)
            for i in range(1, model.depth):
                other = _EMB.format(i=i) + _EMBEDDERS[keys[:-1]] + "." + kind
                if take(other).shape != value.shape or not np.array_equal(tensors[other], value):
                    raise ValueError(f"{file}: {other} differs from {name}: jaxdiff's DiT has one "
                                     "time/label embedder (diffusers uses block 0's for the final layer)")
        elif keys[:-1] in _TOP:
            name = _TOP[keys[:-1]] + "." + kind
            value = take(name)
        elif keys[1] == "qkv":
            prefix = f"transformer_blocks.{keys[0].removeprefix('block_')}."
            name = " + ".join(prefix + q + "." + kind for q in _QKV)
            value = np.concatenate([take(prefix + q + "." + kind) for q in _QKV], axis=0)
        else:
            name = f"transformer_blocks.{keys[0].removeprefix('block_')}.{_BLOCK[keys[1]]}.{kind}"
            value = take(name)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{file}: {name}: dtype {value.dtype} (expected floating point)")
        value = value if keys[-1] == "embedding" else _layout(value, to_jax=True)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{file}: {name}: shape {value.shape} in jaxdiff's layout, expected {tuple(leaf.shape)}")
        return jax.numpy.asarray(value, jax.numpy.float32)

    params = jax.tree_util.tree_map_with_path(fill, shapes)
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise ValueError(f"{file}: {len(leftover)} tensor(s) not used by config.json's model, e.g. {leftover[:5]}")
    return params


def tensors_from_params(model: DiT, params) -> dict[str, np.ndarray]:
    """diffusers' tensors (torch layout, float32) of ``params``; the embedders copied into every block."""
    import jax

    tensors: dict[str, np.ndarray] = {}

    def put(path, value):
        keys = tuple(p.key for p in path)
        kind = _leaf(keys)
        value = np.asarray(value, np.float32)
        value = value if keys[-1] == "embedding" else _layout(value, to_jax=False)
        if keys[:-1] in _EMBEDDERS:
            for i in range(model.depth):
                tensors[_EMB.format(i=i) + _EMBEDDERS[keys[:-1]] + "." + kind] = value
        elif keys[:-1] in _TOP:
            tensors[_TOP[keys[:-1]] + "." + kind] = value
        elif keys[1] == "qkv":
            prefix = f"transformer_blocks.{keys[0].removeprefix('block_')}."
            for q, part in zip(_QKV, np.split(value, 3, axis=0), strict=True):
                tensors[prefix + q + "." + kind] = part
        else:
            tensors[f"transformer_blocks.{keys[0].removeprefix('block_')}.{_BLOCK[keys[1]]}.{kind}"] = value

    jax.tree_util.tree_map_with_path(put, params)
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}

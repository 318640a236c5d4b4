"""The FID Inception-v3 network in Flax Linen: pytorch-fid's ``InceptionV3([3])``, pool3 features.

The network is torchvision's ``Inception3`` as patched by pytorch-fid's ``fid_inception_v3()``
(the TensorFlow FID graph of 2015-12-05): ``Mixed_5b..5d``, ``Mixed_6b..6e`` and ``Mixed_7b``
average-pool their pool branch without counting the padding (``count_include_pad=False``),
``Mixed_7c`` max-pools it, every convolution is followed by BatchNorm (eps 0.001, inference
form, folded into the convolution here) and ReLU. The features are the global average of
``Mixed_7c``: ``[N, 2048]``.

The input pipeline is pytorch-fid's: uint8 ``/ 255`` to [0, 1], bilinear resize to 299x299
with torch's ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing, also when
downscaling: :func:`resize_bilinear`), then ``2 x - 1`` (:mod:`jaxdiff.metrics.inception_input`,
re-exported here).

Weights: pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` converted to safetensors by
``python -m jaxdiff.metrics.convert_inception IN.pth OUT.safetensors``, keys unchanged
(``Mixed_5b.branch1x1.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.metrics.inception_input import INPUT_SIZE, check_images, preprocess, resize_bilinear

__all__ = [
    "BN_EPS",
    "FEATURE_DIM",
    "INPUT_SIZE",
    "FIDInceptionV3",
    "InceptionFeatures",
    "expected_state_dict_shapes",
    "inception_from_state_dict",
    "load_inception",
    "preprocess",
    "resize_bilinear",
]

FEATURE_DIM = 2048
BN_EPS = 1e-3  # torchvision BasicConv2d: nn.BatchNorm2d(out_channels, eps=0.001)
BLOCKS = ("block0", "block1", "Mixed_5d", "Mixed_6e", "Mixed_7c", "pool3")
# Tensors of the weight file that the features do not use: accepted (shape-checked) and ignored.
OPTIONAL_SHAPES = {"fc.weight": (1008, 2048), "fc.bias": (1008,)}
_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "high": jax.lax.Precision.HIGH, "default": None}


# --------------------------------------------------------------------------- network
class BasicConv(nn.Module):
    """torchvision's ``BasicConv2d`` (conv without bias, BatchNorm, ReLU) with the BN folded in:
    ``relu(conv(x, kernel) + bias)``. ``x: [N, H, W, C] -> [N, H', W', features]``."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        (ph, pw) = self.padding
        conv = nn.Conv(self.features, self.kernel, strides=self.stride, padding=((ph, ph), (pw, pw)),
                       precision=self.precision, name="conv")
        return nn.relu(conv(x))


def _avg_pool_3x3_exclude_pad(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """pytorch-fid's ``FIDInceptionA``: ``[N, H, W, C] -> [N, H, W, 224 + pool_features]``."""

    pool_features: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision's ``InceptionB`` (``Mixed_6a``): ``[N, H, W, C] -> [N, H', W', 480 + C]``."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """pytorch-fid's ``FIDInceptionC``: ``[N, H, W, C] -> [N, H, W, 768]``."""

    channels_7x7: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision's ``InceptionD`` (``Mixed_7a``): ``[N, H, W, C] -> [N, H', W', 512 + C]``."""

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """pytorch-fid's ``FIDInceptionE_1`` (``pool="avg"``) / ``FIDInceptionE_2`` (``pool="max"``):
    ``[N, H, W, C] -> [N, H, W, 2048]``."""

    pool: str
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _avg_pool_3x3_exclude_pad(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``InceptionV3`` blocks 0-3 (the input pipeline is :func:`preprocess`).

    ``x: [N, H, W, 3]`` float in [-1, 1] (299x299 for FID; any size >= 75 runs) ->
    pool3 features ``[N, 2048]``, or with ``return_blocks=True`` a dict with ``block0``
    (after the first max pool), ``block1`` (second max pool), ``Mixed_5d``, ``Mixed_6e``
    (= pytorch-fid block 2), ``Mixed_7c`` (NHWC) and ``pool3``.
    """

    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x, return_blocks: bool = False):
        conv = functools.partial(BasicConv, precision=self.precision)
        p = {"precision": self.precision}
        out = {}
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = out["block0"] = _max_pool_3x3_stride2(x)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = out["block1"] = _max_pool_3x3_stride2(x)
        x = InceptionA(32, **p, name="Mixed_5b")(x)
        x = InceptionA(64, **p, name="Mixed_5c")(x)
        x = out["Mixed_5d"] = InceptionA(64, **p, name="Mixed_5d")(x)
        x = InceptionB(**p, name="Mixed_6a")(x)
        x = InceptionC(128, **p, name="Mixed_6b")(x)
        x = InceptionC(160, **p, name="Mixed_6c")(x)
        x = InceptionC(160, **p, name="Mixed_6d")(x)
        x = out["Mixed_6e"] = InceptionC(192, **p, name="Mixed_6e")(x)
        x = InceptionD(**p, name="Mixed_7a")(x)
        x = InceptionE("avg", **p, name="Mixed_7b")(x)
        x = out["Mixed_7c"] = InceptionE("max", **p, name="Mixed_7c")(x)
        out["pool3"] = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)), flattened
        return out if return_blocks else out["pool3"]


# --------------------------------------------------------------------------- weights
@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax param path (module names..., leaf) -> shape, from an abstract init."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)["params"]
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _conv_prefixes() -> dict[str, tuple[int, ...]]:
    """torch module prefix (``Mixed_5b.branch1x1``) -> Flax kernel shape ``(kh, kw, in, out)``."""
    return {".".join(path[:-2]): shape for path, shape in _param_shapes().items() if path[-1] == "kernel"}


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """The tensors the features need, torch names -> torch shapes (``conv.weight``: OIHW)."""
    out = {}
    for prefix, (kh, kw, cin, cout) in _conv_prefixes().items():
        out[f"{prefix}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.bn.{leaf}"] = (cout,)
    return out


def _list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(arrays: dict[str, np.ndarray], source: str = "state dict") -> None:
    """Raise ``ValueError`` naming ``source`` and the keys unless ``arrays`` holds exactly the
    FID Inception tensors (optional: ``fc.*``, ``*.bn.num_batches_tracked``) with their shapes."""
    expected = expected_state_dict_shapes()
    optional = dict(OPTIONAL_SHAPES)
    optional.update({k.replace(".running_mean", ".num_batches_tracked"): ()
                     for k in expected if k.endswith(".running_mean")})
    missing = [k for k in expected if k not in arrays]
    extra = [k for k in arrays if k not in expected and k not in optional]
    problems = []
    if missing:
        problems.append(f"missing keys: {_list(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_list(extra)}")
    shapes = {**expected, **optional}
    bad = [f"{k} {tuple(np.shape(v))} (expected {shapes[k]})" for k, v in arrays.items()
           if k in shapes and tuple(np.shape(v)) != shapes[k]]
    if bad:
        problems.append(f"wrong shapes: {_list(bad)}")
    dtypes = [f"{k} {np.asarray(arrays[k]).dtype}" for k in expected if k in arrays
              and not np.issubdtype(np.asarray(arrays[k]).dtype, np.floating)]
    if dtypes:
        problems.append(f"non-float tensors: {_list(dtypes)}")
    if problems:
        raise ValueError(f"{source}: not pytorch-fid's Inception state dict (pt_inception-2015-12-05): "
                         + "; ".join(problems))


def params_from_state_dict(arrays: dict[str, np.ndarray], source: str = "state dict") -> dict:
    """Checked torch state dict -> Flax params of :class:`FIDInceptionV3`, BatchNorm folded:
    ``kernel = W * s`` (HWIO), ``bias = beta - mean * s`` with ``s = gamma / sqrt(var + eps)``
    (computed in float64, stored float32)."""
    check_state_dict(arrays, source)
    params: dict = {}
    for prefix in _conv_prefixes():
        f64 = {k: np.asarray(arrays[f"{prefix}.{k}"], np.float64)
               for k in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")}
        s = f64["bn.weight"] / np.sqrt(f64["bn.running_var"] + BN_EPS)
        kernel = np.transpose(f64["conv.weight"], (2, 3, 1, 0)) * s  # OIHW -> HWIO, scale out channels
        bias = f64["bn.bias"] - f64["bn.running_mean"] * s
        node = params
        for name in prefix.split("."):
            node = node.setdefault(name, {})
        node["conv"] = {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}
    return params


@dataclasses.dataclass(frozen=True, eq=False)
class InceptionFeatures:
    """``features(images)``: uint8 ``[N, H, W, C]`` (``C`` in {1, 3}, any ``H, W``) -> float32
    ``[N, 2048]`` pool3 features, computed ``batch_size`` images at a time (the last batch is
    zero-padded). Two compiled functions: :func:`preprocess` (once per input size) and the
    network on ``[batch_size, 299, 299, 3]`` (once)."""

    params: dict
    batch_size: int = 50
    precision: str = "highest"
    source: str = "state dict"
    _apply: Callable = dataclasses.field(init=False, repr=False)
    _blocks: Callable = dataclasses.field(init=False, repr=False)
    _preprocess: Callable = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {self.precision!r}")
        model = FIDInceptionV3(precision=_PRECISIONS[self.precision])
        object.__setattr__(self, "_apply", jax.jit(lambda p, x: model.apply({"params": p}, x)))
        object.__setattr__(self, "_blocks", jax.jit(lambda p, x: model.apply({"params": p}, x, return_blocks=True)))
        object.__setattr__(self, "_preprocess", jax.jit(preprocess))

    def _run(self, fn, images, name):
        arr = check_images(images, name)
        n, b = arr.shape[0], self.batch_size
        outs = []
        for start in range(0, n, b):
            chunk = arr[start:start + b]
            if len(chunk) < b:
                chunk = np.concatenate([chunk, np.zeros((b - len(chunk), *arr.shape[1:]), np.uint8)])
            outs.append(fn(self.params, self._preprocess(chunk)))
        if not outs:
            shape = jax.ShapeDtypeStruct((b, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
            outs.append(jax.eval_shape(fn, self.params, shape))
            return jax.tree.map(lambda s: np.zeros((0, *s.shape[1:]), np.float32), outs[0])
        return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:n], *outs)

    def __call__(self, images) -> np.ndarray:
        """``images: [N, H, W, C]`` uint8 -> ``[N, 2048]`` float32."""
        return self._run(self._apply, images, "images")

    def blocks(self, images) -> dict[str, np.ndarray]:
        """Every block output of :class:`FIDInceptionV3` (``return_blocks=True``) as host arrays."""
        return self._run(self._blocks, images, "images")


def inception_from_state_dict(arrays: dict[str, np.ndarray], *, batch_size: int = 50, precision: str = "highest",
                              source: str = "state dict") -> InceptionFeatures:
    """The features callable from pytorch-fid's state dict given as ``name -> array`` (torch names
    and layouts). Raises ``ValueError`` naming ``source`` if keys or shapes are not the expected ones."""
    return InceptionFeatures(params_from_state_dict(arrays, source), batch_size=batch_size, precision=precision,
                             source=source)


def load_inception(path: str | os.PathLike, *, batch_size: int = 50, precision: str = "highest") -> InceptionFeatures:
    """The FID features callable from a safetensors file of pytorch-fid's Inception state dict
    (made by ``python -m jaxdiff.metrics.convert_inception``). Read with ``safetensors.numpy``:
    nothing is unpickled. ``precision`` is the matmul precision of the convolutions ("highest"
    matches torch's float32 on every backend)."""
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Inception weights file {path!r} does not exist; make it from pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth with python -m jaxdiff.metrics.convert_inception")
    try:
        arrays = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"Inception weights file {path!r} is not a readable safetensors file: {e}") from e
    return inception_from_state_dict(arrays, batch_size=batch_size, precision=precision,
                                     source=f"Inception weights file {path!r}")

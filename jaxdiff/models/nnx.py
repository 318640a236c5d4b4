"""The UNet for Flax NNX users, through ``flax.nnx.bridge`` (one Linen definition, no copy).

:class:`NNXUNet` is an ``nnx.Module`` that holds the Linen :class:`~jaxdiff.models.UNet` in an
``nnx.bridge.ToNNX`` wrapper. Its parameters are ``nnx.Param`` variables with exactly the
names and shapes of the Linen params tree, so :func:`to_linen_params` and
:func:`from_linen_params` convert both ways without loss: checkpoints of the training job,
imported weights and NNX training share one format.

Initialisation is lazy, as Linen's: the parameter shapes follow from a sample input. Pass
``sample_shape=(B, H, W, C)`` to :func:`nnx_unet` to initialise at once, or let the first call
do it (that call may be inside ``nnx.jit``).

Train and eval mode follow the NNX convention: the module has a ``deterministic`` attribute
that ``model.train()`` (``False``, the default, as ``nnx.Dropout``'s) and ``model.eval()``
(``True``) set; a call's ``train=`` keyword overrides it. Dropout keys come the NNX way: the
``rngs`` given at construction must provide a ``dropout`` stream (``nnx.Rngs(params=0,
dropout=1)``; a ``default`` stream serves both). Every call draws one key from each of the
bridge's streams (``fold_in(stream_key, count)``, then ``count += 1``; the count is module
state, so ``nnx.jit`` carries it from step to step) and passes it to
``UNet.apply(..., rngs={"params": ..., "dropout": key})``; Linen then derives each Dropout
layer's key from it and the layer's path. For the presets ``tiny`` and ``digits``
(``dropout=0``) the mode changes nothing.

Example (train with NNX, then sample)::

    import jax, jax.numpy as jnp, optax
    from flax import nnx
    import jaxdiff
    from jaxdiff.losses import diffusion_loss
    from jaxdiff.models import from_linen_params, nnx_unet, to_linen_params
    from jaxdiff.samplers import sample

    schedule = jaxdiff.linear_schedule(1000)
    model = nnx_unet("tiny", rngs=nnx.Rngs(params=0, dropout=1), sample_shape=(1, 8, 8, 1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, images, key):          # images: [B, 8, 8, 1] in [-1, 1]
        def loss_fn(model):
            return diffusion_loss(schedule, model, images, key)[0]
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    for step in range(100):
        loss = train_step(model, optimizer, images, jax.random.fold_in(jax.random.key(0), step))

    model.eval()
    samples = nnx.jit(lambda m, k: sample(schedule, m, k, (16, 8, 8, 1), num_steps=50))(
        model, jax.random.key(1))                           # [16, 8, 8, 1]

    params = to_linen_params(model)                          # the Linen UNet's params tree
    same = from_linen_params("tiny", params)                 # and back (e.g. a checkpoint's EMA params)

``tests/test_nnx.py`` runs this loop (drawing the batch inside the step), and the same loop with a user's own NNX MLP.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiff.models.presets import PRESETS, get_model
from jaxdiff.models.unet import UNet

__all__ = ["NNXUNet", "from_linen_params", "nnx_unet", "to_linen_params"]


class NNXUNet(nnx.Module):
    """``nnx.Module`` over the Linen :class:`~jaxdiff.models.UNet`: ``(x [B, H, W, C], t [B], y [B] | None)``.

    Attributes:
      unet: the Linen module (its fields are the architecture; static).
      deterministic: ``True`` in eval mode (no dropout); set by ``.train()`` / ``.eval()``.
      bridge: the ``nnx.bridge.ToNNX`` wrapper holding the ``nnx.Param`` variables and the
        ``params`` / ``dropout`` RNG streams.

    Build it with :func:`nnx_unet` or :func:`from_linen_params`.
    """

    def __init__(self, unet: UNet, *, rngs: nnx.Rngs, deterministic: bool = False):
        if not isinstance(unet, UNet):
            raise ValueError(f"unet must be a jaxdiff.models.UNet, got {type(unet).__name__}")
        if not isinstance(rngs, nnx.Rngs):
            raise ValueError(f"rngs must be an nnx.Rngs (e.g. nnx.Rngs(params=0, dropout=1)), "
                             f"got {type(rngs).__name__}")
        for stream in ("params", "dropout"):
            if stream not in rngs and "default" not in rngs:
                raise ValueError(f"rngs has no {stream!r} stream and no 'default' stream; streams: {sorted(rngs)}")
        self.unet = unet
        self.deterministic = deterministic
        self.bridge = nnx.bridge.ToNNX(unet, rngs=nnx.Rngs(params=rngs.params(), dropout=rngs.dropout()))

    @property
    def initialized(self) -> bool:
        """Whether the parameters exist (after a sample input or :func:`from_linen_params`)."""
        return bool(jax.tree.leaves(nnx.state(self.bridge, nnx.Param)))

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 train: bool | None = None) -> jax.Array:
        """Predict ``[B, H, W, C_out]``; ``train`` defaults to ``not self.deterministic``."""
        if train is None:
            train = not self.deterministic
        if not self.initialized:
            self.bridge.lazy_init(x, t, y, train=False)
        # Without dropout no key is drawn, so an eval-mode call mutates nothing (and may run
        # inside lax loops, e.g. a sampler's); a training call advances the dropout stream.
        rngs = None if train and self.unet.dropout > 0 else nnx.Rngs()
        return self.bridge(x, t, y, train=train, rngs=rngs)


def _settings(preset_or_settings, overrides: dict) -> UNet:
    """A :class:`UNet` from a preset name, a dict of UNet fields or a UNet (plus ``overrides``)."""
    if isinstance(preset_or_settings, str):
        return get_model(preset_or_settings, **overrides)
    if isinstance(preset_or_settings, UNet):
        return preset_or_settings.clone(**overrides) if overrides else preset_or_settings
    if isinstance(preset_or_settings, Mapping):
        fields = {**preset_or_settings, **overrides}
        known = set(UNet.__dataclass_fields__) - {"parent", "name"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"preset_or_settings has unknown UNet fields {unknown}; known: {sorted(known)}")
        for name in ("ch_mult", "attn_resolutions"):
            if name in fields:
                fields[name] = tuple(fields[name])
        return UNet(**fields)
    raise ValueError(
        f"preset_or_settings must be a preset name in {sorted(PRESETS)}, a dict of UNet fields or a UNet, "
        f"got {type(preset_or_settings).__name__}"
    )


def _sample_inputs(sample_shape: Sequence[int]):
    shape = tuple(sample_shape)
    if len(shape) != 4 or any(not isinstance(s, int) or s <= 0 for s in shape):
        raise ValueError(f"sample_shape must be (B, H, W, C) positive ints, got {sample_shape!r}")
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:1], jnp.int32)


def nnx_unet(preset_or_settings, *, rngs: nnx.Rngs, sample_shape: Sequence[int] | None = None,
             deterministic: bool = False, **overrides) -> NNXUNet:
    """The UNet as an ``nnx.Module``.

    Args:
      preset_or_settings: a name in :data:`~jaxdiff.models.PRESETS`, a dict of
        :class:`~jaxdiff.models.UNet` fields, or a ``UNet``.
      rngs: ``nnx.Rngs`` with ``params`` and ``dropout`` streams (or a ``default`` one).
      sample_shape: ``(B, H, W, C)``: initialise now from zeros of this shape (the parameter
        tree depends on ``H`` through ``attn_resolutions`` and on ``C``); ``None`` initialises
        on the first call.
      deterministic: start in eval mode (default: train mode, as NNX modules).
      overrides: UNet fields to change, e.g. ``num_classes=10``, ``learn_sigma=True``.
    Returns: an :class:`~jaxdiff.models.nnx.NNXUNet`.
    """
    module = NNXUNet(_settings(preset_or_settings, overrides), rngs=rngs, deterministic=deterministic)
    if sample_shape is not None:
        x, t = _sample_inputs(sample_shape)
        nnx.jit(_lazy_init)(module, x, t)
    return module


def _lazy_init(module: NNXUNet, x: jax.Array, t: jax.Array) -> None:
    module.bridge.lazy_init(x, t, train=False)


def to_linen_params(module: NNXUNet) -> dict:
    """The Linen params tree of ``module``: ``module.unet.apply({"params": p}, x, t)`` equals ``module(x, t)``."""
    if not isinstance(module, NNXUNet):
        raise ValueError(f"module must be an NNXUNet, got {type(module).__name__}")
    if not module.initialized:
        raise ValueError("module has no parameters yet: call it once or build it with sample_shape=")
    return nnx.to_pure_dict(nnx.state(module.bridge, nnx.Param))


def _flat_shapes(tree) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): (tuple(leaf.shape), jnp.dtype(leaf.dtype)) for path, leaf in flat}


def _check_same_tree(params, expected, what: str) -> None:
    got, want = _flat_shapes(params), _flat_shapes(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f"params do not match {what}: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, spec in want.items():
        if got[path] != spec:
            raise ValueError(f"params{path} has shape/dtype {got[path]}, {what} expects {spec}")


def from_linen_params(module_or_settings, params: Mapping, *, rngs: nnx.Rngs | None = None,
                      sample_shape: Sequence[int] | None = None, deterministic: bool = False,
                      **overrides) -> NNXUNet:
    """An :class:`~jaxdiff.models.nnx.NNXUNet` holding the Linen ``params`` tree (arrays are kept, not copied).

    Args:
      module_or_settings: an initialised :class:`~jaxdiff.models.nnx.NNXUNet` (its parameters are replaced in
        place, after checking that every name, shape and dtype agrees), or what
        :func:`nnx_unet` takes (a preset name, a dict of fields, a ``UNet``).
      params: the ``"params"`` collection of ``UNet.init`` (nested mappings of arrays; NumPy
        arrays are converted exactly).
      rngs: for a new module: its RNG streams (default ``nnx.Rngs(0)``; only dropout uses them).
      sample_shape: for a new module: ``(B, H, W, C)`` against which the tree is checked
        (without it a missing parameter is reported by the first call, and extra ones are unused).
      deterministic: for a new module: start in eval mode.
      overrides: UNet fields for a new module.
    Returns: the module.
    """
    if not isinstance(params, Mapping) or "conv_in" not in params:
        raise ValueError("params must be the UNet's params tree (a mapping with 'conv_in', ...)")
    params = jax.tree.map(jnp.asarray, dict(params))
    if isinstance(module_or_settings, NNXUNet):
        module = module_or_settings
        if overrides or sample_shape is not None or rngs is not None:
            raise ValueError("overrides, sample_shape and rngs are for a new module, not an existing NNXUNet")
        if module.initialized:
            _check_same_tree(params, to_linen_params(module), "the module's parameters")
    else:
        module = NNXUNet(_settings(module_or_settings, overrides), rngs=rngs if rngs is not None else nnx.Rngs(0),
                         deterministic=deterministic)
    if sample_shape is not None:
        x, t = _sample_inputs(sample_shape)
        expected = jax.eval_shape(lambda: module.unet.init(jax.random.key(0), x, t))["params"]
        _check_same_tree(params, expected, f"the UNet at sample_shape={tuple(sample_shape)}")
    for name in list(nnx.to_pure_dict(nnx.state(module.bridge, nnx.Param))):
        delattr(module.bridge, name)
    for name, subtree in params.items():
        setattr(module.bridge, name, nnx.data(jax.tree.map(nnx.Param, subtree)))
    return module

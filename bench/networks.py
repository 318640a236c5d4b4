"""The benchmark networks, defined once: each is a library preset (``jaxdiff.models.PRESETS``)
with named field overrides, the image shape it trains on and its benchmark batch.

Every script builds its networks here: the jaxdiff UNet with :func:`build` (``get_model(preset,
**overrides)``), the same architecture in diffusers with :func:`torch_unet` (its fields read
from the jaxdiff UNet instance), and the library's train state, train step and sampling call
(:func:`init_train_state`, :func:`library_train_step`, :func:`library_generate`: the only
place in ``bench/`` that calls ``jaxdiff.training``'s step and sampling functions), with the
jitted step every script times, :func:`jax_train_step`.

``python bench/networks.py`` prints the table of networks with their parameter counts.

=================  ================  =====================================================  ======
name               preset            overrides                                              params
=================  ================  =====================================================  ======
``digits``         ``digits``        ``num_classes=10`` (jaxdiff/configs/digits.py's network)        0.29M
``digits_x10``     ``digits``        ``num_classes=10, ch=64, ch_mult=(1, 2)``               2.80M
``cifar_small``    ``ddpm_cifar10``  ``ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,           1.11M
                                     dropout=0.0``
``ddpm_cifar10``   ``ddpm_cifar10``  none (Ho et al. 2020)                                  35.7M
``tiny``           ``tiny``          ``num_classes=10``                                      0.18M
``dit_s_2``        ``dit_s_2``       ``num_classes=1000`` (DiT-S/2 on 16x16x4 latents)       32.9M
=================  ================  =====================================================  ======

``digits_x10`` is the network that the first benchmark tables (2026-11-23) called "digits":
ten times the parameters of the network the README trains. It is kept under its own name so
that those tables stay interpretable and can be re-run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import numpy as np

import bench_utils as bu

STEPS_PER_SAMPLE = 2  # train steps per timed sample (one host sync per sample)


@dataclasses.dataclass(frozen=True)
class BenchNet:
    """One benchmark network: a library preset with field overrides, and the data it trains on."""

    name: str
    preset: str  # a name in jaxdiff.models.PRESETS
    overrides: dict[str, Any]  # UNet fields that differ from the preset
    image_shape: tuple[int, int, int]  # (H, W, C)
    batch: int  # the benchmark's default batch
    about: str

    @property
    def num_classes(self) -> int | None:
        return self.overrides.get("num_classes")


NETWORKS: dict[str, BenchNet] = {
    n.name: n for n in (
        BenchNet("digits", "digits", {"num_classes": 10}, (8, 8, 1), 64,
                 "jaxdiff/configs/digits.py's network (the README's): the digits preset, class-conditional; "
                 "that config's batch 64"),
        BenchNet("digits_x10", "digits", {"num_classes": 10, "ch": 64, "ch_mult": (1, 2)}, (8, 8, 1), 128,
                 "the digits preset widened to ch 64, (1, 2): 10x its parameters; called 'digits' in the "
                 "tables of 2026-11-23"),
        BenchNet("cifar_small", "ddpm_cifar10", {"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "dropout": 0.0},
                 (32, 32, 3), 16,
                 "CPU-sized 32x32x3: the DDPM CIFAR-10 preset at a quarter of its width, 3 levels, 1 ResBlock "
                 "per level, no dropout (attention at 16x16 as the preset)"),
        BenchNet("ddpm_cifar10", "ddpm_cifar10", {}, (32, 32, 3), 128,
                 "Ho et al. (2020) CIFAR-10 model, batch 128: for accelerators"),
        BenchNet("tiny", "tiny", {"num_classes": 10}, (8, 8, 1), 8,
                 "the tests' preset, class-conditional: for compilation counts"),
        BenchNet("dit_s_2", "dit_s_2", {"num_classes": 1000}, (16, 16, 4), 8,
                 "DiT-S/2 (width 384, 12 blocks, 6 heads) on 16x16x4 latents (64 tokens), 1000 classes, batch 8"),
    )
}


def get(name: str) -> BenchNet:
    if name not in NETWORKS:
        raise ValueError(f"network must be one of {sorted(NETWORKS)}, got {name!r}")
    return NETWORKS[name]


def build(net: BenchNet, dtype: str = "float32", remat: bool = False, conv_backward: str = "taps",
          time_inputs: int = 1):
    """The jaxdiff network (UNet or DiT) of ``net``: ``get_model(net.preset, **net.overrides)``."""
    import jax.numpy as jnp

    from jaxdiff.models import get_model

    return get_model(net.preset, **net.overrides, dtype=jnp.dtype(dtype), remat=remat, conv_backward=conv_backward,
                     time_inputs=time_inputs)


def param_count(net: BenchNet) -> int:
    """Parameters of the jaxdiff UNet of ``net`` (shapes only; nothing is computed)."""
    import jax
    import jax.numpy as jnp

    from jaxdiff.models import count_params

    model = build(net)
    x = jnp.zeros((1, *net.image_shape))
    t = jnp.zeros((1,), jnp.int32)
    y = None if net.num_classes is None else jnp.zeros((1,), jnp.int32)
    return count_params(jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, y))["params"])


# --------------------------------------------------------------------------- jaxdiff train step
def make_jax_batch(net: BenchNet, batch: int, seed: int = 0) -> dict:
    """A batch of uniform images in [-1, 1] ``image [B, H, W, C]``, ``index [B]`` (and ``label [B]``)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    out = {"image": jnp.asarray(rng.uniform(-1, 1, (batch, *net.image_shape)).astype(np.float32)),
           "index": jnp.arange(batch, dtype=jnp.int32)}
    if net.num_classes is not None:
        out["label"] = jnp.asarray(rng.integers(0, net.num_classes, batch).astype(np.int32))
    return out


# The library's training and sampling API enters bench/ here and nowhere else: every benchmark
# builds its train state, train step and sampling call with these three functions, so a change
# of jaxdiff.training's signatures is adapted in this one section.
def init_train_state(model, tx, image_shape: tuple[int, int, int], num_classes: int | None = None, key=None):
    """``jaxdiff.training.state.create_train_state`` of ``model`` (a UNet) with the optimizer ``tx``,
    EMA decay 0.9999 and, when conditional, label dropout 0.1 (the state holds them).

    ``image_shape`` is ``(H, W, C)``; ``key`` defaults to ``jax.random.key(0)``. Jittable with
    ``model``, ``tx``, ``image_shape`` and ``num_classes`` static.
    """
    import jax

    from jaxdiff.training.state import create_train_state

    key = jax.random.key(0) if key is None else key
    return create_train_state(key, model, tx, image_shape, num_classes=num_classes, ema_decay=0.9999,
                              label_dropout=0.1 if num_classes else 0.0)


def library_train_step(objective=None):
    """``step(state, batch, key) -> (state, metrics)``: ``jaxdiff.training.step.train_step`` of
    ``objective`` (default: the diffusion objective, epsilon prediction, uniform weighting,
    ``linear_schedule(1000)``); the network, optimizer, EMA decay and label dropout come with the
    state (:func:`init_train_state`).

    ``batch`` holds ``image [B, H, W, C]``, ``index [B]`` (and ``label [B]`` when conditional);
    ``key`` is the run's root key. Pure: the caller wraps it in ``jax.jit`` / ``pmap``.
    """
    import jaxdiff
    from jaxdiff.objectives import Diffusion
    from jaxdiff.training.step import train_step

    if objective is None:
        objective = Diffusion(schedule=jaxdiff.linear_schedule(1000))
    return functools.partial(train_step, objective=objective)


def library_generate(model, image_shape: tuple[int, int, int], *, sampler: str, num_steps: int):
    """``gen(params, key, labels) -> [N, H, W, C]``: ``jaxdiff.training.generate.generate`` for
    ``model`` on ``linear_schedule(1000)`` (``labels [N]`` int; ``N`` samples). Pure: jit it."""
    import jaxdiff
    from jaxdiff.objectives import Diffusion
    from jaxdiff.training.generate import generate

    return functools.partial(generate, Diffusion(schedule=jaxdiff.linear_schedule(1000)), model.apply,
                             image_shape=image_shape,
                             sampler=sampler, num_steps=num_steps)


def jax_train_step(net: BenchNet, batch: int, *, dtype: str = "float32", remat: bool = False,
                   donate: bool = True, conv_backward: str = "taps", objective=None, model=None):
    """The library's train step of ``net`` under ``jax.jit`` (state donated unless ``donate=False``):
    Adam 2e-4 with global-norm clipping 1.0, EMA 0.9999, label dropout 0.1 when conditional;
    ``objective`` as :func:`library_train_step` (the network gets its ``time_inputs``). ``model``:
    the network to train in place of :func:`build`'s (e.g. ``net``'s with other fields).

    Returns ``(run, info)``: ``run(k)`` does ``k`` train steps and blocks; ``info`` has the
    parameter count, the XLA FLOPs of one step, the compiled program's memory (``temp_bytes``:
    XLA's scratch for one step, the peak beyond the state and batch), the compile time and the time
    ``create_train_state`` took (it initialises the network eagerly).
    """
    import jax

    from jaxdiff.models import count_params
    from jaxdiff.training.state import make_optimizer

    if model is None:
        model = build(net, dtype=dtype, remat=remat, conv_backward=conv_backward,
                      time_inputs=getattr(objective, "time_inputs", 1))
    tx = make_optimizer(2e-4, warmup_steps=0, grad_clip=1.0)
    t0 = time.perf_counter()
    state = jax.block_until_ready(init_train_state(model, tx, net.image_shape, net.num_classes))
    init_s = time.perf_counter() - t0
    fn = jax.jit(library_train_step(objective),
                 donate_argnums=(0,) if donate else ())
    data = make_jax_batch(net, batch)
    key = jax.random.key(1)
    t0 = time.perf_counter()
    compiled = fn.lower(state, data, key).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    holder = [state]

    def run(k: int = STEPS_PER_SAMPLE):
        metrics = None
        for _ in range(k):
            holder[0], metrics = compiled(holder[0], data, key)
        jax.block_until_ready(metrics)

    mem = compiled.memory_analysis()
    info = {"params": count_params(state.params), "flops_per_step": float(cost.get("flops", float("nan"))),
            "temp_bytes": float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem is not None else float("nan"),
            "compile_s": compile_s, "init_s": init_s}
    return run, info


# --------------------------------------------------------------------------- diffusers twin
def torch_unet(model, image_shape: tuple[int, int, int]):
    """The jaxdiff UNet ``model`` as diffusers' ``UNet2DModel`` (same architecture, same parameter count).

    Read from ``model``: block widths (``ch * ch_mult``), one ResBlock stack per level
    (``layers_per_block``; the decoder has one more, as in both codebases), attention (one head,
    full width) after every ResBlock at the ``attn_resolutions`` and in the middle, dropout, and a
    class embedding table of ``num_classes + 1`` rows (null label) when conditional. Also matched:
    GroupNorm(eps=1e-6) with jaxdiff's group counts, the DDPM sinusoidal time embedding (sin
    first, ``freq_shift=1``) through two Dense layers to ``4 ch``, strided-conv downsampling and
    nearest-upsample + conv. The only difference: jaxdiff's stride-2 conv pads SAME
    (bottom/right), diffusers' pads 1 on each side (same shapes and FLOPs).
    """
    unsupported = {"learn_sigma": False, "out_channels": None, "scale_shift": False, "num_heads": 1}
    for field, plain in unsupported.items():
        if getattr(model, field) != plain:
            raise ValueError(f"torch_unet: model.{field} must be {plain!r} (no diffusers twin), got "
                             f"{getattr(model, field)!r}")
    from diffusers import UNet2DModel

    h, _, c = image_shape
    down, up, res = [], [], h
    for _ in model.ch_mult:
        down.append("AttnDownBlock2D" if res in model.attn_resolutions else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if res in model.attn_resolutions else "UpBlock2D")
        res //= 2
    twin = UNet2DModel(
        sample_size=h, in_channels=c, out_channels=c, time_embedding_type="positional",
        flip_sin_to_cos=False, freq_shift=1, down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(model.ch * m for m in model.ch_mult), layers_per_block=model.num_res_blocks,
        attention_head_dim=None, norm_num_groups=math.gcd(32, model.ch), norm_eps=1e-6, dropout=model.dropout,
        num_class_embeds=None if model.num_classes is None else model.num_classes + 1,
    )
    # diffusers takes one group count for every norm (gcd(32, ch) divides every width); jaxdiff
    # uses num_groups(channels) (32 for wide layers, fewer for narrow ones). GroupNorm's parameters
    # are per channel, so setting the count per module gives the identical network.
    import torch

    from jaxdiff.models.layers import num_groups

    for mod in twin.modules():
        if isinstance(mod, torch.nn.GroupNorm):
            mod.num_groups = num_groups(mod.num_channels)
    return twin


def torch_param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main():
    rows = [[n.name, n.preset, ", ".join(f"{k}={v}" for k, v in n.overrides.items()) or "(none)",
             "x".join(map(str, n.image_shape)), n.batch, param_count(n), n.about] for n in NETWORKS.values()]
    print(bu.table(["name", "preset", "overrides", "image", "batch", "params", "about"], rows))


if __name__ == "__main__":
    main()

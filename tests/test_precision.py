"""Mixed precision (train.compute_dtype, train.param_dtype) and gradient accumulation (train.microbatches)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff import data
from jaxdiff.configs import digits_meanflow
from jaxdiff.training import resume
from jaxdiff.training.setup import resolve, validate_config
from jaxdiff.training.state import create_train_state
from jaxdiff.training.step import train_step

from training_utils import tiny_config

BATCH = 16


def _shrink(config):
    """The tiny UNet of training_utils.tiny_config on another objective's config."""
    tiny = tiny_config()
    for k in ("ch", "norm_groups", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout"):
        config.model[k] = tiny.model[k]
    config.train.global_batch_size = BATCH
    config.train.warmup_steps = 0
    return config


def _dit_config(**train):
    config = tiny_config(**train)
    config.model.preset = "dit_digits"
    for k in ("ch", "norm_groups", "ch_mult", "num_res_blocks", "attn_resolutions"):
        config.model[k] = None
    return config


def _train(config, num_steps: int = 3):
    """(host state, [[loss, grad_norm] per step]) of ``num_steps`` jitted steps of ``config`` on one device."""
    run = resolve(config, num_devices=1)
    tr = config.train
    state = create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape, num_classes=run.num_classes,
                               ema_decay=0.9, label_dropout=tr.label_dropout, param_dtype=run.param_dtype)
    step = jax.jit(functools.partial(train_step, objective=run.objective, microbatches=tr.microbatches))
    losses = []
    for s in range(num_steps):
        batch = data.get_batch(run.source, s, global_batch_size=BATCH, seed=0)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(1))
        assert float(metrics["finite"]) == 1.0
        losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return jax.device_get(state), np.array(losses)


def _float_dtypes(tree) -> set:
    return {str(a.dtype) for a in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}


@pytest.mark.parametrize("make", [tiny_config, _dit_config], ids=["unet", "dit"])
def test_bf16_compute_tracks_float32_and_keeps_float32_master_weights(make):
    _, ref = _train(make(warmup_steps=0), num_steps=4)
    state, got = _train(make(warmup_steps=0, compute_dtype="bfloat16"), num_steps=4)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%); after 4 steps the losses agree within
    # 1% (measured: within 2e-4 for the UNet and the DiT).
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=0.01)
    assert not np.allclose(got[:, 0], ref[:, 0], rtol=1e-6), "the bf16 run computed in float32"
    for part in (state.params, state.opt_state, state.ema_params):
        assert _float_dtypes(part) == {"float32"}


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _eqns(inner)


@pytest.mark.parametrize("make", [tiny_config, _dit_config], ids=["unet", "dit"])
def test_bf16_network_computes_in_bf16_with_float32_statistics_and_softmax(make):
    run = resolve(make(compute_dtype="bfloat16"), num_devices=1)
    state = create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape, num_classes=run.num_classes)
    x = jnp.zeros((2, *run.image_shape), jnp.float32)
    t, y = jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32)
    apply = jax.jit(functools.partial(run.model.apply, capture_intermediates=True))
    out, inter = apply({"params": state.params}, x, t, y)
    assert out.dtype == jnp.float32  # the loss is computed in float32
    acts = {"/".join(path): v.dtype for path, v in
            ((tuple(str(getattr(k, "key", k)) for k in p), v) for p, v in
             jax.tree_util.tree_flatten_with_path(inter["intermediates"])[0])}
    inner = {k: d for k, d in acts.items() if k.count("/") > 1}  # the layers inside blocks
    assert inner and all(d == jnp.bfloat16 for d in inner.values()), acts
    jaxpr = jax.make_jaxpr(lambda p: run.model.apply({"params": p}, x, t, y))(state.params).jaxpr
    eqns = list(_eqns(jaxpr))
    dots = [e for e in eqns if e.primitive.name in ("dot_general", "conv_general_dilated")]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars), "matmuls in bf16"
    # Norm statistics (mean, variance) and the softmax (max, sum) are reductions: all in float32.
    reductions = [e for e in eqns if e.primitive.name in ("reduce_sum", "reduce_max", "reduce_precision")
                  or e.primitive.name.startswith("reduce_")]
    assert reductions and all(v.aval.dtype == jnp.float32 for e in reductions for v in e.invars)
    exps = [e for e in eqns if e.primitive.name == "exp"]  # the softmax's exponentials
    assert all(v.aval.dtype == jnp.float32 for e in exps for v in e.invars)


def test_bf16_params_keep_optimizer_state_and_ema_in_bf16():
    config = tiny_config(warmup_steps=0, compute_dtype="bfloat16", param_dtype="bfloat16")
    state, losses = _train(config, num_steps=2)
    assert np.all(np.isfinite(losses))
    for part in (state.params, state.opt_state, state.ema_params):
        assert _float_dtypes(part) == {"bfloat16"}


def _meanflow_config(**train):
    config = _shrink(digits_meanflow.get_config())
    for k, v in train.items():
        config.train[k] = v
    return config


@pytest.mark.parametrize("make", [lambda **kw: tiny_config(warmup_steps=0, **kw), _meanflow_config],
                         ids=["diffusion", "meanflow"])
def test_four_microbatches_give_the_update_of_one_batch(make):
    ref, ref_losses = _train(make(), num_steps=2)
    got, losses = _train(make(microbatches=4), num_steps=2)
    # the losses and the gradients' norms (Adam would hide a wrongly scaled sum in the params)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves((got.params, got.ema_params, got.opt_state)),
                    jax.tree_util.tree_leaves((ref.params, ref.ema_params, ref.opt_state))):
        # atol: Adam normalises near-zero gradients, so another summation order moves ~1e-6 params by ~1e-5
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


def test_bad_precision_and_accumulation_settings_raise():
    with pytest.raises(ValueError, match=r"config\.train\.microbatches=3: must divide the per-device batch of 8"):
        validate_config(tiny_config(microbatches=3), num_devices=2)
    with pytest.raises(ValueError, match=r"config\.train\.microbatches=0"):
        validate_config(tiny_config(microbatches=0))
    with pytest.raises(ValueError, match=r"config\.train\.compute_dtype='float16'"):
        validate_config(tiny_config(compute_dtype="float16"))
    with pytest.raises(ValueError, match=r"config\.train\.param_dtype='int8'"):
        validate_config(tiny_config(param_dtype="int8"))
    with pytest.raises(ValueError, match=r"config\.train\.peak_flops=-1"):
        validate_config(tiny_config(peak_flops=-1.0))
    config = tiny_config()
    config.model.dtype = "bfloat16"
    with pytest.raises(ValueError, match=r"config\.model\.dtype='bfloat16': was replaced by config\.train\.compute_dtype"):
        validate_config(config)


def test_step_rejects_a_batch_that_does_not_divide_into_microbatches():
    run = resolve(tiny_config(), num_devices=1)
    state = create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape, num_classes=run.num_classes)
    batch = {"image": jnp.zeros((6, 8, 8, 1)), "index": jnp.arange(6), "label": jnp.zeros((6,), jnp.int32)}
    with pytest.raises(ValueError, match="microbatches=4 must be a positive integer dividing the batch of 6"):
        train_step(state, batch, jax.random.key(0), run.objective, microbatches=4)


def test_a_workdir_of_the_former_model_dtype_resumes():
    """A config saved before train.compute_dtype existed has model.dtype: it reads as train.compute_dtype."""
    current = tiny_config().to_dict()
    saved = tiny_config().to_dict()
    for k in ("compute_dtype", "param_dtype", "microbatches", "peak_flops"):
        del saved["train"][k]
    saved["model"]["dtype"] = "float32"
    assert resume.config_changes(saved, current) == {}
    saved["model"]["dtype"] = "bfloat16"
    assert resume.config_changes(saved, current) == {"train.compute_dtype": ("bfloat16", "float32")}
    resume.check_resume(saved, current, workdir="w", step=1)  # may change on resume


def test_microbatches_over_a_sharded_batch_give_the_one_device_update():
    """jit over 4 devices, each holding 4 of the 16 examples, 2 microbatches (of 2 per device)."""
    from jaxdiff.training.parallel import DataParallel

    config = tiny_config(warmup_steps=0, microbatches=2)
    ref, _ = _train(tiny_config(warmup_steps=0), num_steps=2)
    run = resolve(config, num_devices=4)
    host = jax.device_get(create_train_state(jax.random.key(0), run.model, run.tx, run.image_shape,
                                             num_classes=run.num_classes, ema_decay=0.9,
                                             label_dropout=config.train.label_dropout))
    par = DataParallel("sharding", devices=jax.devices()[:4])
    step = par.compile_step(functools.partial(train_step, objective=run.objective, microbatches=2))
    state = par.put_state(host)
    for s in range(2):
        state, _ = step(state, par.put_batch(data.get_batch(run.source, s, global_batch_size=BATCH, seed=0)),
                        jax.random.key(1))
    got = par.get_state(state)
    for a, b in zip(jax.tree_util.tree_leaves(got.params), jax.tree_util.tree_leaves(ref.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-5)


@pytest.mark.slow  # an end-to-end run: about a minute
def test_a_bf16_run_trains_checkpoints_and_restores_with_its_dtypes(tmp_path):
    from jaxdiff.training import loop
    from jaxdiff.training.workdir import load_workdir

    config = tiny_config(num_steps=2, checkpoint_every=2, compute_dtype="bfloat16", param_dtype="bfloat16")
    final = loop.train_and_evaluate(config, str(tmp_path))
    assert _float_dtypes((final.params, final.opt_state, final.ema_params)) == {"bfloat16"}
    loaded = load_workdir(str(tmp_path))
    assert loaded.run.model.dtype == jnp.bfloat16
    assert _float_dtypes((loaded.params, loaded.ema_params)) == {"bfloat16"}
    for a, b in zip(jax.tree_util.tree_leaves(loaded.ema_params), jax.tree_util.tree_leaves(final.ema_params)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))

"""Shared pieces of the training tests: a tiny config and subprocess helpers."""

import os
import subprocess
import sys

import jax
import numpy as np

from jaxdiff.configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
    """The digits config shrunk to a model and schedule that compile and run in seconds."""
    config = digits.get_config()
    config.model.ch = 8
    config.model.norm_groups = 8  # the digits preset's 16 groups need 16 channels
    config.model.ch_mult = (1,)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.dropout = 0.1  # exercise the per-example dropout keys
    config.diffusion.num_timesteps = 100
    config.train.global_batch_size = 16
    config.train.num_steps = 6
    config.train.warmup_steps = 2
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.train.sample_every = 0
    config.sample.num_steps = 2
    config.sample.num_samples = 10
    config.eval.final_samples = 0  # tests of the sample-quality hook turn it on
    for k, v in train.items():
        config.train[k] = v
    return config


TINY_FLAGS = [
    "--config.model.ch=8", "--config.model.norm_groups=8", "--config.model.ch_mult=(1,)", "--config.model.num_res_blocks=1",
    "--config.model.attn_resolutions=(8,)", "--config.model.dropout=0.1",
    "--config.diffusion.num_timesteps=100", "--config.train.global_batch_size=16",
    "--config.train.warmup_steps=2", "--config.train.log_every=1", "--config.train.sample_every=0",
    "--config.sample.num_steps=2", "--config.sample.num_samples=10", "--config.eval.final_samples=0",
]


def train_command(workdir, *extra):
    return [sys.executable, "-m", "jaxdiff.scripts.train", "--config",
            os.path.join(ROOT, "jaxdiff", "configs", "digits.py"), f"--workdir={workdir}", *TINY_FLAGS, *extra]


def subprocess_env(num_devices: int):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(cmd, env, timeout=600):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stderr[-4000:]}"
    return proc


def final_params(workdir):
    """The params and EMA params of the latest checkpoint in ``workdir``, as flat NumPy lists."""
    import orbax.checkpoint as ocp

    from jaxdiff.training.workdir import load_workdir  # noqa: F401  (imports the stack)

    path = os.path.join(workdir, "checkpoints")
    manager = ocp.CheckpointManager(path, item_names=("state", "config"))
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = restored["state"]
    manager.close()
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves((state["params"], state["ema_params"]))]
    return step, leaves

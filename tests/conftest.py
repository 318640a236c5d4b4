"""Test configuration: 8 fake CPU devices and strict rank promotion, set before JAX is imported."""

import os

# XLA's backend optimisation level 0 compiles the UNet's train step ~3x faster on CPU and
# the tests' tiny models run no slower; numerics are the same IEEE float32 operations.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + TEST_XLA_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# One persistent compilation cache for the whole run (xdist workers and the training
# subprocesses too): the same train step is compiled once, not once per test.
CACHE_DIR = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxdiff-test-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    """A workdir of 2 training steps of the tiny class-conditional digits config (one per test module)."""
    from jaxdiff.training import loop

    from training_utils import tiny_config

    workdir = str(tmp_path_factory.mktemp("run"))
    loop.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), workdir)
    return workdir

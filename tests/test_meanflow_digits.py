"""The digits MeanFlow config trains to class-correct digits at one and two steps (slow).

Reference: the offline digits classifier shipped with the package (``jaxdiff.metrics.digits``,
trained on real digits alone; 97% on the held-out real digits), which reads each generated image's class.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiff.configs import digits_meanflow
from jaxdiff.metrics.digits import DigitsClassifier, load_params
from jaxdiff.training import loop
from jaxdiff.training.generate import sample_workdir

STEPS = 1000  # a third of the config's run: enough for legible one-step digits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    config = digits_meanflow.get_config()
    config.train.num_steps = STEPS
    config.train.sample_every = 0
    config.train.checkpoint_every = STEPS
    config.eval.final_samples = 0
    wd = str(tmp_path_factory.mktemp("meanflow"))
    loop.train_and_evaluate(config, wd)
    return wd


def _accuracy(npz):
    data = np.load(npz)
    x = jnp.asarray(data["images"], jnp.float32) / 127.5 - 1.0
    logits = DigitsClassifier().apply({"params": load_params()}, x)
    return float(np.mean(np.asarray(jnp.argmax(logits, -1)) == data["labels"]))


@pytest.mark.slow
@pytest.mark.parametrize("steps", [1, 2])
def test_one_and_two_step_samples_are_the_digits_asked_for(workdir, tmp_path, steps):
    out = sample_workdir(workdir, os.path.join(tmp_path, f"s{steps}.npz"), num_samples=200, num_steps=steps)
    assert _accuracy(out) > 0.85
    assert jax.numpy.isfinite(np.load(out)["images"].astype(np.float32)).all()

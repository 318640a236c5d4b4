"""MNIST (28x28x1) with the ``small`` UNet.

Prepare once (needs TensorFlow and a download)::

    pip install -e '.[prepare]' && python -m jaxdiff.prepare mnist

Train::

    jaxdiff-train --config jaxdiff/configs/mnist.py --workdir workdir/mnist

Expect recognisable digits after ~20k steps (a few hours on one GPU; far longer on CPU).
"""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.data.name = "mnist"
    config.model.preset = "small"
    config.model.class_conditional = True
    config.train.num_steps = 50_000
    config.train.warmup_steps = 1000
    config.train.ema_decay = 0.9995
    config.train.checkpoint_every = 2000
    config.train.sample_every = 5000
    config.sample.num_samples = 100
    return config

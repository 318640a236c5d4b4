"""The embedded offline default: a class-conditional UNet on scikit-learn's 8x8 digits.

Command (from the repository root)::

    jaxdiff-train --config jaxdiff/configs/digits.py --workdir workdir/digits

Expect on 2 CPU cores: 3,000 steps of batch 64 at about 500 images/s, about 10 minutes in
all with the final evaluation below, a final loss near 0.075, and
``workdir/digits/samples/final.png``: a 10x10 grid whose row r holds digit r, legible to a
person (classifier-free guidance scale 2, 50 DDIM steps). At the end the job scores 1,000
samples of the final model (``config.eval.final_samples``) in the offline digits network's
features (:mod:`jaxdiff.training.quality`), printed and written to ``metrics.jsonl`` and
``eval_final.json``: expect a digits FD near 10.7 against the 360 held-out digits, where real
digits score 5.6 (the floor); precision near 0.96, recall near 0.65. The evaluation takes one
to two minutes on 2 CPU cores (100,000 network calls); for a smoke run turn it down, e.g.
``--config.train.num_steps=40 --config.eval.final_samples=50``.
"""

from jaxdiff.configs import default


def get_config():
    config = default.get_config()
    config.model.class_conditional = True
    config.train.num_steps = 3000
    config.train.global_batch_size = 64
    config.train.learning_rate = 1e-3
    config.train.ema_decay = 0.995
    config.train.sample_every = 1000
    config.sample.num_samples = 100
    config.sample.guidance = 2.0
    config.eval.final_samples = 1000  # the digits FD of the final model (jaxdiff.training.quality)
    return config

"""Consistency training (iCT, Song & Dhariwal 2023) on the offline digits: one- and two-step samples.

Command::

    jaxdiff-train --config jaxdiff/configs/digits_consistency.py --workdir workdir/digits_consistency
    jaxdiff-sample --workdir workdir/digits_consistency --steps 2

The digits setup (the same UNet) trained as a consistency function ``f(x, sigma)`` with iCT's
recipe (``jaxdiff.consistency``: pseudo-Huber loss, log-normal levels, the N = 10 -> 1280
curriculum over the run's 3,000 steps, no EMA teacher), sampled by the ``consistency`` sampler
in one evaluation (``--steps 2``: two).

Expect on 2 CPU cores about 5 minutes and a digits FD near 29 at one step (17 with ``--guidance 2``),
8 at two and 7.6 at four (guidance 1).
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.objective = "consistency"
    config.diffusion.consistency.curriculum_steps = config.train.num_steps
    config.sample.sampler = "consistency"
    config.sample.num_steps = 1
    config.sample.guidance = 1.0
    return config

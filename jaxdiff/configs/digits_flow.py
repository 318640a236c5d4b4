"""Flow matching (rectified flow) on the offline digits: the digits setup with a velocity target.

Command::

    jaxdiff-train --config jaxdiff/configs/digits_flow.py --workdir workdir/digits_flow

The same UNet predicts the velocity ``eps - x0`` of the linear interpolant
``x_t = (1 - t) x0 + t eps`` (``jaxdiff.flow``); samples come from 50 Euler steps of the learned
ODE on the Karras sigma grid (or ``--sampler heun``: 2n - 1 NFE), with classifier-free guidance.
Expect digits of about the quality of ``jaxdiff/configs/digits.py`` in
the same time (about 10 minutes on 2 CPU cores).
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.objective = "flow_matching"
    config.sample.sampler = "euler"
    config.sample.num_steps = 50
    return config

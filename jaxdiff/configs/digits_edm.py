"""EDM (Karras et al. 2022) on the offline digits: the digits setup with EDM's preconditioning, loss and sampler.

Command::

    jaxdiff-train --config jaxdiff/configs/digits_edm.py --workdir workdir/digits_edm

The same class-conditional UNet is the raw network ``F`` of the denoiser
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (``jaxdiff.edm``), trained with EDM's loss
(``ln sigma ~ N(-1.2, 1.2^2)``, ``sigma_data = 0.5``); samples come from EDM Algorithm 2
(deterministic Heun, 18 steps = 35 network evaluations, ``sigma`` from 80 to 0.002) with
classifier-free guidance 2. Expect, after ``--config.train.num_steps=1500`` (about 4 minutes on a
quiet 2-core machine), a loss near 0.44 (EDM's weighted loss: ``lambda(sigma)`` times the denoiser's
squared error, about 1.5 at the start; ``x0_mse`` near 0.044) and legible digits in
``workdir/digits_edm/samples/final.png`` (row r holds digit r); they are already legible at step 1,000.
The default 3,000 steps take about as long as ``jaxdiff/configs/digits.py``.

Post-hoc EMA (EDM2) is on: EMAs of ``sigma_rel`` 0.05 and 0.10 are tracked (two extra copies of the
~1 MB of parameters) and snapshotted every 500 steps to ``workdir/digits_edm/posthoc_ema/``; then::

    jaxdiff-posthoc-ema --workdir workdir/digits_edm --sigma_rel 0.08
    jaxdiff-sample --workdir workdir/digits_edm --ema sigma_rel=0.08 --output ema008.npz
"""

from jaxdiff.configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.objective = "edm"
    config.sample.sampler = "edm"
    config.sample.num_steps = 18
    config.train.posthoc_ema.sigma_rels = (0.05, 0.10)
    config.train.posthoc_ema.snapshot_every = 500
    return config

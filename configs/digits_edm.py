"""EDM (Karras et al. 2022) on the offline digits: the digits setup with EDM's preconditioning, loss and sampler.

Command::

    python scripts/train.py --config configs/digits_edm.py --workdir workdir/digits_edm

The same class-conditional UNet is the raw network ``F`` of the denoiser
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (``jaxdiff.edm``), trained with EDM's loss
(``ln sigma ~ N(-1.2, 1.2^2)``, ``sigma_data = 0.5``); samples come from EDM Algorithm 2
(deterministic Heun, 18 steps = 35 network evaluations, ``sigma`` from 80 to 0.002) with
classifier-free guidance 2. Expect legible digits in ``workdir/digits_edm/samples/final.png``
(row r holds digit r) after about 1,500 steps (a final loss near 0.2 (EDM's weighted loss is
not on the scale of the epsilon loss), about 4 minutes on 2 CPU cores); the full 3,000 steps take
about as long as ``configs/digits.py``.
"""

from configs import digits


def get_config():
    config = digits.get_config()
    config.diffusion.objective = "edm"
    config.sample.sampler = "edm"
    config.sample.num_steps = 18
    return config

"""The README's Python examples run as written (in one process, in order), so they cannot rot.

The pretrained-model example loads a local ``ddpm-cifar10-32`` folder; the test writes a small
random-weight pipeline folder in the same layout (``unet/`` + ``scheduler/``, 32x32x3) there, and the
autoencoder example's ``sd-vae-ft-ema`` a tiny random-weight ``AutoencoderKL`` folder with f = 8.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pipeline_folder(path: str) -> None:
    from jaxdiff.models import SamplingDefaults, get_model, to_diffusers_pipeline
    from jaxdiff.schedules import linear_schedule

    model = get_model("tiny", norm_groups=8, attn_resolutions=())
    x = jnp.zeros((1, 32, 32, 3))
    params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
    sampling = SamplingDefaults(sampler="ddim", prediction="epsilon", clip_x0=True, variance=None, eta=0.0,
                                num_steps=None)
    to_diffusers_pipeline(model, params, linear_schedule(1000), path, sampling=sampling, sample_size=32)


def _vae_folder(path: str) -> None:
    from jaxdiff.models import AutoencoderKL, to_diffusers

    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), norm_num_groups=4)  # f = 8, as sd-vae-ft-ema
    to_diffusers(vae, vae.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"], path)


def test_readme_python_examples_run(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 3, "the README lost its examples"
    _pipeline_folder(str(tmp_path / "ddpm-cifar10-32"))
    _vae_folder(str(tmp_path / "sd-vae-ft-ema"))  # the autoencoder example's folder, random weights
    script = tmp_path / "readme_examples.py"
    checks = ("\nassert samples.shape == (512, 2) and bool(jnp.all(jnp.isfinite(samples)))"
              "\nassert loss.shape == () and bool(jnp.isfinite(loss))"
              "\nassert images.shape == (64, 32, 32, 3) and bool(jnp.all(jnp.isfinite(images)))"
              "\nassert mean.shape == (4, 4, 4, 4) and decoded.shape == (4, 32, 32, 3)"
              "\nimport os; assert os.path.exists('ddpm_cifar10_ddim50.png')\n")
    script.write_text("\n\n".join(blocks) + checks, encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_names_the_inception_weights_the_converter_checks():
    from jaxdiff.metrics.convert_inception import FID_WEIGHTS_URL

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert FID_WEIGHTS_URL in f.read()

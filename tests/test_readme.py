"""The README's Python examples run as written (in one process, in order), so they cannot rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_examples_run(tmp_path):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert len(blocks) >= 2, "the README lost its examples"
    script = tmp_path / "readme_examples.py"
    checks = "\nassert samples.shape == (512, 2) and bool(jnp.all(jnp.isfinite(samples)))\n" \
             "assert loss.shape == () and bool(jnp.isfinite(loss))\n"
    script.write_text("\n\n".join(blocks) + checks, encoding="utf-8")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

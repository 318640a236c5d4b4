"""The documentation builds strictly: a broken cross-reference or a docstring formatting error fails.

Needs the ``docs`` extra (``pip install -e '.[docs]'``); skipped without Sphinx.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_docs_build_strict(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-E", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), os.path.join(ROOT, "docs"), str(tmp_path / "html")]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert os.path.exists(tmp_path / "html" / "_autosummary" / "jaxdiff.samplers.html")

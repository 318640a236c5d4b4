"""The quickstart notebook runs top to bottom (on a short budget) and its cells' assertions hold.

The cell tagged ``parameters`` is replaced by a short budget, as papermill would; the notebook
runs in a temporary directory with nbclient and fails on any error.
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
SHORT_BUDGET = 'NUM_STEPS = 60\nRESUME_STEPS = 10\nOWN_NET_STEPS = 60\nWORKDIR = "workdir/quickstart"'


def test_notebook_has_no_stale_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, "commit the notebook without outputs"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "the notebook needs one cell tagged 'parameters'"
    params[0].source = SHORT_BUDGET
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = ROOT + (os.pathsep + env_path if env_path else "")
    try:
        client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        client.execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    assert os.path.exists(tmp_path / "workdir" / "quickstart" / "samples" / "final.png")

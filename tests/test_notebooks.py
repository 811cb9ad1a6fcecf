"""The notebooks in colab/ run top to bottom (the smoke configs; training shortened through
TML_NOTEBOOK_STEPS), each in a fresh kernel and folder, and are stored without outputs."""

import glob
import os

import pytest
from conftest import JIT_CACHE_ENV

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))


def test_there_are_five_topics_stored_without_outputs():
  assert [os.path.basename(p)[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_"]
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path}: outputs in git"
    assert "TML_JAX_SOURCE" in nb.cells[1].source  # the set-up cell comes first


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TML_NOTEBOOK_STEPS", "8")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  for k, v in JIT_CACHE_ENV.items():  # the kernel compiles the smoke programs other tests did
    monkeypatch.setenv(k, v)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError naming the cell on any failure
  images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.outputs)
  assert images >= 2, f"{path}: only {images} inline images"

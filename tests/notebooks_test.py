"""Executes every notebook in notebooks/ at CI size (TINY=1) with nbclient.

Each notebook runs in a fresh kernel of this interpreter; a cell that
raises fails the test with the cell's traceback.
"""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] /
                    "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_found():
  assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "paging_study",
                                         "allocation"}


@pytest.mark.long
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TINY", "1")
  monkeypatch.setenv("NOTEBOOK_WORKDIR", str(tmp_path))
  # The kernel is `python` on PATH: make it this interpreter.
  monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep
                     + os.environ.get("PATH", ""))
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=300, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code"
             for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert any(o.get("output_type") == "stream" and o.get("name") == "stdout"
             for o in outputs)  # it printed its results

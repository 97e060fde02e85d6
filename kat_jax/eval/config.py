"""`config.eval`: its fields, their checks and the checkpoint list it names."""

from __future__ import annotations

import warnings

from ml_collections import ConfigDict

from kat_jax.errors import ConfigError
from kat_jax.field_checks import at_least, check_section
from kat_jax.sampling.autothink import THINK_MODES

BENCHMARKS = ("generated", "humaneval", "jsonl")


def eval_fields() -> ConfigDict:
  """`config.eval` with its defaults."""
  return ConfigDict(dict(
      checkpoints="",  # comma-separated HF dirs / run workdirs / 'random'; empty = random
      benchmarks="generated,humaneval",  # any of generated, humaneval, jsonl
      jsonl_paths="",  # comma-separated user JSONL (question, answer, verifier)
      num_generated=100,  # generated dual-regime tasks
      generated_seed=9876,  # held out: SFT uses data_seed 1234..1236, RL task_seed 4321..4322
      hard_fraction=0.5,
      humaneval_limit=0,  # first N HumanEval problems; 0 = all 164
      num_samples=1,  # responses per task (pass@k needs k <= num_samples)
      ks="1",  # comma-separated k of pass@k
      think_mode="auto",  # 'auto' (model chooses), 'on' / 'off' (forced by prefill)
      max_new_tokens=256,
      temperature=0.0,  # 0 = greedy
      batch_size=64,
      workers=4,  # concurrent verifier workers (sandbox / SymPy)
      item_timeout_s=30.0,
  ))


RANDOM = "random"  # the checkpoint spec of a random init of `config.model`


def split_list(text: str) -> list[str]:
  return [p for p in (s.strip() for s in text.split(",")) if p]


def checkpoint_specs(text: str) -> list[str]:
  """Specs of `config.eval.checkpoints`: paths or `RANDOM`; an empty string is [RANDOM].

  An empty entry (",runs/sft") is an error rather than a silent random init: write `random`.
  (A directory named `random` is written `./random`.)
  """
  if not text.strip():
    return [RANDOM]
  specs = [s.strip() for s in text.split(",")]
  if "" in specs:
    raise ConfigError(f"config.eval.checkpoints {text!r} has an empty entry; write "
                      f"'{RANDOM}' for a random init of config.model")
  return specs


def check_fields(ev: ConfigDict) -> list[int]:
  """Validates `config.eval`; returns the ks."""
  unknown = sorted(set(split_list(ev.benchmarks)) - set(BENCHMARKS))
  if unknown or not split_list(ev.benchmarks):
    raise ConfigError(f"config.eval.benchmarks {ev.benchmarks!r}: want a comma-separated "
                      f"subset of {BENCHMARKS}")
  if "jsonl" in split_list(ev.benchmarks) and not split_list(ev.jsonl_paths):
    raise ConfigError("config.eval.benchmarks has 'jsonl' but config.eval.jsonl_paths is empty")
  if ev.think_mode not in THINK_MODES:
    raise ConfigError(f"config.eval.think_mode {ev.think_mode!r} not in {THINK_MODES}")
  check_section(ev, "eval", {
      **{name: at_least(1) for name in ("num_generated", "num_samples", "max_new_tokens",
                                        "batch_size", "workers")},
      "humaneval_limit": at_least(0)})
  try:
    ks = [int(k) for k in split_list(ev.ks)]
  except ValueError:
    raise ConfigError(f"config.eval.ks {ev.ks!r}: want comma-separated integers") from None
  if not ks or min(ks) < 1 or max(ks) > ev.num_samples:
    raise ConfigError(f"config.eval.ks {ev.ks!r}: each k must be in [1, num_samples="
                      f"{ev.num_samples}]")
  if ev.num_samples > 1 and ev.temperature == 0:
    warnings.warn(f"config.eval.num_samples={ev.num_samples} with temperature=0: greedy "
                  "samples are identical, so pass@k equals pass@1; set temperature > 0")
  return ks

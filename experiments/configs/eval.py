"""Evaluate checkpoints on generated dual-regime tasks, HumanEval and user JSONL.

  python -m experiments.run --config experiments/configs/eval.py \
      --config.eval.checkpoints=random,runs/sft,runs/srpo_tiny
  python -m experiments.run --config experiments/configs/eval.py \
      --config.eval.checkpoints=/path/to/hf_dir --config.data.tokenizer=qwen2.5 \
      --config.eval.benchmarks=humaneval --config.eval.num_samples=10 --config.eval.ks=1,10 \
      --config.eval.temperature=0.8

Writes <workdir>/eval_results.json, eval_samples.jsonl and eval_comparison.png.
"""

from experiments.configs.base import base_config
from kat_jax.eval.config import eval_fields


def get_config():
  config = base_config()
  config.stage = "eval"
  config.workdir = "runs/eval"
  config.eval = eval_fields()
  return config

"""Agentic RL on prefix trees with the `tiny` model on a CPU (the easy `digits` environment).

  python -m experiments.run --config experiments/configs/agentic_rl.py

Each step: 4 tasks x a tree of 8 two-turn episodes (branching "4,2": 4 copies at turn 0,
2 at turn 1, sharing the first turn), GRPO advantages per tree, depth-first packed trees,
one policy update (gradients summed over micro-batches of `micro_batch_rows` rows). Real
environments: `--config.agentic.env=repo_repair` (or `python`) with a model that can write
tool calls (`--config.model.init_from=...`, `--config.data.tokenizer=qwen2.5`, more
turns/tokens). Compare packing with `--config.agentic.pack=unrolled` (the same update on
2.7x more tokens); prune with `--config.agentic.prune_budget=600`; roll out one batch ahead
of the trainer with `--config.agentic.max_staleness=1` (on devices of their own with
`--config.agentic.rollout_devices=N`).
"""

from experiments.configs.base import base_config
from kat_jax.agentic.config import agentic_fields


def get_config():
  config = base_config()
  config.stage = "agentic_rl"
  config.workdir = "runs/agentic_rl"
  config.optim.lr = 2e-3
  config.optim.warmup_steps = 2
  config.optim.weight_decay = 0.0
  config.train.steps = 30
  config.train.log_every = 5
  config.train.loss_chunk = 512
  config.agentic = agentic_fields()
  config.agentic.env = "digits"
  config.agentic.env_kwargs = {"rounds": 2, "width": 4, "threshold": 0.5}
  config.agentic.branching = "4,2"
  config.agentic.max_turns = 2
  config.agentic.max_new_tokens = 4
  config.agentic.max_length = 384
  config.agentic.vocab_limit = 128  # ASCII bytes
  config.agentic.success_threshold = 0.5
  config.agentic.seq_len = 512
  config.agentic.micro_batch_rows = 2
  return config

"""Step-SRPO on the generated dual-regime tasks, starting from a cold-start SFT run.

  python -m experiments.run --config experiments/configs/sft.py --config.workdir=runs/sft
  python -m experiments.run --config experiments/configs/step_srpo.py \
      --config.rl.init_sft_workdir=runs/sft

Writes `rl_curves.json/.png` (reward, think-on rate on easy and hard prompts, tokens per
response) and `rl_summary.json` (held-out greedy evaluation) under the workdir.
"""

from experiments.configs.base import base_config
from kat_jax.autothink.stage import autothink_fields
from kat_jax.rl.stage import rl_fields


def get_config():
  config = base_config()
  config.stage = "step_srpo"
  config.workdir = "runs/step_srpo"
  config.autothink = autothink_fields()  # the SFT run's fields, for loading its model
  config.rl = rl_fields()
  config.rl.steps = 40
  config.rl.temperature = 0.6  # enough correct samples for a judge signal at tiny scale
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 2
  config.optim.weight_decay = 0.0
  config.train.checkpoint_every = 10
  return config

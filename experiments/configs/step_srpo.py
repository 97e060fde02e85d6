"""Step-SRPO on the generated dual-regime tasks, starting from a cold-start SFT run.

  python -m experiments.run --config experiments/configs/sft.py --config.workdir=runs/sft
  python -m experiments.run --config experiments/configs/step_srpo.py \
      --config.rl.init_sft_workdir=runs/sft

Writes `rl_curves.json/.png` (reward, think-on rate on easy and hard prompts, tokens per
response) and `rl_summary.json` (held-out greedy evaluation) under the workdir.

Options (docs/rl.md), e.g. SRPO's two-stage schedule and DAPO's extras:
  --config.rl.stage1_mix=math:1 --config.rl.stage2_mix=math:0.5,code:0.5 \
  --config.rl.switch_step=20 --config.rl.dynamic_sampling=True --config.rl.overlong_buffer=32
"""

from experiments.configs.base import base_config
from kat_jax.autothink.config import autothink_fields
from kat_jax.rl.config import rl_fields


def get_config():
  config = base_config()
  config.stage = "step_srpo"
  config.workdir = "runs/step_srpo"
  config.autothink = autothink_fields()  # the SFT run's fields, for loading its model
  config.rl = rl_fields()
  config.rl.steps = 40
  config.rl.temperature = 0.6  # enough correct samples for a judge signal at tiny scale
  # DAPO's extras, off as in the recorded run: dynamic sampling (train only on groups with a
  # gradient signal, refilled from up to 3 prompt batches) and soft overlong punishment.
  config.rl.dynamic_sampling = False
  config.rl.dynamic_sampling_max_batches = 3
  config.rl.overlong_buffer = 0  # e.g. 32: penalise the last 32 of max_new_tokens
  config.optim.lr = 1e-4
  config.optim.warmup_steps = 2
  config.optim.weight_decay = 0.0
  config.train.checkpoint_every = 10
  return config

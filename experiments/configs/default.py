"""The embedded default: pretrain the `tiny` model on generated data, on a CPU, in minutes.

  python -m experiments.run --config experiments/configs/default.py
"""

from experiments.configs.base import base_config


def get_config():
  config = base_config()
  config.workdir = "runs/default"
  return config

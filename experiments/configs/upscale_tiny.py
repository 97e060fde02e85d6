"""Depth up-scaling demo at CPU size: a random 8-layer `tiny` model -> 10 layers (KAT's 1/4).

  python -m experiments.run --config experiments/configs/upscale_tiny.py

Set `--config.model.init_from=<HF dir>` to up-scale a trained model instead of a random one.
"""

from experiments.configs.base import base_config
from kat_jax.upscale.config import upscale_fields


def get_config():
  config = base_config()
  config.stage = "upscale"
  config.workdir = "runs/upscale_tiny"
  config.model.num_layers = 8
  config.data.synthetic_docs = 2000
  config.data.synthetic_eval_docs = 10
  config.data.batch_size = 8
  config.upscale = upscale_fields()
  config.upscale.num_new_layers = 2  # 8 -> 10 layers, the 64 -> 80 ratio
  config.upscale.expected_num_layers = 10
  config.upscale.calibration_batches = 4
  config.upscale.check_batches = 2
  return config

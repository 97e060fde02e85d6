"""Fields every stage shares; stage configs start from `base_config()` and change what they need.

Every field can be overridden on the command line, e.g. `--config.train.steps=20`.
"""

from ml_collections import ConfigDict

from kat_jax.model.config import model_fields
from kat_jax.train import config_checks as run_fields


def base_config() -> ConfigDict:
  config = ConfigDict()
  config.stage = "pretrain"
  config.seed = 0
  config.workdir = "runs/default"
  config.model = model_fields("tiny")

  config.mesh = run_fields.mesh_fields()
  config.distributed = run_fields.distributed_fields()
  config.data = run_fields.data_fields()
  config.optim = run_fields.optim_fields()
  config.train = run_fields.train_fields()
  return config

"""A tiny pretrain run workdir shared by the model-loading, export and reuse tests."""

import pytest

from experiments.configs import default


def tiny_pretrain_config(workdir, *, steps: int = 3, checkpoint_every: int = 2):
  """The default run shrunk to one layer and a few 8x32 steps (seconds on a CPU)."""
  config = default.get_config()
  config.workdir = str(workdir)
  config.model.num_layers = 1
  config.data.synthetic_docs, config.data.synthetic_eval_docs = 40, 2
  config.data.seq_len, config.data.batch_size = 32, 8
  config.train.steps, config.train.checkpoint_every = steps, checkpoint_every
  config.train.eval_every, config.train.log_every, config.train.tensorboard = 0, 1, False
  config.train.async_checkpoint = False
  return config


@pytest.fixture(scope="session")
def pretrain_run(tmp_path_factory) -> str:
  """A run workdir (byte tokenizer, tiny preset, 1 layer) with complete checkpoints at steps
  2 and 3."""
  from kat_jax.train.loop import run_pretrain  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("pretrain_run")
  run_pretrain(tiny_pretrain_config(workdir))
  return str(workdir)

"""Bad `data` / `optim` / `train` values are one-line ConfigErrors naming the field."""

import pytest

from experiments.configs import default
from kat_jax.errors import ConfigError
from kat_jax.train.config_checks import check_training_config


@pytest.mark.parametrize("section, field, value, message", [
    ("data", "tokenizer", "foo", "config.data.tokenizer must be one of ['qwen2.5', 'bytes']"),
    ("data", "seq_len", 0, "config.data.seq_len must be > 0, got 0"),
    ("data", "batch_size", 0, "config.data.batch_size must be > 0"),
    ("data", "long_docs", "bogus", "config.data.long_docs must be one of ['split', 'truncate']"),
    ("data", "on_error", "bogus", "config.data.on_error must be one of ['raise', 'skip']"),
    ("optim", "lr", -1.0, "config.optim.lr must be > 0, got -1.0"),
    ("optim", "warmup_steps", -1, "config.optim.warmup_steps must be >= 0"),
    ("optim", "min_lr_ratio", 1.5, "config.optim.min_lr_ratio must be in [0, 1]"),
    ("optim", "b2", 1.0, "config.optim.b2 must be in [0, 1)"),
    ("train", "grad_accum", 0, "config.train.grad_accum must be > 0"),
    ("train", "log_every", 0, "config.train.log_every must be > 0"),
    ("train", "loss_chunk", 0, "config.train.loss_chunk must be > 0"),
    ("train", "steps", 0, "config.train.steps must be > 0"),
])
def test_bad_values_name_the_field(section, field, value, message):
  config = default.get_config()
  config[section][field] = value
  with pytest.raises(ConfigError) as info:
    check_training_config(config)
  assert str(info.value).startswith(message)


def test_grad_accum_must_divide_the_batch():
  config = default.get_config()
  config.data.batch_size, config.train.grad_accum = 16, 3
  with pytest.raises(ConfigError, match="batch_size 16 must be divisible by .*grad_accum 3"):
    check_training_config(config)


def test_default_config_passes():
  check_training_config(default.get_config())

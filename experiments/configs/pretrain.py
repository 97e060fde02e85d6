"""Continued pre-training of a Qwen2.5-family model on the user's JSONL/ArrayRecord data.

  python -m experiments.run --config experiments/configs/pretrain.py \
      --config.model.init_from=/path/to/hf_dir --config.data.paths=train.jsonl
"""

from experiments.configs.base import base_config


def get_config():
  config = base_config()
  config.workdir = "runs/pretrain"
  config.model.preset = "qwen2.5-0.5b"
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "dots_no_batch"
  config.data.tokenizer = "qwen2.5"
  config.data.source = "jsonl"
  config.data.seq_len = 4096
  config.data.batch_size = 8
  config.optim.lr = 1e-5
  config.optim.warmup_steps = 100
  config.train.steps = 1000
  config.train.checkpoint_every = 250
  config.train.eval_every = 250
  return config

"""Fields every stage shares; stage configs start from `base_config()` and change what they need.

Every field can be overridden on the command line, e.g. `--config.train.steps=20`.
"""

from ml_collections import ConfigDict

from kat_jax.model.config import model_fields


def base_config() -> ConfigDict:
  config = ConfigDict()
  config.stage = "pretrain"
  config.seed = 0
  config.workdir = "runs/default"
  config.model = model_fields("tiny")

  # Device mesh: sizes of (data, fsdp, tensor); -1 = the rest of the devices.
  config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # Multi-process runs (see kat_jax/parallel/distributed.py); empty = single process.
  config.distributed = ConfigDict(dict(coordinator_address="", num_processes=0,
                                       process_id=-1, local_device_ids="", auto=False))

  config.data = ConfigDict(dict(
      tokenizer="bytes",  # 'bytes' (CPU experiments) or 'qwen2.5' (real vocabulary)
      source="synthetic",  # 'synthetic' | 'autothink' | 'jsonl' | 'array_record'
      paths="",  # comma-separated files for jsonl/array_record
      eval_paths="",
      synthetic_docs=20000,
      synthetic_eval_docs=400,
      seq_len=256,
      batch_size=16,  # global rows per step, over all processes
      # multi-process input: 'source' = each process reads a disjoint slice of the records;
      # 'rows' = each reads everything and keeps its rows (batches independent of #processes)
      host_sharding="source",
      shuffle=True,
      long_docs="split",  # 'split' | 'truncate'
      on_error="raise",  # malformed rows: 'raise' or 'skip' (counted and logged)
      read_threads=2,
      prefetch=64,
  ))

  config.optim = ConfigDict(dict(
      lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.1,
      b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0,
  ))

  config.train = ConfigDict(dict(
      steps=300,
      grad_accum=1,
      loss_chunk=1024,  # tokens per LM-head chunk in the loss
      z_loss=0.0,
      log_every=10,
      eval_every=100,
      eval_batches=8,
      checkpoint_every=100,
      keep_checkpoints=2,
      async_checkpoint=True,
      tensorboard=True,
  ))
  return config

"""AutoThink cold-start SFT of the `tiny` model on the embedded dual-regime data, on a CPU.

  python -m experiments.run --config experiments/configs/sft.py

Generates tasks, tags modes by majority vote (procedural think-off solver), trains with
per-segment loss weights, then reports format rate and think-on rate on easy vs hard held-out
prompts (`<workdir>/sft_eval.json`). Bring your own chat data with
`--config.autothink.sft_paths=a.jsonl,b.parquet`, or your own queries to tag with
`--config.autothink.tasks_path=mine.jsonl` (rows {"prompt", "answer", "verifier": "math"});
tag with a real model through an OpenAI-compatible server with
`--config.autothink.tagger=endpoint --config.autothink.endpoint_url=http://127.0.0.1:8000
--config.autothink.endpoint_model=NAME`.
"""

from experiments.configs.base import base_config
from kat_jax.autothink.config import autothink_fields


def get_config():
  config = base_config()
  config.stage = "sft"
  config.workdir = "runs/sft"
  config.data.seq_len = 512
  config.data.batch_size = 8
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 20
  config.train.steps = 200
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.eval_batches = 4
  config.train.checkpoint_every = 100
  config.autothink = autothink_fields()
  return config

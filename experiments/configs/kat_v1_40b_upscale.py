"""KAT-V1 recipe: Qwen2.5-32B (64 layers) -> KAT-V1-40B (80 layers) by duplicating 16 layers.

  python -m experiments.run --config experiments/configs/kat_v1_40b_upscale.py \
      --config.model.init_from=/path/to/Qwen2.5-32B --config.data.paths=calibration.jsonl

KAT-V1 report §2: per-layer input/output cosine on diverse data, about a quarter of the layers
near-identity, those duplicated, then continued pre-training. The report says "duplication" and
does not give the placement; we copy weights (init 'copy') and put each copy right after its
source ('interleave'), keeping the first and last layer out of the choice.
Memory: the source (65 GB bf16) and the up-scaled model (81 GB) are both held at once; run on a
host or accelerator with ~150 GB free, or set `upscale.save_orbax=False` to skip one output.
"""

from experiments.configs.base import base_config
from kat_jax.upscale.config import upscale_fields


def get_config():
  config = base_config()
  config.stage = "upscale"
  config.workdir = "runs/kat_v1_40b_upscale"
  config.model.preset = "qwen2.5-32b"  # only its execution fields matter with init_from
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.data.tokenizer = "qwen2.5"
  config.data.source = "jsonl"  # diverse calibration text: code, math, general, chat
  config.data.seq_len = 2048
  config.data.batch_size = 4
  config.upscale = upscale_fields()
  config.upscale.num_new_layers = 16
  config.upscale.expected_num_layers = 80
  config.upscale.selection = "top_k"
  config.upscale.placement = "interleave"
  config.upscale.init = "copy"
  config.upscale.exclude_first = 1
  config.upscale.exclude_last = 1
  config.upscale.calibration_batches = 64  # 64 x 4 x 2048 = 524K tokens
  config.upscale.hf_dtype = "bfloat16"
  return config

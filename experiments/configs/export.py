"""Export a model (run workdir, HF directory, saved model or preset) as a Hugging Face directory.

  python -m experiments.run --config experiments/configs/export.py \
      --config.export.source=runs/default --config.workdir=exports/default
  python -m experiments.run --config experiments/configs/export.py \
      --config.export.source=runs/sft@200 --config.workdir=exports/sft_200

Writes config.json, safetensors, the tokenizer (files, or TOKENIZER.md for the byte tokenizer)
and kat_jax_export.json into the workdir; transformers' AutoModelForCausalLM loads it.
"""

from experiments.configs.base import base_config
from kat_jax.checkpoint.export import export_fields


def get_config():
  config = base_config()
  config.stage = "export"
  config.workdir = "runs/export"
  config.export = export_fields()
  return config

"""Generate completions with the KV-cache sampler (random `tiny` model on bytes by default).

  python -m experiments.run --config experiments/configs/generate.py
  python -m experiments.run --config experiments/configs/generate.py \
      --config.model.init_from=/path/to/hf_dir --config.data.tokenizer=qwen2.5 \
      --config.generate.prompts_path=prompts.jsonl --config.generate.think_mode=on

`init_from` is any model source: an HF directory, a run workdir (e.g. runs/sft, with its own
tokenizer), `<workdir>@<step>`, a saved model or a preset (docs/models.md).

Writes <workdir>/completions.jsonl and <workdir>/generate_summary.json.
"""

from experiments.configs.base import base_config
from kat_jax.sampling.stage import generate_fields


def get_config():
  config = base_config()
  config.stage = "generate"
  config.workdir = "runs/generate"
  config.generate = generate_fields()
  return config

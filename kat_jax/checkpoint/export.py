"""The `export` stage: any model source -> a Hugging Face directory transformers loads.

  python -m experiments.run --config experiments/configs/export.py \\
      --config.export.source=runs/sft --config.workdir=exports/sft
  (source: HF directory, run workdir, `<workdir>@<step>`, saved model or preset name)

Writes into `config.workdir`: config.json, generation_config.json, model.safetensors (or
shards + index), mtp.safetensors when the model has MTP heads (kat_jax layout; transformers
ignores the file), the tokenizer and `kat_jax_export.json` (source, step, tokenizer). With
the Qwen tokenizer the directory gets vocab.json / merges.txt / tokenizer_config.json
(`AutoTokenizer` gives the same ids; its chat template is the KAT one); the byte tokenizer
has no transformers equivalent, so TOKENIZER.md says how to tokenize instead.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.data.tokenizer import ADDED_TOKENS, TOKENIZER_NAMES, get_tokenizer
from kat_jax.errors import ConfigError
from kat_jax.model.config import DTYPES

TOKENIZER_NOTE = "TOKENIZER.md"


def export_fields() -> ConfigDict:
  """`config.export` with its defaults."""
  return ConfigDict(dict(
      source="",  # HF dir / run workdir[@step] / saved model dir / preset name
      tokenizer="",  # '' = the run's own, else qwen2.5 when the vocabulary holds it, else bytes
      dtype="",  # dtype written; '' = the model's param_dtype
      max_shard_size="5GB",
      mtp=True,  # also write MTP heads (distill students) to mtp.safetensors
  ))


def _check(ex: ConfigDict) -> None:
  if not ex.source:
    raise ConfigError("config.export.source is empty; give a Hugging Face directory, a run "
                      "workdir (optionally <workdir>@<step>), a saved model or a preset name")
  if ex.tokenizer and ex.tokenizer not in TOKENIZER_NAMES:
    raise ConfigError(f"config.export.tokenizer {ex.tokenizer!r} not in {TOKENIZER_NAMES}")
  if ex.dtype and ex.dtype not in DTYPES:
    raise ConfigError(f"config.export.dtype {ex.dtype!r} not in {tuple(DTYPES)}")


def _byte_tokenizer_note(directory: str) -> None:
  added = "\n".join(f"  {256 + i}: {content}" for i, (content, _) in enumerate(ADDED_TOKENS))
  with open(os.path.join(directory, TOKENIZER_NOTE), "w", encoding="utf-8") as f:
    f.write(
        "# Tokenizer\n\nThis model was trained with kat_jax's byte tokenizer, which "
        "transformers has no class for: ids 0-255 are the UTF-8 bytes of the text, and the "
        "added tokens follow in this order:\n\n" + added + "\n\nTokenize with kat_jax "
        "(`kat_jax.data.tokenizer.get_tokenizer('bytes')`), or in plain Python: "
        "`list(text.encode('utf-8'))` for text without added tokens.\n")


def run_export(config: ConfigDict) -> dict[str, Any]:
  """Exports `config.export.source` into `config.workdir`; returns what was written."""
  ex = config.export
  _check(ex)
  out = os.path.abspath(config.workdir)
  if os.path.isdir(os.path.join(out, models.CHECKPOINTS_DIR)):  # its config.json is the run's
    raise ConfigError(f"config.workdir {out} is a run workdir; export to another directory")
  start = time.perf_counter()
  kind = models.model_source_kind(ex.source, what="config.export.source")
  tokenizer_name = ex.tokenizer or models.tokenizer_name(ex.source, what="config.export.source")
  tokenizer = get_tokenizer(tokenizer_name)
  model_config, params = models.load_model(ex.source, seed=config.seed, mtp=ex.mtp,
                                           tokenizer=tokenizer, what="config.export.source")
  models.save_model(out, model_config, params, dtype=ex.dtype or None,
                    max_shard_size=ex.max_shard_size)
  if tokenizer_name == "qwen2.5":
    # pylint: disable-next=g-import-not-at-top  (recovering the merges takes seconds)
    from kat_jax.data.hf_tokenizer import save_qwen_tokenizer
    save_qwen_tokenizer(out, model_max_length=model_config.max_position_embeddings)
  else:
    _byte_tokenizer_note(out)
  info = {"source": os.path.abspath(models.split_step(ex.source)[0])
          if kind != "preset" else ex.source, "kind": kind, "tokenizer": tokenizer_name,
          "mtp_heads": len(params.get("mtp") or {}),
          "dtype": ex.dtype or model_config.param_dtype}
  if kind == "run":
    path, step = models.split_step(ex.source)
    info["step"] = models.resolve_step(path, step)
  with open(os.path.join(out, models.EXPORT_INFO_FILE), "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  print(f"export: {ex.source} ({kind}) -> {out} in {time.perf_counter() - start:.1f}s "
        f"[{model_config.num_layers} layers, tokenizer {tokenizer_name}]", flush=True)
  return {"output": out, **info}

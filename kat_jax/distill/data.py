"""The distill stages' data: dual-regime AutoThink records (stage-1 rendering) or `config.data`,
packed into batches (with the stored teacher top-k for an offline teacher)."""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
from ml_collections import ConfigDict

from kat_jax.data import pipeline, sources
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.distill import dual_regime, teacher_logits
from kat_jax.train.inputs import build_sources


def distill_sources(config: ConfigDict, workdir: str) -> tuple[Any, Any]:
  """`data.source='dual_regime'`: AutoThink tasks rendered for stage 1 (`dual_regime`), written
  once to `<workdir>/data`; any other source goes to `build_sources`."""
  data = config.data
  if data.source != "dual_regime":
    return build_sources(data, workdir, config.seed)
  data_dir = os.path.join(workdir, "data")
  os.makedirs(data_dir, exist_ok=True)
  paths = []
  for name, num, seed in (("train", data.synthetic_docs, config.seed),
                          ("eval", data.synthetic_eval_docs, config.seed + 1)):
    # Named after the generator, so a workdir holding the older generator's files is not reused.
    path = os.path.join(data_dir, f"autothink_stage1_{name}.jsonl")
    if not os.path.exists(path):
      sources.write_jsonl(dual_regime.generate_records(num, seed), path)
    paths.append(path)
  return sources.JsonlSource(paths[0]), sources.JsonlSource(paths[1])


def make_batches(source, tokenizer: Tokenizer, config: ConfigDict, rows: int, *, train: bool,
                 offline_k: int = 0):
  """Packed batches of dual-regime documents (+ stored teacher top-k when offline_k > 0)."""
  data = config.data
  options = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=data.prefetch)
  to_doc = dual_regime.DualRegimeToDocument(tokenizer)
  common = dict(seq_len=data.seq_len, batch_size=rows, seed=config.seed,
                shuffle=train and data.shuffle, num_epochs=None if train else 1,
                shard_index=jax.process_index(), shard_count=jax.process_count(),
                long_docs=data.long_docs, read_options=options)
  if offline_k:
    return iter(teacher_logits.make_teacher_dataset(source, to_document=to_doc, k=offline_k,
                                                    pad_id=tokenizer.pad_id, **common))
  return iter(pipeline.make_pretrain_dataset(source, tokenizer, to_document=to_doc, **common))

"""Stage `teacher_logits`: the teacher's stored top-k for every train (and eval) record.

  python -m experiments.run --config experiments/configs/teacher_logits_tiny.py
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ml_collections import ConfigDict

from kat_jax.data import sources
from kat_jax.distill import dual_regime, teacher_logits
from kat_jax.distill.data import distill_sources
from kat_jax.distill.stage import obtain_teacher, place_teacher, setup
from kat_jax.progress import status


def run_teacher_logits(config: ConfigDict) -> dict[str, Any]:
  """Stage `teacher_logits`: stored top-k of the teacher for every train (and eval) record.

  Writes `<output>/train.array_record` (and `eval.array_record`); point a distill run at them
  with data.source='array_record', data.paths/eval_paths, distill.teacher='offline'.
  """
  workdir, tokenizer, mesh = setup(config)
  t = config.teacher_logits
  train_source, eval_source = distill_sources(config, workdir)
  teacher_cfg, params, _ = obtain_teacher(config, workdir, tokenizer, train_source,
                                          eval_source, mesh, evaluate_loaded=False)
  output = os.path.abspath(t.output or os.path.join(workdir, "teacher_logits"))
  os.makedirs(output, exist_ok=True)
  to_doc = dual_regime.DualRegimeToDocument(tokenizer)
  vocab = config.distill.shared_vocab or tokenizer.vocab_size
  params, _ = place_teacher(teacher_cfg, params, mesh)  # rows split over data x fsdp
  written = {}
  todo = [("train", train_source)] + ([("eval", eval_source)]
                                      if t.include_eval and eval_source is not None else [])
  start = time.perf_counter()
  for split, source in todo:
    path = os.path.join(output, f"{split}.array_record")
    records = (source[i] for i in range(len(source)))
    written[split] = sources.write_array_record(teacher_logits.records_with_teacher(
        records, to_doc, params, teacher_cfg, k=t.top_k, seq_len=config.data.seq_len,
        batch_size=t.batch_size, long_docs=config.data.long_docs, vocab=vocab,
        dtype=t.dtype, chunk_size=t.chunk, mesh=mesh), path)
  summary = {"output": output, "records": written, "top_k": t.top_k,
             "seconds": time.perf_counter() - start}
  with open(os.path.join(output, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  status(f"teacher_logits: wrote {written} records with top-{t.top_k} to {output}")
  return summary

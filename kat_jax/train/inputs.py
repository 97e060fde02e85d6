"""One place that builds training inputs from `config.data`: sources and checkpointable batches."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import grain
import jax
from ml_collections import ConfigDict

from kat_jax.data import pipeline, sources, synthetic
from kat_jax.data.tokenizer import Tokenizer
from kat_jax.errors import ConfigError

ToDocument = Callable[[dict[str, Any]], Any]  # record -> kat_jax.data.packing.Document


def _split_paths(paths: str) -> list[str]:
  return [p for p in (s.strip() for s in paths.split(",")) if p]


def build_sources(data: ConfigDict, workdir: str, seed: int) -> tuple[Any, Any]:
  """(train_source, eval_source or None) from `config.data`.

  Generated sources write `<workdir>/data/<source>_{train,eval}.jsonl` once (seeds `seed`,
  `seed + 1`; sizes `data.synthetic_docs` / `synthetic_eval_docs`): 'synthetic' is the small
  procedural corpus, 'autothink' the dual-regime AutoThink tasks as plain text (question,
  reasoning for hard tasks, answer; `kat_jax.tasks.dual_regime.task_text`).
  """
  if data.source in ("synthetic", "autothink"):
    if data.source == "synthetic":
      write = synthetic.write_corpus_jsonl
    else:
      from kat_jax.tasks.dual_regime import write_text_corpus as write  # pylint: disable=g-import-not-at-top
    data_dir = os.path.join(workdir, "data")
    os.makedirs(data_dir, exist_ok=True)
    train_path = os.path.join(data_dir, f"{data.source}_train.jsonl")
    eval_path = os.path.join(data_dir, f"{data.source}_eval.jsonl")
    if not (os.path.exists(train_path) and os.path.exists(eval_path)):
      write(train_path, data.synthetic_docs, seed)
      write(eval_path, data.synthetic_eval_docs, seed + 1)
    return sources.JsonlSource(train_path), sources.JsonlSource(eval_path)
  kinds = {"jsonl": sources.JsonlSource, "array_record": sources.ArrayRecordSource}
  if data.source not in kinds:
    raise ConfigError(f"config.data.source {data.source!r} not in "
                      f"{['synthetic', 'autothink', *kinds]}")
  train_paths = _split_paths(data.paths)
  if not train_paths:
    raise ConfigError(f"config.data.paths is empty; give the {data.source} files to read")
  for path in train_paths + _split_paths(data.eval_paths):
    if not os.path.exists(path):
      raise ConfigError(f"config.data: file not found: {path}")
  make = kinds[data.source]
  train = make(train_paths, on_error=data.on_error)
  evals = make(_split_paths(data.eval_paths), on_error=data.on_error) if data.eval_paths else None
  return train, evals


class _ProcessRows:
  """Every process reads the same global batches and keeps its own contiguous rows.

  `config.data.host_sharding='rows'`: the batches are identical whatever the process count
  (reproducible when scaling out) at the cost of every host tokenising all the data.
  """

  def __init__(self, iterator, rows: int):
    self._iterator, self._rows = iterator, rows
    self._start = jax.process_index() * rows

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._iterator)
    return {k: v[self._start:self._start + self._rows] for k, v in batch.items()}

  # Grain's Orbax handler stores non-DatasetIterator states as bytes.
  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state()).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    getattr(self._iterator, "start_prefetch", lambda: None)()


def local_batch_size(global_batch_size: int, mesh) -> int:
  """Rows each process loads: the global batch split over processes and batch shards."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch_size % shards or global_batch_size % jax.process_count():
    raise ConfigError(
        f"config.data.batch_size {global_batch_size} must be divisible by the mesh's "
        f"data×fsdp = {shards} and by the {jax.process_count()} processes")
  return global_batch_size // jax.process_count()


def batches(source, tokenizer: Tokenizer, data: ConfigDict, seed: int, local_rows: int, *,
            train: bool, to_document: ToDocument | None = None):
  """This process's batch iterator (checkpointable), sharded per `data.host_sharding`."""
  by_rows = data.host_sharding == "rows"
  if data.host_sharding not in ("rows", "source"):
    raise ConfigError(f"config.data.host_sharding {data.host_sharding!r} not in "
                      "['source', 'rows']")
  dataset = pipeline.make_pretrain_dataset(
      source, tokenizer, seq_len=data.seq_len,
      batch_size=local_rows * jax.process_count() if by_rows else local_rows, seed=seed,
      shuffle=train and data.shuffle, num_epochs=None if train else 1,
      shard_index=0 if by_rows else jax.process_index(),
      shard_count=1 if by_rows else jax.process_count(),
      long_docs=data.long_docs, to_document=to_document,
      read_options=grain.ReadOptions(num_threads=data.read_threads,
                                     prefetch_buffer_size=data.prefetch))
  iterator = iter(dataset)
  return _ProcessRows(iterator, local_rows) if by_rows and jax.process_count() > 1 else iterator

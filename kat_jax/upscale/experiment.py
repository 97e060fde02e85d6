"""Recorded CPU experiment: does a depth-up-scaled tiny model train on from where the base was?

  python -m kat_jax.upscale.experiment --out=benchmarks/results/upscale_tiny_cpu.json

(a) train the base `tiny` model (8 layers) for `base_steps` on the synthetic corpus;
measure layer saturation on it, pick the k most saturated layers (k = L/4, as 64 -> 80);
then continue for `continue_steps`, each from the same base weights, with a fresh optimizer
and the same batches:
(b) the up-scaled model (10 layers), once with `copy` and once with `identity` init;
(c) the base model itself.
Held-out loss is measured right after up-scaling and at the end; train losses are logged.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import ConfigDict

from kat_jax.data import pipeline, sources, synthetic
from kat_jax.data.tokenizer import get_tokenizer
from kat_jax.model import ModelConfig, get_preset, init_params
from kat_jax.parallel import global_batch
from kat_jax.train.optimizer import make_optimizer
from kat_jax.train.state import init_sharded_state
from kat_jax.train.step import make_eval_step, make_train_step
from kat_jax.train.trainer import Trainer, Work
from kat_jax.upscale import expand, saturation

_OUT = flags.DEFINE_string("out", "benchmarks/results/upscale_tiny_cpu.json", "Result JSON.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/kat_upscale_experiment", "Scratch directory.")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 150, "Steps of (a), the base model.")
_CONTINUE_STEPS = flags.DEFINE_integer("continue_steps", 100, "Steps of (b) and (c).")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 8, "Layers of the base tiny model.")
_NUM_NEW = flags.DEFINE_integer("num_new_layers", 2, "Layers to duplicate.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_SEQ = flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 8, "Held-out batches.")
_CALIB_BATCHES = flags.DEFINE_integer("calibration_batches", 8, "Saturation batches.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 10, "Train-loss logging interval.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for init, data and shuffling.")


def _optim(lr: float, warmup: int) -> ConfigDict:
  return ConfigDict(dict(lr=lr, warmup_steps=warmup, min_lr_ratio=0.1, weight_decay=0.1,
                         b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))


def _batches(source, tokenizer, seed: int, *, train: bool):
  return pipeline.make_pretrain_dataset(source, tokenizer, seq_len=_SEQ.value,
                                        batch_size=_BATCH.value, seed=seed, shuffle=train,
                                        num_epochs=None if train else 1)


def _eval_loss(config: ModelConfig, params, eval_set: list[dict]) -> float:
  eval_fn = jax.jit(make_eval_step(config))
  ce = weight = 0.0
  for batch in eval_set:
    aux = jax.device_get(eval_fn(params, batch))
    ce, weight = ce + float(aux["ce_sum"]), weight + float(aux["weight_sum"])
  return ce / max(weight, 1.0)


class _ReplayBatches:
  """A batch source over pre-drawn batches (every run sees the same ones); checkpointable."""

  def __init__(self, batches: list[dict], mesh):
    self._batches, self._mesh, self._next = batches, mesh, 0
    self.checkpoint = self

  def next(self, state, step: int) -> Work:
    del state, step
    batch = self._batches[self._next]
    self._next += 1
    return Work(global_batch(batch, self._mesh), tokens=float(np.sum(batch["weights"] > 0)))

  def get_state(self) -> bytes:
    return json.dumps(self._next).encode()

  def set_state(self, state: bytes) -> None:
    self._next = json.loads(state.decode())

  def start_prefetch(self) -> None:
    pass


def train(config: ModelConfig, params, optim: ConfigDict, steps: int, batches: list[dict],
          eval_fn: Callable[[Any], float], workdir: str) -> tuple[Any, dict[str, Any]]:
  """`steps` AdamW updates from `params` on `batches`: a trainer run in `workdir`."""
  run = ConfigDict(dict(optim=optim, mesh=dict(data=-1, fsdp=1, tensor=1), train=dict(
      log_every=_LOG_EVERY.value, eval_every=0, checkpoint_every=steps, keep_checkpoints=1,
      async_checkpoint=False, tensorboard=False)))
  optimizer = make_optimizer(optim, steps)
  trainer = Trainer(run, name=f"{config.num_layers} layers", workdir=workdir, steps=steps)
  curve = []

  class _Curve(_ReplayBatches):
    def after_step(self, step, state, metrics):
      del state
      if step % _LOG_EVERY.value == 0 or step == steps:
        curve.append([step, round(metrics["loss"], 4)])

  # A private copy: the step donates its state, and `params` may share buffers with other runs.
  init = lambda: init_sharded_state(config, optimizer, trainer.mesh, jax.random.key(0),  # noqa: E731
                                    params=jax.tree.map(jnp.copy, params))
  result = trainer.fit(init, make_train_step(config, optimizer),
                       _Curve(batches[:steps], trainer.mesh))
  log = {"train_loss": curve, "final_train_loss": curve[-1][1],
         "eval_loss": eval_fn(result.state.params), "seconds": round(result.seconds, 1),
         "params": expand.count_params(result.state.params), "num_layers": config.num_layers}
  print(f"  {config.num_layers} layers, {steps} steps in {result.seconds:.0f}s: train "
        f"{log['final_train_loss']:.4f}, eval {log['eval_loss']:.4f}", flush=True)
  return result.state.params, log


def _mean_window(curve: list[list[float]], last: int = 3) -> float:
  return float(np.mean([loss for _, loss in curve[-last:]]))


def run_experiment() -> dict[str, Any]:
  jax.config.update("jax_default_matmul_precision", "highest")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  tokenizer = get_tokenizer("bytes")
  seed = _SEED.value
  train_path = synthetic.write_corpus_jsonl(os.path.join(_WORKDIR.value, "train.jsonl"),
                                            20000, seed)
  eval_path = synthetic.write_corpus_jsonl(os.path.join(_WORKDIR.value, "eval.jsonl"),
                                           400, seed + 1)
  train_source, eval_source = sources.JsonlSource(train_path), sources.JsonlSource(eval_path)
  eval_set = [b for _, b in zip(range(_EVAL_BATCHES.value),
                                _batches(eval_source, tokenizer, seed, train=False))]
  stream = iter(_batches(train_source, tokenizer, seed, train=True))
  base_batches = [next(stream) for _ in range(_BASE_STEPS.value)]
  calib = [next(stream) for _ in range(_CALIB_BATCHES.value)]
  more_batches = [next(stream) for _ in range(_CONTINUE_STEPS.value)]

  config = get_preset("tiny", num_layers=_NUM_LAYERS.value)
  params = init_params(config, jax.random.key(seed))
  print(f"(a) base model, {_BASE_STEPS.value} steps", flush=True)
  base_params, base_log = train(config, params, _optim(3e-3, 20), _BASE_STEPS.value,
                                base_batches, lambda p: _eval_loss(config, p, eval_set),
                                os.path.join(_WORKDIR.value, "base"))

  report = saturation.analyze_saturation(config, base_params, calib)
  duplicated = expand.select_top_k(report.mean_cosine, _NUM_NEW.value, exclude_first=1,
                                   exclude_last=1)
  layer_map = expand.make_layer_map(config.num_layers, duplicated, "interleave")
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  plot_path = os.path.splitext(_OUT.value)[0] + "_saturation.png"
  saturation.plot_saturation(report, plot_path, selected=duplicated,
                             title=f"tiny-{config.num_layers}L after {_BASE_STEPS.value} steps")

  # Continued pre-training: a short re-warmup, lower peak lr, same batches for every run.
  continue_optim = _optim(1e-3, 10)
  runs: dict[str, Any] = {}
  variants = [("base_continued", None), ("upscaled_copy", "copy"),
              ("upscaled_identity", "identity")]
  for name, init in variants:
    print(f"({'c' if init is None else 'b'}) {name}, {_CONTINUE_STEPS.value} steps", flush=True)
    if init is None:
      run_config, run_params = config, base_params
    else:
      run_config, run_params = expand.upscale(config, base_params, layer_map, init)
    initial_eval = _eval_loss(run_config, run_params, eval_set)
    eval_fn = lambda p, c=run_config: _eval_loss(c, p, eval_set)
    final_params, log = train(run_config, run_params, continue_optim, _CONTINUE_STEPS.value,
                              more_batches, eval_fn, os.path.join(_WORKDIR.value, name))
    log["eval_loss_at_start"] = initial_eval
    log["train_loss_last3_mean"] = _mean_window(log["train_loss"])
    if init is not None:
      after = saturation.analyze_saturation(run_config, final_params, calib)
      log["mean_cosine_after_training"] = [round(c, 4) for c in after.mean_cosine]
    runs[name] = log

  return {
      "command": "python -m kat_jax.upscale.experiment " + " ".join(sys.argv[1:]),
      "platform": {"backend": jax.default_backend(), "devices": len(jax.devices()),
                   "cpu_count": os.cpu_count(), "machine": platform.machine(),
                   "jax": jax.__version__},
      "setup": {"preset": "tiny", "base_num_layers": config.num_layers,
                "new_num_layers": layer_map.new_num_layers, "base_steps": _BASE_STEPS.value,
                "continue_steps": _CONTINUE_STEPS.value, "batch_size": _BATCH.value,
                "seq_len": _SEQ.value, "eval_batches": _EVAL_BATCHES.value,
                "calibration_batches": _CALIB_BATCHES.value, "selection": "top_k",
                "exclude_first": 1, "exclude_last": 1, "placement": "interleave",
                "base_optim": _optim(3e-3, 20).to_dict(),
                "continue_optim": continue_optim.to_dict(), "seed": seed,
                "data": "kat_jax.data.synthetic corpus (20000 train / 400 eval docs), bytes"
                        " tokenizer"},
      "saturation": {**report.to_dict(), "duplicated": duplicated,
                     "layer_map": layer_map.to_dict()["layers"],
                     "plot": os.path.basename(plot_path)},
      "base": base_log,
      "continued": runs,
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  start = time.perf_counter()
  result = run_experiment()
  result["total_seconds"] = round(time.perf_counter() - start, 1)
  with open(_OUT.value, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(json.dumps({k: {"eval_start": v["eval_loss_at_start"], "eval_end": v["eval_loss"]}
                    for k, v in result["continued"].items()}, indent=2))


if __name__ == "__main__":
  app.run(main)

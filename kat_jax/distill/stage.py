"""Stages `distill` and `teacher_logits`.

  python -m experiments.run --config experiments/configs/distill_tiny.py
  python -m experiments.run --config experiments/configs/teacher_logits_tiny.py

`distill`: a student (`config.model`, optional MTP heads `config.mtp.depth`) trained on
CE + KD/ULD (`config.distill`) against a teacher that is
  * online: a second frozen model in the same job, params sharded like the student's
    (`kat_jax.parallel` rules), no gradient and no optimizer state; loaded from
    `distill.teacher_init_from` (HF dir, or a `<dir>/teacher` saved by this stage), or trained
    here first for `distill.teacher_train_steps` steps (CE only) and saved;
  * offline: `teacher_topk` fields stored by the `teacher_logits` stage in the data records.
With `distill.compare_variants` (e.g. "ce,kd,uld,uld_mtp") the stage trains one student per
variant from the same init and writes their held-out CE to `<workdir>/comparison.json`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from kat_jax.checkpoint.manager import RunCheckpointer
from kat_jax.data import pipeline, sources
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.distill import dual_regime, teacher_logits
from kat_jax.distill.losses import DistillSpec
from kat_jax.distill.objective import Objective, make_distill_eval_step, make_distill_step
from kat_jax.errors import ConfigError
from kat_jax.model import Decoder, ModelConfig, logical_axes
from kat_jax.model.mtp import boxed_mtp_init
from kat_jax.parallel import (batch_sharding, global_batch, logical_to_sharding, make_mesh,
                              replicated, sharding_context)
from kat_jax.parallel import strip_boxes
from kat_jax.train.inputs import build_sources, local_batch_size
from kat_jax.train.loop import evaluate
from kat_jax.train.models import model_config_from
from kat_jax.train.metrics import MetricsLogger
from kat_jax.train.optimizer import learning_rate_schedule, make_optimizer
from kat_jax.train.state import TrainState

VARIANTS = ("ce", "kd", "uld", "ce_mtp", "kd_mtp", "uld_mtp")


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def mtp_fields() -> ConfigDict:
  """`config.mtp`: depth 0 = no MTP heads; λ piecewise constant (values, step boundaries)."""
  return ConfigDict(dict(depth=0, lambda_values="0.3", lambda_boundaries="", ce_weight=1.0,
                         distill_weight=1.0))


def distill_fields() -> ConfigDict:
  """`config.distill`: loss, teacher and comparison settings."""
  from experiments.configs.base import model_fields  # pylint: disable=g-import-not-at-top
  return ConfigDict(dict(
      loss="kd",  # kd | uld
      ce_weight=1.0,
      weight=1.0,  # distillation weight of the main head (0 = CE only)
      temperature=1.0,  # KD τ (loss × τ²)
      student_temperature=1.0, teacher_temperature=1.0,  # ULD
      uld_top_k=0,  # 0 = exact sort
      shared_vocab=0,  # slice heads to this many ids before KD/ULD; 0 = tokenizer's size
      skip_student_eos=True,
      teacher="online",  # online | offline | none
      teacher_init_from="",
      teacher_train_steps=0,  # > 0: train the teacher here first (CE only)
      teacher_lr=0.0,  # 0 = config.optim.lr
      teacher_model=model_fields("tiny"),
      teacher_topk=32,  # offline teacher: K stored per token
      compare_variants="",  # e.g. "ce,kd,uld,uld_mtp"
  ))


def teacher_logits_fields() -> ConfigDict:
  return ConfigDict(dict(top_k=32, dtype="float16", batch_size=8, output="",
                         include_eval=True,
                         chunk=256))  # positions per LM-head chunk ([B, chunk, V] f32)


def _floats(text: str) -> tuple[float, ...]:
  return tuple(float(s) for s in str(text).split(",") if s.strip())


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in str(text).split(",") if s.strip())


def objective_from(config: ConfigDict, tokenizer: Tokenizer, variant: str | None = None
                   ) -> Objective:
  """`config.distill` + `config.mtp` (+ a comparison variant) -> Objective."""
  d, m = config.distill, config.mtp
  loss, weight, depth = d.loss, d.weight, m.depth
  teacher = d.teacher
  if variant is not None:
    if variant not in VARIANTS:
      raise ConfigError(f"config.distill.compare_variants: {variant!r} not in {VARIANTS}")
    base = variant.split("_")[0]
    depth = (m.depth or 1) if variant.endswith("_mtp") else 0
    if base == "ce":
      weight, teacher = 0.0, "none"
    else:
      loss, weight = base, (d.weight or 1.0)
  vocab = d.shared_vocab or tokenizer.vocab_size
  try:
    spec = DistillSpec(kind=loss, temperature=d.temperature,
                       student_temperature=d.student_temperature,
                       teacher_temperature=d.teacher_temperature, student_vocab=vocab,
                       teacher_vocab=vocab, uld_top_k=d.uld_top_k or None)
    mtp_distill = m.distill_weight if teacher != "none" else 0.0
    return Objective(ce_weight=d.ce_weight, distill_weight=weight if teacher != "none" else 0.0,
                     spec=spec, teacher=teacher if (weight or (depth and mtp_distill)) else "none",
                     mtp_depth=depth, mtp_ce_weight=m.ce_weight, mtp_distill_weight=mtp_distill,
                     mtp_lambda=_floats(m.lambda_values),
                     mtp_lambda_boundaries=_ints(m.lambda_boundaries),
                     skip_student_eos=d.skip_student_eos, eos_id=tokenizer.eos_id,
                     loss_chunk=config.train.loss_chunk)
  except ValueError as e:
    raise ConfigError(f"config.distill/config.mtp: {e}") from e


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------
# Sharded student / teacher
# ---------------------------------------------------------------------------


def _boxed_student_init(config: ModelConfig, mtp_depth: int, optimizer):
  def init(rng):
    r1, r2 = jax.random.split(rng)
    params = dict(Decoder(config).init(r1, jnp.zeros((1, 8), jnp.int32))["params"])
    if mtp_depth:
      params["mtp"] = boxed_mtp_init(config, mtp_depth, r2)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))
  return init


def init_student_state(config: ModelConfig, mtp_depth: int, optimizer, mesh, rng: jax.Array
                       ) -> tuple[TrainState, TrainState]:
  """Student TrainState (decoder + "mtp" params) created directly sharded. -> (state, shardings)."""
  init = _boxed_student_init(config, mtp_depth, optimizer)
  boxed = jax.eval_shape(init, rng)
  shardings = logical_to_sharding(nn.get_partition_spec(boxed), strip_boxes(boxed), mesh)
  state = jax.jit(lambda r: strip_boxes(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def place_teacher(config: ModelConfig, params: Any, mesh) -> tuple[Any, Any]:
  """Teacher params on the mesh with the student's logical-axis rules. -> (params, shardings)."""
  abstract = jax.eval_shape(lambda: params)
  shardings = logical_to_sharding(logical_axes(config), abstract, mesh)
  return jax.device_put(params, shardings), shardings


def save_model(directory: str, config: ModelConfig, params: Any) -> None:
  """`<directory>/model_config.json` + `<directory>/params` (Orbax)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "model_config.json"), "w", encoding="utf-8") as f:
    json.dump(config.to_dict(), f, indent=2)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(os.path.abspath(directory), "params"), params, force=True)
  checkpointer.wait_until_finished()


def load_model(directory: str, execution: ModelConfig | None = None) -> tuple[ModelConfig, Any]:
  """Loads `save_model` output, or a Hugging Face directory (config.json + safetensors)."""
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, "model_config.json")):
    with open(os.path.join(directory, "model_config.json"), encoding="utf-8") as f:
      config = ModelConfig.from_dict(json.load(f))
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, "params"))
    return config, params
  if os.path.exists(os.path.join(directory, "config.json")):
    from kat_jax.checkpoint.hf import load_pretrained  # pylint: disable=g-import-not-at-top
    return load_pretrained(directory)  # MTP heads stay on disk (load_mtp is opt-in)
  raise ConfigError(f"config.distill.teacher_init_from: no model_config.json or config.json "
                    f"in {directory}")


# ---------------------------------------------------------------------------
# Training one model
# ---------------------------------------------------------------------------


def train_model(config: ConfigDict, model_config: ModelConfig, objective: Objective, *,
                name: str, workdir: str, tokenizer: Tokenizer, train_source, eval_source,
                mesh, teacher: tuple[ModelConfig, Any] | None = None, steps: int | None = None,
                lr: float | None = None) -> dict[str, Any]:
  """Trains one model under `objective`; resumes from `<workdir>/<name>/checkpoints`.

  Returns {"params", "train" (last metrics), "eval" (held-out CE), "seconds", "steps"}.
  """
  train = config.train
  steps = steps or train.steps
  optim = ConfigDict(config.optim.to_dict())
  if lr:
    optim.lr = lr
  optimizer = make_optimizer(optim, steps)
  schedule = learning_rate_schedule(optim, steps)
  rows = local_batch_size(config.data.batch_size, mesh)
  offline_k = config.distill.teacher_topk if objective.teacher == "offline" else 0
  data_iter = make_batches(train_source, tokenizer, config, rows, train=True,
                           offline_k=offline_k)
  run_dir = os.path.join(workdir, name)
  checkpointer = RunCheckpointer(os.path.join(run_dir, "checkpoints"),
                                 save_every=train.checkpoint_every,
                                 keep=train.keep_checkpoints, async_save=train.async_checkpoint)
  logger = MetricsLogger(run_dir, steps, tensorboard=train.tensorboard)
  meta = {"config": config.to_dict(), "model_config": model_config.to_dict(),
          "objective": repr(objective)}
  with sharding_context(mesh):
    state, shardings = init_student_state(model_config, objective.mtp_depth, optimizer, mesh,
                                          jax.random.key(config.seed))
    if checkpointer.latest_step() is not None:
      state, _ = checkpointer.restore(state, data_iter)
      logger.status(f"{name}: resumed from step {int(state.step)}")
    teacher_cfg, teacher_params, teacher_sh = None, None, None
    if objective.teacher == "online" and objective.needs_teacher:
      if teacher is None:
        raise ConfigError("config.distill.teacher='online' but no teacher model was given")
      teacher_cfg = teacher[0]
      teacher_params, teacher_sh = place_teacher(teacher_cfg, teacher[1], mesh)
    batch_sh = batch_sharding(mesh)
    step_fn = jax.jit(
        make_distill_step(model_config, teacher_cfg, objective, optimizer,
                          grad_accum=train.grad_accum, schedule=schedule),
        in_shardings=(shardings, teacher_sh, batch_sh),
        out_shardings=(shardings, replicated(mesh)), donate_argnums=(0,))
    logger.status(f"{name}: {sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)):,}"
                  f" params, {steps} steps, objective ce={objective.ce_weight} "
                  f"{objective.spec.kind}={objective.distill_weight} "
                  f"mtp_depth={objective.mtp_depth} teacher={objective.teacher}")
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    step = int(state.step)
    while step < steps:
      local = next(data_iter)
      state, metrics = step_fn(state, teacher_params, global_batch(local, mesh))
      step += 1
      logger.count_tokens(float(np.sum(local["weights"] > 0)) * jax.process_count())
      if step % train.log_every == 0 or step == steps:
        logger.write(step, jax.device_get(metrics))
      checkpointer.save(step, state, data_iter, meta, force=step == steps)
    seconds = time.perf_counter() - start
    result = {"params": state.params, "steps": steps, "seconds": seconds,
              "train": {k: float(v) for k, v in jax.device_get(metrics).items()}}
    if eval_source is not None:
      result["eval"] = evaluate_model(config, model_config, state.params, shardings.params,
                                      objective.mtp_depth, tokenizer, eval_source, mesh)
      logger.write_eval(steps, result["eval"])
  checkpointer.close()
  logger.close()
  return result


def evaluate_model(config: ConfigDict, model_config: ModelConfig, params, param_shardings,
                   mtp_depth: int, tokenizer: Tokenizer, eval_source, mesh) -> dict[str, float]:
  """Held-out main-head CE/accuracy over `config.train.eval_batches` batches."""
  eval_fn = jax.jit(make_distill_eval_step(model_config, mtp_depth,
                                           loss_chunk=config.train.loss_chunk),
                    in_shardings=(param_shardings, batch_sharding(mesh)),
                    out_shardings=replicated(mesh))
  rows = local_batch_size(config.data.batch_size, mesh)
  batches = make_batches(eval_source, tokenizer, config, rows, train=False)
  return evaluate(eval_fn, params, batches, config.train.eval_batches, mesh)


# ---------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------


def _setup(config: ConfigDict):
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  tokenizer = get_tokenizer(config.data.tokenizer)
  try:
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from e
  return workdir, tokenizer, mesh


def _check_vocab(name: str, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"{name}: vocab_size {model_config.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} ids")


def obtain_teacher(config: ConfigDict, workdir: str, tokenizer: Tokenizer, train_source,
                   eval_source, mesh, *, evaluate_loaded: bool = True
                   ) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """(teacher config, params, info): loaded from `teacher_init_from` or trained here first."""
  d = config.distill
  saved = os.path.join(workdir, "teacher")
  if d.teacher_init_from:
    teacher_cfg, params = load_model(d.teacher_init_from)
    return teacher_cfg, params, {"loaded_from": d.teacher_init_from}
  if os.path.exists(os.path.join(saved, "model_config.json")):
    teacher_cfg, params = load_model(saved)
    info = {"loaded_from": saved}
    if eval_source is not None and evaluate_loaded:
      info["eval"] = evaluate_model(config, teacher_cfg, params, None, 0, tokenizer,
                                    eval_source, mesh)
    return teacher_cfg, params, info
  if d.teacher_train_steps <= 0:
    raise ConfigError("config.distill: a teacher is needed; set teacher_init_from or "
                      "teacher_train_steps > 0")
  teacher_cfg = model_config_from(d.teacher_model)
  _check_vocab("config.distill.teacher_model", teacher_cfg, tokenizer)
  ce_only = Objective(eos_id=tokenizer.eos_id, loss_chunk=config.train.loss_chunk)
  result = train_model(config, teacher_cfg, ce_only, name="teacher_run", workdir=workdir,
                       tokenizer=tokenizer, train_source=train_source,
                       eval_source=eval_source, mesh=mesh, steps=d.teacher_train_steps,
                       lr=d.teacher_lr or None)
  params = jax.device_get(result["params"])
  if jax.process_index() == 0:
    save_model(saved, teacher_cfg, params)
  info = {"trained_steps": result["steps"], "seconds": result["seconds"],
          "eval": result.get("eval"), "saved_to": saved}
  return teacher_cfg, params, info


def run_distill(config: ConfigDict) -> dict[str, Any]:
  """Stage `distill`. Returns the final metrics (or the comparison table)."""
  workdir, tokenizer, mesh = _setup(config)
  student_cfg = model_config_from(config.model)
  _check_vocab("config.model", student_cfg, tokenizer)
  if config.train.steps < 1:
    raise ConfigError(f"config.train.steps must be >= 1, got {config.train.steps}")
  train_source, eval_source = distill_sources(config, workdir)
  variants = [v.strip() for v in config.distill.compare_variants.split(",") if v.strip()]
  objectives = ({v: objective_from(config, tokenizer, v) for v in variants} if variants
                else {"student": objective_from(config, tokenizer)})
  teacher = None
  summary: dict[str, Any] = {}
  if any(o.teacher == "online" for o in objectives.values()):
    teacher_cfg, teacher_params, info = obtain_teacher(config, workdir, tokenizer, train_source,
                                                       eval_source, mesh)
    _check_vocab("teacher", teacher_cfg, tokenizer)
    teacher = (teacher_cfg, teacher_params)
    summary["teacher"] = {**info, "num_layers": teacher_cfg.num_layers,
                          "hidden_size": teacher_cfg.hidden_size}
  results = {}
  for name, objective in objectives.items():
    result = train_model(config, student_cfg, objective, name=name, workdir=workdir,
                         tokenizer=tokenizer, train_source=train_source,
                         eval_source=eval_source, mesh=mesh, teacher=teacher)
    results[name] = {k: v for k, v in result.items() if k != "params"}
    if jax.process_index() == 0:
      save_model(os.path.join(workdir, name, "final"), student_cfg,
                 jax.device_get(result["params"]))
  summary["students"] = results
  summary["student_model"] = {"num_layers": student_cfg.num_layers,
                              "hidden_size": student_cfg.hidden_size}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "comparison.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, default=str)
  return summary


def run_teacher_logits(config: ConfigDict) -> dict[str, Any]:
  """Stage `teacher_logits`: stored top-k of the teacher for every train (and eval) record.

  Writes `<output>/train.array_record` (and `eval.array_record`); point a distill run at them
  with data.source='array_record', data.paths/eval_paths, distill.teacher='offline'.
  """
  workdir, tokenizer, mesh = _setup(config)
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
  print(f"teacher_logits: wrote {written} records with top-{t.top_k} to {output}")
  return summary

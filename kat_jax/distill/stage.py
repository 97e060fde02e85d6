"""Stage `distill`: a student (`config.model`, optional MTP heads `config.mtp.depth`) trained on
CE + KD/ULD (`config.distill`, kat_jax/distill/config.py) on the trainer.

  python -m experiments.run --config experiments/configs/distill_tiny.py

The teacher is
  * online: a second frozen model in the same job, params sharded like the student's, passed
    to every step, no gradient and no optimizer state; loaded from `distill.teacher_init_from`
    (HF dir, or a `<dir>/teacher` saved by this stage), or trained here first for
    `distill.teacher_train_steps` steps (CE only) and saved;
  * offline: `teacher_topk` fields stored by the `teacher_logits` stage in the data records.
With `distill.compare_variants` (e.g. "ce,kd,uld,uld_mtp") the stage trains one student per
variant from the same init and writes their held-out CE to `<workdir>/comparison.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
from ml_collections import ConfigDict

from kat_jax.checkpoint import models
from kat_jax.data.tokenizer import Tokenizer, get_tokenizer
from kat_jax.distill.config import objective_from
from kat_jax.distill.data import distill_sources, make_batches
from kat_jax.distill.objective import Objective, make_distill_eval_step, make_distill_step
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig, logical_axes
from kat_jax.parallel import logical_to_sharding
from kat_jax.progress import status
from kat_jax.train.inputs import local_batch_size
from kat_jax.train.loop import evaluate
from kat_jax.train.optimizer import learning_rate_schedule, make_optimizer
from kat_jax.train.state import init_sharded_state
from kat_jax.train.trainer import DataBatches, Trainer, mesh_from


def place_teacher(config: ModelConfig, params: Any, mesh) -> tuple[Any, Any]:
  """Teacher params on the mesh with the student's logical-axis rules. -> (params, shardings)."""
  abstract = jax.eval_shape(lambda: params)
  shardings = logical_to_sharding(logical_axes(config), abstract, mesh)
  return jax.device_put(params, shardings), shardings


def train_model(config: ConfigDict, model_config: ModelConfig, objective: Objective, *,
                name: str, workdir: str, tokenizer: Tokenizer, train_source, eval_source,
                mesh, teacher: tuple[ModelConfig, Any] | None = None, steps: int | None = None,
                lr: float | None = None) -> dict[str, Any]:
  """Trains one model under `objective`; a trainer run in `<workdir>/<name>` (resumable).

  Returns {"params", "train" (last metrics), "eval" (held-out CE), "seconds", "steps"}.
  """
  steps = steps or config.train.steps
  optim = ConfigDict(config.optim.to_dict())
  if lr:
    optim.lr = lr
  optimizer = make_optimizer(optim, steps)
  rows = local_batch_size(config.data.batch_size, mesh)
  offline_k = config.distill.teacher_topk if objective.teacher == "offline" else 0
  data = DataBatches(make_batches(train_source, tokenizer, config, rows, train=True,
                                  offline_k=offline_k), mesh)
  trainer = Trainer(config, name=name, workdir=os.path.join(workdir, name), steps=steps,
                    mesh=mesh, meta={"model_config": model_config.to_dict(),
                                     "objective": repr(objective)})
  status(f"{name}: objective ce={objective.ce_weight} {objective.spec.kind}="
         f"{objective.distill_weight} mtp_depth={objective.mtp_depth} "
         f"teacher={objective.teacher}")
  teacher_cfg, extra = None, ()
  if objective.teacher == "online" and objective.needs_teacher:
    if teacher is None:
      raise ConfigError("config.distill.teacher='online' but no teacher model was given")
    teacher_cfg = teacher[0]
    extra = (place_teacher(teacher_cfg, teacher[1], mesh),)
  distill_step = make_distill_step(model_config, teacher_cfg, objective, optimizer,
                                   grad_accum=config.train.grad_accum,
                                   schedule=learning_rate_schedule(optim, steps))

  def step(state, batch, teacher_params=None):
    return distill_step(state, teacher_params, batch)

  def init_state():
    return init_sharded_state(model_config, optimizer, mesh, jax.random.key(config.seed),
                              mtp_depth=objective.mtp_depth)

  evaluate_fn = None
  if eval_source is not None:
    evaluate_fn = lambda state: evaluate_model(  # noqa: E731
        config, model_config, state.params, objective.mtp_depth, tokenizer, eval_source, mesh)
  result = trainer.fit(init_state, step, data, extra=extra, evaluate=evaluate_fn)
  return {"params": result.state.params, "steps": steps, "seconds": result.seconds,
          "train": result.metrics, **({"eval": result.eval} if result.eval else {})}


def evaluate_model(config: ConfigDict, model_config: ModelConfig, params, mtp_depth: int,
                   tokenizer: Tokenizer, eval_source, mesh) -> dict[str, float]:
  """Held-out main-head CE/accuracy over `config.train.eval_batches` batches."""
  eval_fn = jax.jit(make_distill_eval_step(model_config, mtp_depth,
                                           loss_chunk=config.train.loss_chunk))
  rows = local_batch_size(config.data.batch_size, mesh)
  batches = make_batches(eval_source, tokenizer, config, rows, train=False)
  return evaluate(eval_fn, params, batches, config.train.eval_batches, mesh)


def setup(config: ConfigDict):
  """(absolute workdir, tokenizer, mesh) of a distill or teacher_logits run."""
  workdir = os.path.abspath(config.workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir, get_tokenizer(config.data.tokenizer), mesh_from(config)


def obtain_teacher(config: ConfigDict, workdir: str, tokenizer: Tokenizer, train_source,
                   eval_source, mesh, *, evaluate_loaded: bool = True
                   ) -> tuple[ModelConfig, Any, dict[str, Any]]:
  """(teacher config, params, info): loaded from `teacher_init_from` or trained here first."""
  d = config.distill
  saved = os.path.join(workdir, "teacher")
  if d.teacher_init_from:
    teacher_cfg, params = models.load_model(d.teacher_init_from,
                                            what="config.distill.teacher_init_from")
    return teacher_cfg, params, {"loaded_from": d.teacher_init_from}
  if os.path.exists(os.path.join(saved, "config.json")):  # saved by an earlier run
    teacher_cfg, params = models.load_model(saved)
    info = {"loaded_from": saved}
    if eval_source is not None and evaluate_loaded:
      info["eval"] = evaluate_model(config, teacher_cfg, params, 0, tokenizer, eval_source, mesh)
    return teacher_cfg, params, info
  if d.teacher_train_steps <= 0:
    raise ConfigError("config.distill: a teacher is needed; set teacher_init_from or "
                      "teacher_train_steps > 0")
  teacher_cfg = models.config_from_model_fields(d.teacher_model,
                                               what="config.distill.teacher_model")
  models.check_vocab(teacher_cfg, tokenizer, what="config.distill.teacher_model")
  ce_only = Objective(eos_id=tokenizer.eos_id, loss_chunk=config.train.loss_chunk)
  result = train_model(config, teacher_cfg, ce_only, name="teacher_run", workdir=workdir,
                       tokenizer=tokenizer, train_source=train_source,
                       eval_source=eval_source, mesh=mesh, steps=d.teacher_train_steps,
                       lr=d.teacher_lr or None)
  params = jax.device_get(result["params"])
  if jax.process_index() == 0:
    models.save_model(saved, teacher_cfg, params)
  info = {"trained_steps": result["steps"], "seconds": result["seconds"],
          "eval": result.get("eval"), "saved_to": saved}
  return teacher_cfg, params, info


def run_distill(config: ConfigDict) -> dict[str, Any]:
  """Stage `distill`. Returns the final metrics (or the comparison table)."""
  workdir, tokenizer, mesh = setup(config)
  student_cfg = models.config_from_model_fields(config.model)
  models.check_vocab(student_cfg, tokenizer)
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
    models.check_vocab(teacher_cfg, tokenizer, what="config.distill teacher")
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
      models.save_model(os.path.join(workdir, name, "final"), student_cfg,
                 jax.device_get(result["params"]))
  summary["students"] = results
  summary["student_model"] = {"num_layers": student_cfg.num_layers,
                              "hidden_size": student_cfg.hidden_size}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "comparison.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2, default=str)
  return summary

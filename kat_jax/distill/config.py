"""`config.distill`, `config.mtp` and `config.teacher_logits`: schemas and the `Objective` they fill.

Validation lives in `Objective.__post_init__` (kat_jax/distill/objective.py) and
`DistillSpec`; `objective_from` turns their ValueErrors into one-line ConfigErrors.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from kat_jax.data.tokenizer import Tokenizer
from kat_jax.distill.losses import DistillSpec
from kat_jax.distill.objective import Objective
from kat_jax.errors import ConfigError
from kat_jax.model.config import model_fields

VARIANTS = ("ce", "kd", "uld", "ce_mtp", "kd_mtp", "uld_mtp")


def mtp_fields() -> ConfigDict:
  """`config.mtp`: depth 0 = no MTP heads; λ piecewise constant (values, step boundaries)."""
  return ConfigDict(dict(depth=0, lambda_values="0.3", lambda_boundaries="", ce_weight=1.0,
                         distill_weight=1.0))


def distill_fields() -> ConfigDict:
  """`config.distill`: loss, teacher and comparison settings."""
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

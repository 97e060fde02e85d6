"""Offline teacher: store the tiny teacher's top-k log-probs for the dual-regime records.

  python -m experiments.run --config experiments/configs/distill_tiny.py      # trains teacher
  python -m experiments.run --config experiments/configs/teacher_logits_tiny.py
  python -m experiments.run --config experiments/configs/distill_offline_tiny.py

Reuses `runs/distill_tiny/teacher` when it exists, otherwise trains the teacher first.
"""

from experiments.configs import distill_tiny
from kat_jax.distill.config import teacher_logits_fields


def get_config():
  config = distill_tiny.get_config()
  config.stage = "teacher_logits"
  config.distill.compare_variants = ""
  config.distill.teacher_init_from = "runs/distill_tiny/teacher"
  config.data.synthetic_docs = 4000
  config.teacher_logits = teacher_logits_fields()
  config.teacher_logits.output = "runs/distill_tiny/teacher_logits"
  return config

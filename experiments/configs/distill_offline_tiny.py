"""Student distilled from stored teacher top-k (see teacher_logits_tiny.py), ULD + MTP.

  python -m experiments.run --config experiments/configs/distill_offline_tiny.py
"""

from experiments.configs import distill_tiny


def get_config():
  config = distill_tiny.get_config()
  config.workdir = "runs/distill_offline_tiny"
  config.data.source = "array_record"
  config.data.paths = "runs/distill_tiny/teacher_logits/train.array_record"
  config.data.eval_paths = "runs/distill_tiny/teacher_logits/eval.array_record"
  config.distill.teacher = "offline"
  config.distill.loss = "uld"
  config.distill.compare_variants = ""
  return config

"""MTP + KD/ULD distillation at CPU size on dual-regime data (AutoThink tasks, stage-1 render).

  python -m experiments.run --config experiments/configs/distill_tiny.py

Trains a `tiny` teacher (4 layers, hidden 128) with CE first, then the same small student
(2 layers, hidden 64) once per variant — CE only, KD, ULD, ULD + MTP, KD + MTP (D=1) — from the same
init, and writes their held-out CE to `<workdir>/comparison.json`. For one student only, set
`--config.distill.compare_variants=` and choose `distill.loss`, `distill.weight`, `mtp.depth`.
"""

from experiments.configs.base import base_config
from kat_jax.distill.config import distill_fields, mtp_fields


def get_config():
  config = base_config()
  config.stage = "distill"
  config.workdir = "runs/distill_tiny"
  # Student: half the teacher's depth and width.
  config.model.num_layers = 2
  config.model.hidden_size = 64
  config.model.intermediate_size = 192
  config.data.source = "dual_regime"
  config.data.synthetic_docs = 20000
  config.data.synthetic_eval_docs = 400
  config.data.seq_len = 256
  config.data.batch_size = 8
  config.optim.lr = 3e-3
  config.optim.warmup_steps = 10
  config.train.steps = 120
  config.train.log_every = 25
  config.train.eval_batches = 16
  config.train.checkpoint_every = 1000
  config.train.tensorboard = False
  config.mtp = mtp_fields()
  config.mtp.depth = 1
  config.mtp.lambda_values = "0.3,0.1"  # DeepSeek-V3's schedule, switched at step 80
  config.mtp.lambda_boundaries = "80"
  config.distill = distill_fields()
  config.distill.teacher = "online"
  config.distill.teacher_train_steps = 200
  config.distill.compare_variants = "ce,kd,uld,uld_mtp,kd_mtp"
  return config

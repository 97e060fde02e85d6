"""Knowledge distillation: KD / ULD losses, MTP supervision, teachers online or stored."""

from kat_jax.distill.losses import (DistillSpec, TeacherHidden, TeacherTopK, distill_loss,
                                    forward_kl, forward_kl_topk, uld, uld_topk_teacher)

__all__ = ["DistillSpec", "TeacherHidden", "TeacherTopK", "distill_loss", "forward_kl",
           "forward_kl_topk", "uld", "uld_topk_teacher"]

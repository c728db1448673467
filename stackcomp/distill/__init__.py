"""Knowledge distillation: losses on tensors, student construction, and a reusable KD loss_fn."""

from stackcomp.distill.kd import KDLoss, KDWeights, forward_inputs, make_kd_loss_fn
from stackcomp.distill.students import cut_student, student_from_config, student_from_pretrained

__all__ = ["KDLoss", "KDWeights", "forward_inputs", "make_kd_loss_fn", "cut_student", "student_from_config",
           "student_from_pretrained"]

"""Cross-entropy between a teacher distribution and a tempered student softmax (DINO §3.1, eq. 2).

``H(t, s) = -sum_k t_k * log softmax(s / T_student)_k`` per sample: the single term that the DINO
(image-level) and iBOT (patch-level) objectives of DINOv2 §4 sum over crop pairs or masked tokens.

The student logits are promoted to at least float32 before the log-softmax (the official iBOT loss
does this through xformers' fused ``cross_entropy``; the official DINO loss computes in the input
dtype). float64 stays float64 so the losses can be gradient-checked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def student_log_probs(student_logits: Tensor, student_temp: float) -> Tensor:
    """``log_softmax(student_logits / student_temp)`` over the last axis, in at least float32. (..., K)"""
    compute_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    return F.log_softmax(student_logits.to(compute_dtype) / student_temp, dim=-1)


def teacher_student_cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-sample ``-sum_k t_k log softmax(s / T)_k``: (..., K), (..., K) -> (...)."""
    return -(teacher_probs * student_log_probs(student_logits, student_temp)).sum(dim=-1)

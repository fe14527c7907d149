"""Self-supervised pretraining with the DINOv2 recipe (DINOv2 §4 "Discriminative self-supervised pre-training").

Heads and losses, one idea per module:

- ``dino_head``: :class:`DINOHead` (MLP, L2 normalisation, weight-normalised prototypes) and
  :func:`cancel_last_layer_gradients` (frozen prototypes during the first epoch);
- ``sinkhorn``: :func:`sinkhorn_knopp`, the Sinkhorn-Knopp teacher (distributed-aware);
- ``centering``: :class:`TeacherCentering`, the EMA-centered teacher softmax;
- ``cross_entropy``: the teacher/student cross-entropy both objectives sum;
- ``dino_loss``: :class:`DINOLoss` and :func:`dino_cross_view_loss` (the official crop pairing);
- ``ibot_loss``: :class:`iBOTPatchLoss` on masked patches;
- ``koleo``: :class:`KoLeoLoss` and :func:`koleo_loss_per_crop`;
- ``all_reduce``: collectives that are no-ops without a process group.

The meta-architecture, schedules and parameter groups live in their own modules of this package and
are imported from there. Importing this package has no side effects. See docs/ssl-losses.md.
"""

from components.ssl.centering import TeacherCentering
from components.ssl.cross_entropy import student_log_probs, teacher_student_cross_entropy
from components.ssl.dino_head import DINOHead, cancel_last_layer_gradients, official_head_state_dict
from components.ssl.dino_loss import DINOCrossViewLosses, DINOLoss, dino_cross_view_loss, dino_n_loss_terms
from components.ssl.ibot_loss import iBOTPatchLoss, masked_token_weights
from components.ssl.koleo import KoLeoLoss, koleo_loss, koleo_loss_per_crop, nearest_neighbour_indices
from components.ssl.sinkhorn import sinkhorn_knopp

__all__ = [
    "DINOCrossViewLosses",
    "DINOHead",
    "DINOLoss",
    "KoLeoLoss",
    "TeacherCentering",
    "cancel_last_layer_gradients",
    "dino_cross_view_loss",
    "dino_n_loss_terms",
    "iBOTPatchLoss",
    "koleo_loss",
    "koleo_loss_per_crop",
    "masked_token_weights",
    "nearest_neighbour_indices",
    "official_head_state_dict",
    "sinkhorn_knopp",
    "student_log_probs",
    "teacher_student_cross_entropy",
]

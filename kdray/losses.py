"""The knowledge-distillation loss (Hinton et al. 2015), with torchdistill's T² scaling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
            alpha: float = 0.0, temperature: float = 4.0, label_smoothing: float = 0.0,
            class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + (1−α)·CE(s, y).

    With ``alpha == 0`` this is plain cross-entropy and the teacher is not needed: the
    no-KD baseline runs through exactly the same code.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ce = F.cross_entropy(student_logits.float(), targets, weight=class_weights, label_smoothing=label_smoothing)
    if alpha == 0.0:
        return ce
    if teacher_logits is None:
        raise ValueError("alpha > 0 needs teacher logits")
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                  reduction="batchmean", log_target=True)
    return alpha * (t * t) * kl + (1.0 - alpha) * ce

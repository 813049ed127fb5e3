"""Distillation loss terms: soft-target KL (Hinton et al. 2015) and hard-label task losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)), without the T^2 factor.

    Logits are (..., V); every leading position is one row (an image, or a token for LMs). `mask` (...)
    selects the rows that count (e.g. non-padding tokens).
    """
    vocab = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)  # (N, V)
    t = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)  # (N, V)
    per_row = (t.exp() * (t - s)).sum(-1)  # (N,)
    if mask is None:
        return per_row.mean()
    weights = mask.reshape(-1).to(per_row.dtype)  # (N,)
    return (per_row * weights).sum() / weights.sum().clamp_min(1.0)


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal-LM loss: position t predicts token t+1; positions whose target is masked do not count."""
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    target = input_ids[:, 1:].reshape(-1).clone()  # (B*(T-1),)
    if mask is not None:
        target[mask[:, 1:].reshape(-1) == 0] = -100
    return F.cross_entropy(pred, target, ignore_index=-100)


def project_feature(student: torch.Tensor, projection: torch.nn.Module) -> torch.Tensor:
    """Student features mapped to the teacher's width (FitNets, arXiv 1412.6550).

    Channels are dim 1 of 4-D conv maps (B, C, H, W) and the last dim otherwise (B, T, H) or (B, H); the
    projection is a Linear over that dim (identity when the widths agree).
    """
    if student.dim() == 4:
        return projection(student.movedim(1, -1)).movedim(-1, 1)  # (B, C_t, H, W)
    return projection(student)  # (..., H_t)


def feature_mse(projected: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between projected student features (`project_feature`) and teacher features."""
    return F.mse_loss(projected.float(), teacher.float())

"""Distillation losses on plain tensors: no model, no pass, no training loop in sight.

Prediction-layer losses compare logits (N, C); a single logit (C == 1) is a regression task,
where every prediction-layer loss is the MSE on that logit. Intermediate losses compare
hidden states (N, L, D) and attention maps (N, H, L, L) over the real (unpadded) tokens
only, so the same example gives the same loss whatever its batch's padded length.

Layer maps name, for each student layer m = 1..M, the teacher layer g(m) in 1..N it learns
from (hidden-state index; 0 is the embedding output, always mapped to 0). TinyBERT's uniform
map is g(m) = m*N/M (floored), so the last student layer always learns from the last teacher
layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "soft_kl",
    "soft_cross_entropy",
    "hard_loss",
    "hidden_cosine",
    "hidden_mse",
    "attention_mse",
    "uniform_layer_map",
    "resolve_layer_map",
    "HiddenProjection",
]


def _is_regression(logits: torch.Tensor) -> bool:
    return logits.shape[-1] == 1


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's soft-target loss: KL(p_t^T || p_s^T) * T^2, averaged over examples.

    The T^2 factor keeps the gradient scale independent of the temperature (the softened
    gradients shrink as 1/T^2). One logit (regression): MSE between the two logits, no T.
    """
    s, t = student_logits.float(), teacher_logits.float().detach()
    if _is_regression(s):
        return F.mse_loss(s.squeeze(-1), t.squeeze(-1))
    T = float(temperature)
    log_ps = F.log_softmax(s / T, dim=-1)
    log_pt = F.log_softmax(t / T, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (T * T)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """TinyBERT's prediction-layer loss: -sum p_t^T log p_s^T, averaged over examples (no T^2).

    It differs from :func:`soft_kl` (at T=1) by the teacher's entropy, a constant for the
    student. One logit (regression): MSE between the two logits.
    """
    s, t = student_logits.float(), teacher_logits.float().detach()
    if _is_regression(s):
        return F.mse_loss(s.squeeze(-1), t.squeeze(-1))
    T = float(temperature)
    return -(F.softmax(t / T, dim=-1) * F.log_softmax(s / T, dim=-1)).sum(-1).mean()


def hard_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The task loss against gold labels: cross-entropy, or MSE on the logit for regression."""
    s = student_logits.float()
    if _is_regression(s):
        return F.mse_loss(s.squeeze(-1), labels.float().view(-1))
    return F.cross_entropy(s, labels.view(-1).long())


def _token_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(N, L) float mask of real tokens; all ones when no mask is given."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.float32, device=like.device)
    return mask.to(device=like.device, dtype=torch.float32)


def hidden_cosine(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT's cosine loss: mean over real tokens of 1 - cos(h_s, h_t) (same widths)."""
    _same_shape("hidden_cosine", student_h, teacher_h)
    m = _token_mask(mask, student_h)
    cos = F.cosine_similarity(student_h.float(), teacher_h.float().detach(), dim=-1, eps=1e-8)
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)


def hidden_mse(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's hidden-state loss: squared error averaged over real tokens and features.

    The student's states must already be projected to the teacher's width (see
    :class:`HiddenProjection`).
    """
    _same_shape("hidden_mse", student_h, teacher_h)
    m = _token_mask(mask, student_h)
    sq = (student_h.float() - teacher_h.float().detach()).pow(2).sum(-1)  # (N, L)
    return (sq * m).sum() / (m.sum().clamp_min(1.0) * student_h.shape[-1])


def attention_mse(student_att: torch.Tensor, teacher_att: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT's attention loss: squared error of attention maps (N, H, L, L), averaged over
    heads and (query, key) pairs of real tokens.

    When the head counts differ the head-averaged maps are compared.
    """
    if student_att.dim() != 4 or teacher_att.dim() != 4:
        raise ValueError(f"attention_mse: expected (N, H, L, L) maps, got {tuple(student_att.shape)} "
                         f"and {tuple(teacher_att.shape)}")
    s, t = student_att.float(), teacher_att.float().detach()
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    _same_shape("attention_mse", s, t)
    m = _token_mask(mask, s[:, 0])
    pair = m[:, None, :, None] * m[:, None, None, :]  # (N, 1, L, L): real query x real key
    sq = (s - t).pow(2) * pair
    return sq.sum() / (pair.sum().clamp_min(1.0) * s.shape[1])


def _same_shape(what: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student {tuple(a.shape)} and teacher {tuple(b.shape)} differ")


# ----------------------------------------------------------------------------- layer maps


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform map g(m) = floor(m*N/M), m = 1..M (1-based teacher layers)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError(f"layer counts must be positive (student {student_layers}, teacher {teacher_layers})")
    if student_layers > teacher_layers:
        raise ValueError(f"a uniform layer map needs a student no deeper than its teacher "
                         f"(student {student_layers} layers, teacher {teacher_layers}); give layer_map explicitly")
    return [m * teacher_layers // student_layers for m in range(1, student_layers + 1)]


def resolve_layer_map(layer_map: Sequence[int] | None, student_layers: int, teacher_layers: int) -> list[int]:
    """The uniform map, or ``layer_map`` checked: one teacher layer in 1..N per student layer."""
    if layer_map is None:
        return uniform_layer_map(student_layers, teacher_layers)
    out = [int(g) for g in layer_map]
    if len(out) != student_layers:
        raise ValueError(f"layer_map has {len(out)} entries but the student has {student_layers} layers "
                         "(one teacher layer per student layer)")
    bad = [g for g in out if not 1 <= g <= teacher_layers]
    if bad:
        raise ValueError(f"layer_map entries must be teacher layers 1..{teacher_layers} (1-based; the embeddings "
                         f"are always mapped to each other), got {bad}")
    return out


class HiddenProjection(nn.Module):
    """TinyBERT's learned W_h: maps student states to the teacher's width (identity if equal).

    One projection is shared by every mapped layer and the embeddings, as in TinyBERT's code.
    It is trained with the student and thrown away afterwards.
    """

    def __init__(self, student_width: int, teacher_width: int):
        super().__init__()
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.proj = nn.Linear(student_width, teacher_width) if student_width != teacher_width else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.student_width:
            raise ValueError(f"HiddenProjection: expected width {self.student_width}, got {h.shape[-1]}")
        return h if self.proj is None else self.proj(h)

"""Mutual knowledge distillation between a shared student and a private teacher (FedKD-style).

In the style of FedKD (Wu et al., *Nature Communications* 13, 2032, 2022): every client keeps a
larger *teacher* that never leaves it and trains it together with the shared compact *student*;
each learns from the labels and from the other's softened predictions. Only the student is
communicated (pruned and int8 like any other payload).

With student logits ``s``, teacher logits ``t``, labels ``y``, temperature ``T`` and
``p_T(z) = softmax(z / T)``, the two losses of a batch are (means over the batch)::

    student_loss = CE(s, y) + alpha * T**2 * KL(p_T(t) || p_T(s))     # t detached
    teacher_loss = CE(t, y) + beta  * T**2 * KL(p_T(s) || p_T(t))     # s detached

``T**2`` keeps the soft terms' gradients on the scale of the hard term's as ``T`` grows (Hinton
et al., 2015). Each model's loss reads the other's logits as constants, so the sum
``student_loss + teacher_loss`` trains each model with its own loss only, and one backward pass
(one optimizer, one DP-SGD mechanism) trains both. Every term is a mean over examples of a
per-example loss, which is what Opacus's per-sample gradients assume (``reduction="mean"``).

Differences from the paper: FedKD also distills hidden states and attention, adapts the loss
weights to each model's prediction quality and compresses updates with SVD; here the soft-label
terms only, with fixed weights, and the payload is compressed by pruning and int8 instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillPair", "mutual_distillation_loss"]


def _soft_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T**2 * KL(p_T(target) || p_T(logits))``, summed over classes, mean over the batch."""
    log_p = F.log_softmax(logits / temperature, dim=-1)
    log_q = F.log_softmax(target_logits / temperature, dim=-1)
    # kl_div(input=log p, target=log q, log_target) = sum q * (log q - log p); batchmean / B.
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def mutual_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the student's and the teacher's losses of mutual distillation.

    Parameters
    ----------
    student_logits, teacher_logits : torch.Tensor
        ``(B, C)`` logits of the two models on the same batch.
    targets : torch.Tensor
        ``(B,)`` integer class labels.
    temperature : float
        Softening temperature ``T > 0``.
    alpha : float
        Weight (``>= 0``) of ``T**2 * KL(p_T(teacher) || p_T(student))`` in the student's loss.
    beta : float
        Weight (``>= 0``) of ``T**2 * KL(p_T(student) || p_T(teacher))`` in the teacher's loss.

    Returns
    -------
    tuple of torch.Tensor
        ``(student_loss, teacher_loss)``, scalars. The student's loss has no gradient with
        respect to the teacher's logits and vice versa. An empty batch gives two zeros that
        still backpropagate (a noise-only DP-SGD step).
    """
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if alpha < 0.0 or beta < 0.0:
        raise ValueError(f"alpha and beta must be >= 0, got {alpha!r} and {beta!r}")
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            "student and teacher logits must both be (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if len(targets) == 0:
        zero = 0.0 * (student_logits.sum() + teacher_logits.sum())
        return zero, zero
    student_loss = F.cross_entropy(student_logits, targets) + alpha * _soft_kl(
        teacher_logits.detach(), student_logits, temperature
    )
    teacher_loss = F.cross_entropy(teacher_logits, targets) + beta * _soft_kl(
        student_logits.detach(), teacher_logits, temperature
    )
    return student_loss, teacher_loss


class DistillPair(nn.Module):
    """A student and a teacher trained as one module: ``forward`` returns both logits.

    Wrapping both in one module lets one optimizer (and, under DP, one Opacus ``PrivacyEngine``)
    train both: the per-sample gradient of the joint loss over *both* parameter sets is clipped
    to ``max-grad-norm`` and noised once per step, so the pair is a single accounted DP-SGD
    mechanism. Parameter names are ``student.<name>`` and ``teacher.<name>``.

    Parameters
    ----------
    student, teacher : nn.Module
        Classifiers with the same number of classes.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(student_logits, teacher_logits)`` of ``x``."""
        return self.student(x), self.teacher(x)

"""Losses of the three methods, as plain functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ppnce", "soft_ce", "topk_to_dense", "ppkd"]


def ppnce(z3d: torch.Tensor, z2d: torch.Tensor, temperature: float = 0.04) -> torch.Tensor:
    """PPKT's pixel-to-point contrastive (InfoNCE) loss.

    L = -(1/n) sum_i log( exp(f_i . g_i / tau) / sum_j exp(f_i . g_j / tau) ),
    with f_i the L2-normalised point embedding (row i of ``z3d``), g_i the embedding of the
    pixel the point came from (row i of ``z2d``), the other sampled pixels g_j (j != i) as
    negatives, and tau the temperature (0.04 in the paper). Inputs are (n, d), already unit-norm.
    """
    if z3d.dim() != 2 or z3d.shape != z2d.shape:
        raise ValueError(f"z3d and z2d must be (n, d) of one shape, got {tuple(z3d.shape)} and {tuple(z2d.shape)}")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    n = z3d.shape[0]
    if n == 0:
        raise ValueError("ppnce needs at least one pair")
    logits = (z3d @ z2d.t()) / temperature
    target = torch.arange(n, device=z3d.device)
    return F.cross_entropy(logits, target)


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the Data-Efficient 3D Learner's pseudo-label pretraining.

    L = -(1/n) sum_i sum_c t_ic log softmax(s_i)_c, with s_i the 3D network's class logits of
    point i and t_i the 2D teacher's class distribution at the point's pixel.
    """
    if logits.shape != target_probs.shape or logits.dim() != 2:
        raise ValueError(
            f"logits and target_probs must be (n, C) of one shape, got "
            f"{tuple(logits.shape)} and {tuple(target_probs.shape)}"
        )
    logp = F.log_softmax(logits, dim=1)
    return -(target_probs.to(logp.dtype) * logp).sum(dim=1).mean()


def topk_to_dense(prob: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense (n, num_classes) targets from stored top-k soft labels.

    ``prob`` (n, k) and ``index`` (n, k) are the k most probable classes of each point's cell
    (teacher.zarr ``soft_labels``); the k probabilities are renormalised to sum to 1 (rows whose
    k probabilities are all zero get 1/k each) and scattered into their classes.
    """
    if prob.shape != index.shape or prob.dim() != 2:
        raise ValueError(
            f"prob and index must be (n, k) of one shape, got {tuple(prob.shape)} and {tuple(index.shape)}"
        )
    p = prob.to(torch.float32).clamp_min(0.0)
    idx = index.to(torch.long)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes})")
    s = p.sum(dim=1, keepdim=True)
    k = p.shape[1]
    p = torch.where(s > 0, p / s.clamp_min(torch.finfo(p.dtype).tiny), torch.full_like(p, 1.0 / max(k, 1)))
    out = torch.zeros(p.shape[0], num_classes, dtype=p.dtype, device=p.device)
    return out.scatter_add_(1, idx, p)


def ppkd(
    logits3d: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0, teacher_is_prob: bool = False
) -> torch.Tensor:
    """Point-pixel knowledge distillation (PPKT's PPKD ablation baseline).

    L = tau^2 (1/n) sum_i KL(p_i || q_i),  p_i = softmax(t_i / tau),  q_i = softmax(s_i / tau),
    Hinton et al.'s distillation with the teacher's pixel logits t_i and the point logits s_i;
    the tau^2 factor keeps gradient magnitudes comparable across temperatures. With
    ``teacher_is_prob`` the teacher gives probabilities p and t_i = log p_i (so tau = 1 uses p
    as is). KL uses 0 log 0 = 0.
    """
    if logits3d.shape != teacher.shape or logits3d.dim() != 2:
        raise ValueError(
            f"logits3d and teacher must be (n, C) of one shape, got {tuple(logits3d.shape)} and {tuple(teacher.shape)}"
        )
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    t = teacher.detach().to(logits3d.dtype)  # the teacher is frozen
    if teacher_is_prob:
        t = torch.log(t.clamp_min(0.0))
    p = F.softmax(t / temperature, dim=1)
    log_q = F.log_softmax(logits3d / temperature, dim=1)
    kl = torch.xlogy(p, p) - p * log_q
    return (temperature**2) * kl.sum(dim=1).mean()

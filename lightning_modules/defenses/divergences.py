"""Per-sample divergences and probabilities for single-label (softmax) and multi-label
(per-finding sigmoid, i.e. independent Bernoulli) outputs. Computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["kl_per_sample", "true_class_prob"]


def kl_per_sample(logits_p: torch.Tensor, logits_q: torch.Tensor, task: str,
                  reduce: bool = True) -> torch.Tensor:
    """``KL(P || Q)`` per sample, P and Q given by logits.

    multiclass: ``sum_k p_k (log p_k - log q_k)`` over the softmax classes.
    multilabel: per finding ``p log(p/q) + (1-p) log((1-p)/(1-q))`` with ``p = sigmoid``;
    summed over findings when ``reduce`` (else shape ``(batch, findings)``).
    """
    lp, lq = logits_p.float(), logits_q.float()
    if task == "multiclass":
        log_p, log_q = F.log_softmax(lp, dim=1), F.log_softmax(lq, dim=1)
        kl = log_p.exp() * (log_p - log_q)
    else:
        lp1, lp0 = F.logsigmoid(lp), F.logsigmoid(-lp)
        lq1, lq0 = F.logsigmoid(lq), F.logsigmoid(-lq)
        kl = lp1.exp() * (lp1 - lq1) + lp0.exp() * (lp0 - lq0)
    return kl.sum(dim=1) if (reduce or task == "multiclass") else kl


def true_class_prob(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    """Probability of the true label: ``(batch,)`` for multiclass, ``(batch, findings)`` for
    multilabel (``p`` where the finding is present, ``1 - p`` where absent)."""
    z = logits.float()
    if task == "multiclass":
        return F.softmax(z, dim=1).gather(1, y.long().view(-1, 1)).squeeze(1)
    p = torch.sigmoid(z)
    yf = y.float()
    return yf * p + (1 - yf) * (1 - p)

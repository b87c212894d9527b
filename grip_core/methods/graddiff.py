"""Gradient difference: L = -γ·NLL(forget) + α·R(retain).

R is the retain NLL, or (retain_loss="kl") KL(π_ref ‖ π_θ) on the retain answer
tokens, which holds the whole next-token distribution, not only the gold token.
NPO and SimNPO reuse this class for their retain term, as in open-unlearning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import (Batch, MethodArgs, MethodLoss, UnlearningMethod, forward_logits, reduce_nll, register_method,
                   require_batch, require_reference, token_nll)


@dataclass
class GradDiffArgs(MethodArgs):
    gamma: float = 1.0  # weight of the forget term
    alpha: float = 1.0  # weight of the retain term (0 skips the retain forward)
    retain_loss: Literal["nll", "kl"] = "nll"

    def __post_init__(self):
        if self.retain_loss not in ("nll", "kl"):
            raise ValueError(f"retain_loss must be 'nll' or 'kl', got {self.retain_loss!r}")


def retain_kl(model: nn.Module, ref_model: nn.Module, batch: Batch) -> torch.Tensor:
    """() KL(π_ref ‖ π_θ) per answer-token position, averaged over those positions."""
    logits = forward_logits(model, batch)[:, :-1].float()  # (B, T-1, V)
    with torch.no_grad():
        ref_logits = forward_logits(ref_model, batch)[:, :-1].float()
    mask = batch["labels"][:, 1:] != -100  # (B, T-1)
    if not mask.any():
        return logits.sum() * 0.0
    logp = F.log_softmax(logits[mask], -1)  # (N, V)
    ref_logp = F.log_softmax(ref_logits[mask], -1)
    return F.kl_div(logp, ref_logp, reduction="batchmean", log_target=True)


@register_method("graddiff")
class GradDiff(UnlearningMethod):
    args_cls = GradDiffArgs
    args: GradDiffArgs

    def __init__(self, args: GradDiffArgs | None = None, **kwargs):
        super().__init__(args, **kwargs)
        # only the KL retain term needs the frozen model (NPO overrides to always True)
        self.needs_reference = type(self).needs_reference or self.args.retain_loss == "kl"

    def retain_term(self, model: nn.Module, retain_batch: Batch | None, ref_model: nn.Module | None) -> torch.Tensor:
        """() the un-weighted retain loss R."""
        batch = require_batch(retain_batch, type(self).__name__)
        if self.args.retain_loss == "kl":
            return retain_kl(model, require_reference(ref_model, f"{type(self).__name__}(retain_loss='kl')"), batch)
        return reduce_nll(*token_nll(forward_logits(model, batch), batch["labels"]))

    def combine(self, forget_loss: torch.Tensor, model: nn.Module, retain_batch: Batch | None,
                ref_model: nn.Module | None, **extra: float) -> MethodLoss:
        """γ·forget_loss + α·R, with the parts to log."""
        a = self.args
        if a.alpha == 0:
            retain = torch.zeros((), device=forget_loss.device)
            total = a.gamma * forget_loss
        else:
            retain = self.retain_term(model, retain_batch, ref_model)
            total = a.gamma * forget_loss + a.alpha * retain
        parts = {"forget_loss": forget_loss.item(), "retain_loss": retain.item(), **extra}
        return MethodLoss(total, parts)

    def loss(self, model: nn.Module, forget_batch: Batch, retain_batch: Batch | None = None,
             ref_model: nn.Module | None = None) -> MethodLoss:
        nll = reduce_nll(*token_nll(forward_logits(model, forget_batch), forget_batch["labels"]))  # ()
        return self.combine(-nll, model, retain_batch, ref_model, forget_nll=nll.item())

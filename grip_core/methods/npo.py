"""Negative Preference Optimization (Zhang et al. 2024, arXiv 2404.05868).

    L_f = -(2/β) · mean_i log σ(-β · [log π_θ(y_i|x_i) - log π_ref(y_i|x_i)])
    L   = γ·L_f + α·R(retain)          (R as in GradDiff)

log π are summed over answer tokens. Unlike GA the forget gradient is weighted by
σ(β·log-ratio), which fades once π_θ(y|x) falls below π_ref(y|x): no collapse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, MethodLoss, forward_logits, reduce_nll, register_method, require_reference, token_nll
from .graddiff import GradDiff, GradDiffArgs


@dataclass
class NPOArgs(GradDiffArgs):
    beta: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@register_method("npo")
class NPO(GradDiff):
    args_cls = NPOArgs
    args: NPOArgs
    needs_reference = True

    def loss(self, model: nn.Module, forget_batch: Batch, retain_batch: Batch | None = None,
             ref_model: nn.Module | None = None) -> MethodLoss:
        ref = require_reference(ref_model, "NPO")
        labels = forget_batch["labels"]
        nll, mask = token_nll(forward_logits(model, forget_batch), labels)  # (B, T-1)
        with torch.no_grad():
            ref_nll, _ = token_nll(forward_logits(ref, forget_batch), labels)
        log_ratio = ref_nll.sum(-1) - nll.sum(-1)  # (B,) log π_θ(y|x) - log π_ref(y|x)
        beta = self.args.beta
        forget_loss = -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()  # ()
        return self.combine(forget_loss, model, retain_batch, ref_model,
                            forget_nll=reduce_nll(nll, mask).item(), log_ratio=log_ratio.mean().item())

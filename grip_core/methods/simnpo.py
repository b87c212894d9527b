"""SimNPO (Fan et al. 2024, arXiv 2410.07163): NPO without the reference model,
on the length-normalised log-probability.

    L_f = -(2/β) · mean_i log σ(β · NLL_sum(y_i|x_i)/|y_i| - δ)
    L   = γ·L_f + α·R(retain)          (R as in GradDiff)

Since NLL/|y| = -log π(y|x)/|y|, this is the paper's
-(2/β) log σ(-(β/|y|)·log π_θ(y|x) - δ) with δ the paper's reward margin γ.
Minimising it raises the forget NLL. open-unlearning writes
log σ(β·(NLL/|y| - δ)), i.e. margin β·δ; the two agree at the default δ = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .base import Batch, MethodLoss, forward_logits, reduce_nll, register_method, token_nll
from .graddiff import GradDiff, GradDiffArgs


@dataclass
class SimNPOArgs(GradDiffArgs):
    gamma: float = 0.125  # forget weight (docs/method.md#unlearning-methods)
    beta: float = 4.5
    delta: float = 0.0  # reward margin

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@register_method("simnpo")
class SimNPO(GradDiff):
    args_cls = SimNPOArgs
    args: SimNPOArgs

    def loss(self, model: nn.Module, forget_batch: Batch, retain_batch: Batch | None = None,
             ref_model: nn.Module | None = None) -> MethodLoss:
        nll, mask = token_nll(forward_logits(model, forget_batch), forget_batch["labels"])  # (B, T-1)
        nll_avg = reduce_nll(nll, mask, "seq_mean")  # (B,) NLL_sum / |y|
        a = self.args
        forget_loss = -(2.0 / a.beta) * F.logsigmoid(a.beta * nll_avg - a.delta).mean()  # ()
        return self.combine(forget_loss, model, retain_batch, ref_model, forget_nll=reduce_nll(nll, mask).item())

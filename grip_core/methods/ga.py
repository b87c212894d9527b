"""Gradient ascent: L = -NLL(forget). The simplest forgetting signal; no retain term."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .base import (Batch, MethodArgs, MethodLoss, UnlearningMethod, forward_logits, reduce_nll, register_method,
                   token_nll)


@dataclass
class GAArgs(MethodArgs):
    """GA has no hyper-parameters (the learning rate lives in the scope)."""


@register_method("ga")
class GA(UnlearningMethod):
    args_cls = GAArgs

    def loss(self, model: nn.Module, forget_batch: Batch, retain_batch: Batch | None = None,
             ref_model: nn.Module | None = None) -> MethodLoss:
        nll = reduce_nll(*token_nll(forward_logits(model, forget_batch), forget_batch["labels"]))  # ()
        total = -nll
        return MethodLoss(total, {"forget_loss": total.item(), "forget_nll": nll.item()})

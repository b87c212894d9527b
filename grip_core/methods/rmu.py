"""Representation Misdirection for Unlearning (Li et al. 2024, WMDP, arXiv 2403.03218).

At decoder layer ℓ (its output hidden state h, (B, T, d)):
    L_f = msd(h_θ(forget), c·u)            u: random unit vector, fixed by `seed`
    L_r = msd(h_θ(retain), h_ref(retain))  h_ref: the frozen original model
    L   = γ·L_f + α·L_r
msd(a, b) = mean_i [ Σ_{t ∈ answer_i} mean_d (a - b)² / |answer_i| ], as in
open-unlearning: answer tokens only, each sequence weighted equally.
Scrambling the forget activations, rather than the output, corrupts what later
layers read; u is drawn like WMDP's (torch.rand, then normalised), so it is
not isotropic. The forward stops right after layer ℓ: later layers get no
gradient from RMU anyway.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .base import Batch, MethodArgs, MethodLoss, UnlearningMethod, register_method, require_batch, require_reference


@dataclass
class RMUArgs(MethodArgs):
    layer: int = 1  # decoder layer index ℓ (negative counts from the end)
    c: float = 6.5  # steering coefficient (WMDP's value for Zephyr-7B; scale with activation norms)
    alpha: float = 1200.0  # retain weight (WMDP's value)
    gamma: float = 1.0  # forget weight
    seed: int = 0  # fixes u


class _StopForward(Exception):
    """Raised by the capture hook once layer ℓ has run: the rest of the forward is wasted work."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (`model.model.layers`)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"RMU needs model.model.layers (the decoder layers); {type(model).__name__} has none")
    return layers


@contextlib.contextmanager
def _capture(module: nn.Module, store: list[torch.Tensor]) -> Iterator[None]:
    def hook(_mod, _inputs, output):
        store.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = module.register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()  # even on error: a stray hook would stop every later forward


def layer_output(model: nn.Module, batch: Batch, layer: int) -> torch.Tensor:
    """(B, T, d) output hidden state of decoder layer `layer`, with grad if enabled."""
    store: list[torch.Tensor] = []
    with _capture(decoder_layers(model)[layer], store):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if not store:
        raise RuntimeError(f"decoder layer {layer} did not run")
    return store[0]


def masked_msd(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """() a, b (B, T, d), mask (B, T) bool -> mean over sequences of the per-token-mean squared distance."""
    sq = (a.float() - b.float()).pow(2).mean(-1)  # (B, T)
    m = mask.to(sq.dtype)
    return ((sq * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()


@register_method("rmu")
class RMU(UnlearningMethod):
    args_cls = RMUArgs
    args: RMUArgs
    needs_reference = True

    def __init__(self, args: RMUArgs | None = None, **kwargs):
        super().__init__(args, **kwargs)
        self._u: dict[int, torch.Tensor] = {}

    def direction(self, dim: int) -> torch.Tensor:
        """(d,) the fixed random unit vector u; the same for the same (seed, d) on every run."""
        if dim not in self._u:
            g = torch.Generator().manual_seed(self.args.seed)
            u = torch.rand(dim, generator=g, dtype=torch.float64)
            self._u[dim] = (u / u.norm()).float()
        return self._u[dim]

    def loss(self, model: nn.Module, forget_batch: Batch, retain_batch: Batch | None = None,
             ref_model: nn.Module | None = None) -> MethodLoss:
        a = self.args
        h_f = layer_output(model, forget_batch, a.layer)  # (B, T, d)
        target = (a.c * self.direction(h_f.shape[-1])).to(h_f.device).expand_as(h_f)  # (B, T, d)
        forget_loss = masked_msd(h_f, target, forget_batch["labels"] != -100)
        if a.alpha == 0:
            retain_loss = torch.zeros((), device=h_f.device)
            total = a.gamma * forget_loss
        else:
            ref = require_reference(ref_model, "RMU")
            retain = require_batch(retain_batch, "RMU")
            h_r = layer_output(model, retain, a.layer)
            with torch.no_grad():
                h_ref = layer_output(ref, retain, a.layer)
            retain_loss = masked_msd(h_r, h_ref, retain["labels"] != -100)
            total = a.gamma * forget_loss + a.alpha * retain_loss
        return MethodLoss(total, {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()})

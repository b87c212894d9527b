"""Router-input anchor: a retain-side loss term that keeps the routers' INPUTS still on retained tokens.

GRIP keeps each router row's update in the null space of the retained inputs routed to that expert, so
the routers themselves no longer move retained selection. The experts (and attention, where it trains)
below a router still change what the router is fed, and that input drift is all the retained instability
plain GRIP has left. The anchor adds to the method's loss

    λ · mean_{l ∈ anchored layers}  Σ_n ‖h_l(x_n) − h_l^base(x_n)‖² / Σ_n ‖h_l^base(x_n)‖²

over the real (attention-mask) tokens n of the step's retain batch, where h_l is what layer l's router
weight multiplies (read with the tracer's router hooks, grip_core/moe/trace.py) and h^base the same from
the frozen base model (no grad, one forward of the base on the retain batch). The per-layer relative form
makes λ independent of the hidden width and of the norm's scale. GRIP never sees the loss, so the anchor is
wired in by the job loop (grip_core/runs/job.py), not by `GRIP.wrap`.

Footguns:
- The work model's retain forward is the METHOD's own (GradDiff, NPO, SimNPO run one): `watch` recognises
  it by the identity of the batch's `input_ids` tensor. A method that never runs the retain batch (GA) gets
  one extra forward with grad from `loss`.
- The anchor's gradient reaches every trainable parameter below an anchored router (including earlier
  routers, whose updates GRIP still projects). The last MoE layer's experts feed no router, so they are
  never anchored.
- The base model must be a frozen copy the job owns (its hooks fire on every forward of that module).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..moe.layers import MoELayer, find_moe_layers
from ..moe.trace import router_hooks


class RouterInputAnchor:
    """λ · the mean relative squared drift of the router inputs of retained tokens (module doc).

    work_layers: the trained model's MoE layers; base: the frozen base model (same architecture);
    weight: λ; last_layers: anchor only the last n MoE layers (0 = every one).
    """

    def __init__(self, work_layers: list[MoELayer], base: nn.Module, weight: float, last_layers: int = 0):
        n = len(work_layers)
        self.positions = list(range(n - last_layers if 0 < last_layers < n else 0, n))   # MoE layer positions
        self.work_layers = [work_layers[p] for p in self.positions]
        self.base_layers = [find_moe_layers(base)[p] for p in self.positions]
        self.base, self.weight = base, float(weight)

    @contextlib.contextmanager
    def watch(self, model: nn.Module, retain_batch: dict):
        """Inside the block, keep (with grad) the anchored routers' inputs (B*T, d) of the forward of `model` on
        `retain_batch` (recognised by its input_ids tensor); yields the dict {position: input} being filled."""
        seen: dict[int, torch.Tensor] = {}
        active = [False]

        def enter(module, args, kwargs):
            active[0] = kwargs.get("input_ids", args[0] if args else None) is retain_batch["input_ids"]

        def leave(module, args, output):
            active[0] = False

        def collect(pos, layer, x, output):
            if active[0] and pos not in seen:
                seen[pos] = x
        handles = [model.register_forward_pre_hook(enter, with_kwargs=True), model.register_forward_hook(leave)]
        try:
            with router_hooks(self.work_layers, collect):
                yield seen
        finally:
            for h in handles:
                h.remove()

    def loss(self, model: nn.Module, retain_batch: dict, seen: dict[int, torch.Tensor]) -> torch.Tensor:
        """() λ · mean over anchored layers of the relative squared drift; `seen` from `watch` (refilled here
        with one forward of `model` when the method did not run the retain batch)."""
        ids, mask = retain_batch["input_ids"], retain_batch.get("attention_mask")
        if len(seen) < len(self.positions):
            seen.clear()
            with router_hooks(self.work_layers, lambda pos, layer, x, out: seen.setdefault(pos, x)):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
        base: dict[int, torch.Tensor] = {}
        with torch.no_grad(), router_hooks(self.base_layers, lambda pos, layer, x, out: base.setdefault(pos, x)):
            self.base(input_ids=ids, attention_mask=mask, use_cache=False)
        real = (torch.ones_like(ids) if mask is None else mask).reshape(-1).bool()          # (B*T,)
        terms = []
        for pos in range(len(self.positions)):
            h, h0 = seen[pos][real].float(), base[pos][real].float()                          # (N, d)
            terms.append((h - h0).pow(2).sum() / h0.pow(2).sum().clamp_min(1e-12))
        return self.weight * torch.stack(terms).mean()

"""How a router turns its logits into the top-k choice: one `SelectionRule` per MoE layer.

The rule KIND comes from the family table (grip_core/moe/families.py, `FamilySpec.selection` and
`FamilySpec.group_attrs`); `MoELayer.selection_rule()` snapshots the layer's numbers into it. GRIP
(grip_core/grip/project.py) keeps one margin-bounds function per kind.

Footguns:
- The selection bias is a SNAPSHOT: a load balancer that later moves it makes the rule stale.
- Softmax + selection bias (ERNIE-4.5) is read as "logit": softmax couples all experts, so GRIP's
  margins are approximate there (MoELayer.selection_rule warns when the bias is nonzero).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTION_KINDS = ("logit", "sigmoid_bias")


@dataclass
class SelectionRule:
    """How a router turns logits into its top-k choice.

    "logit": top-k of the logits (softmax / sigmoid / sparsemixer are monotone, and a router
             bias is already inside the logits).
    "sigmoid_bias": DeepSeek-V3 style: choice score c = sigmoid(logit) + selection_bias, top-k
             inside the `topk_group` best of `num_group` groups (group score = sum of its top 2 c).
    """

    kind: str = "logit"
    selection_bias: torch.Tensor | None = None   # (E,) float32, a snapshot taken at fit time
    num_group: int = 1                           # groups of experts (1 = no grouping)
    topk_group: int = 1                          # groups kept per token (grouped top-k when < num_group)

    def __post_init__(self):
        if self.kind not in SELECTION_KINDS:
            raise ValueError(f"unknown selection rule {self.kind!r}; choose from {SELECTION_KINDS}")

    @property
    def grouped(self) -> bool:
        return self.num_group > 1 and self.topk_group < self.num_group

    def select(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """(M, E) bool: the top-k this rule predicts from logits (M, E)."""
        M, E = logits.shape
        score = logits.double()
        if self.kind == "sigmoid_bias":
            score = torch.sigmoid(score) + self.selection_bias.to(score).reshape(1, E)
            if self.grouped:
                G = self.num_group
                gs = score.view(M, G, E // G).topk(min(2, E // G), dim=-1).values.sum(-1)
                keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(self.topk_group, dim=-1).indices,
                                                                        True)
                score = score.masked_fill(~keep.repeat_interleave(E // G, dim=1), -float("inf"))
        idx = score.topk(k, dim=-1).indices
        return torch.zeros(M, E, dtype=torch.bool, device=logits.device).scatter_(1, idx, True)

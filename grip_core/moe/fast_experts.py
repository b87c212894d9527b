"""A CPU experts forward for transformers' fused-expert MoE blocks: the "eager" math, cheaper backward.

transformers' eager experts forward indexes the fused (E, ., .) weights once per expert
(`self.gate_up_proj[e]`). In backward every such select materialises a zero tensor of the WHOLE
fused weight and adds it into the gradient: per layer and step, E full-size fills and adds per
weight, ~20 % of a demo training step on CPU. Here each fused weight is unbound ONCE per forward
(its backward stacks the per-expert gradients into one tensor); the per-expert code is the eager
code, so outputs and gradients are bitwise the same (tests/test_moe_families.py checks it).

Only expert classes whose eager forward is the code copied below (EAGER_LAYOUT) take this path;
any other class runs its own eager forward. `load_model` selects it on CPU as
`experts_implementation="grip_cpu"`.
"""
from __future__ import annotations

import torch
from torch import nn

NAME = "grip_cpu"
EAGER_LAYOUT = frozenset({"OlmoeExperts", "Qwen2MoeExperts"})   # gate_up (E, 2I, d) + down (E, d, I), no bias, act(gate) * up


def cpu_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states (N, d), top_k_index (N, k), top_k_weights (N, k) -> (N, d)."""
    if type(self).__name__ not in EAGER_LAYOUT:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)   # its eager code
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)     # (N, k, E+1)
        expert_mask = expert_mask.permute(2, 1, 0)                                             # (E+1, k, N)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)                      # E x (2I, d), E x (d, I)
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        gate, up = nn.functional.linear(current_state, gate_up[expert_idx]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = nn.functional.linear(current_hidden_states, down[expert_idx])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


def register() -> str:
    """Register the forward with transformers (idempotent); returns its experts_implementation name."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(NAME, cpu_experts_forward)
    return NAME

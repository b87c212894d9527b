"""Expert ablation: zero chosen experts, see which knowledge goes with them.

If a domain's answers vanish when its experts are zeroed while every other domain
survives, those experts HOLD the domain, the precondition of the router shortcut
(docs/method.md#what-the-probes-found: zeroing a domain's two experts dropped it to 0.20-0.51 EM, others stayed >= 0.95).

Transformers 5 fuses a block's experts into 3-D tensors with the expert on dim 0:
gate_up_proj (E, 2I, d) or (E, d, 2I), down_proj (E, d, I) or (E, I, d), GPT-OSS adds
biases (E, 2I) / (E, d). An expert is zeroed by zeroing row e of every parameter of
`layer.experts` whose dim 0 is E (older layouts with an nn.ModuleList of E experts are
handled too). With its down projection (and bias) zero, the expert's output is exactly 0;
the router still sends tokens to it, so the gate weight is "wasted", as a real dead expert's.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from ..moe.layers import MoELayer
from ..moe.model import MoEModel
from ..moe.trace import RoutingTrace
from .routing import expert_by_label_matrix

ExpertSpec = Mapping[int, Sequence[int]]     # MoE layer POSITION in moe.layers -> expert ids


def expert_slices(layer: MoELayer, expert_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, index) pairs such that tensor[index] are the given experts' weights in this layer."""
    experts, E = layer.experts, layer.num_experts
    if experts is None:
        raise ValueError(f"MoE layer {layer.index} ({layer.module_path}) has no `experts` module to ablate")
    bad = [e for e in expert_ids if not 0 <= int(e) < E]
    if bad:
        raise ValueError(f"expert ids {bad} out of range for layer {layer.index} with {E} experts")
    idx = torch.tensor(sorted({int(e) for e in expert_ids}), dtype=torch.long)
    if isinstance(experts, nn.ModuleList) and len(experts) == E:        # one module per expert
        return [(p.data.unsqueeze(0), torch.zeros(1, dtype=torch.long))
                for e in idx.tolist() for p in experts[e].parameters()]
    slices = [(p.data, idx.to(p.device)) for p in experts.parameters() if p.dim() >= 1 and p.shape[0] == E]
    if not slices:
        shapes = {n: tuple(p.shape) for n, p in experts.named_parameters()}
        raise ValueError(f"no parameter of {type(experts).__name__} has the expert dimension E={E} first: {shapes}")
    return slices


@contextmanager
def ablate_experts(moe: MoEModel, experts: ExpertSpec):
    """Zero `experts` ({moe layer position: [expert ids]}) inside the block; restore them bit-exactly on exit.

    The context yields `moe`. Restoration happens even if the body raises.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for pos, ids in experts.items():
                if not 0 <= int(pos) < len(moe.layers):
                    raise ValueError(f"MoE layer position {pos} out of range: the model has {len(moe.layers)} "
                                     "MoE layers (positions in moe.layers, not decoder indices)")
                if not len(ids):
                    continue
                for tensor, idx in expert_slices(moe.layers[int(pos)], ids):
                    saved.append((tensor, idx, tensor[idx].clone()))
                    tensor[idx] = 0
        yield moe
    finally:
        with torch.no_grad():
            for tensor, idx, value in reversed(saved):
                tensor[idx] = value


# ----------------------------------------------------------------------------- which experts hold a label

def experts_by_label(trace: RoutingTrace, labels: Sequence, per_layer: int = 2,
                     layers: Sequence[int] | None = None) -> dict[str, dict[int, list[int]]]:
    """For each label, the `per_layer` experts with the highest lift P(e | label) / P(e) at every MoE layer.

    Lift rather than raw frequency, so a globally busy expert is not attributed to every label.
    Restrict the trace first (e.g. `trace.answers_only()`) to pick on answer tokens.
    """
    out: dict[str, dict[int, list[int]]] = {}
    for pos in (range(trace.num_layers) if layers is None else layers):
        m = expert_by_label_matrix(trace, labels, pos, normalize="none")
        counts = torch.tensor(m.counts)                                            # (labels, E)
        p_e = counts.sum(0) / counts.sum().clamp_min(1e-12)                        # (E,)
        p_e_given = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)          # (labels, E)
        lift = p_e_given / p_e.clamp_min(1e-12)
        for r, name in enumerate(m.labels):
            out.setdefault(name, {})[pos] = torch.topk(lift[r], min(per_layer, m.num_experts)).indices.tolist()
    return out


# ----------------------------------------------------------------------------- table

@dataclass
class AblationTable:
    """accuracy[i][j]: exact match on evaluated group j with group i's experts zeroed (row "none": nothing zeroed)."""

    ablated: list[str]
    evaluated: list[str]
    accuracy: list[list[float]]
    n: dict[str, int]
    experts: dict[str, dict[int, list[int]]]
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experts"] = {g: {str(k): v for k, v in e.items()} for g, e in self.experts.items()}   # JSON keys
        return d

    def drop(self) -> list[list[float]]:
        """Baseline minus accuracy (needs the "none" row): how much each ablation cost each group."""
        base = self.accuracy[self.ablated.index("none")]
        return [[b - a for a, b in zip(row, base)] for row in self.accuracy]


def ablation_table(moe: MoEModel, examples_by_group: Mapping[str, Sequence], experts_by_group: Mapping[str, ExpertSpec],
                   tokenizer=None, *, include_baseline: bool = True, batch_size: int = 32,
                   max_new_tokens: int = 16) -> AblationTable:
    """Exact match of every evaluated group under every group's ablation (greedy generation)."""
    from .probes import exact_match_accuracy

    groups = list(examples_by_group)
    rows = (["none"] if include_baseline else []) + list(experts_by_group)
    acc = []
    for row in rows:
        with ablate_experts(moe, {} if row == "none" else experts_by_group[row]):
            acc.append([exact_match_accuracy(moe, list(examples_by_group[g]), tokenizer, batch_size, max_new_tokens)
                        for g in groups])
    return AblationTable(ablated=rows, evaluated=groups, accuracy=acc,
                         n={g: len(examples_by_group[g]) for g in groups},
                         experts={g: {int(k): [int(e) for e in v] for k, v in s.items()}
                                  for g, s in experts_by_group.items()})

"""Plain-data summaries of traces for the figures (lists and dicts: cacheable, JSON-able, picklable).

These are the only places grip_core.viz reads a RoutingTrace; every figure builder
takes their output (or a saved run's JSON) and never a live model.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..metrics.routing import load_entropy, slot_counts, token_labels, top1_expert
from ..moe.trace import RoutingTrace


def routing_summary(trace: RoutingTrace, name: str = "") -> dict:
    """Per-layer expert load (share of routing slots), slot counts and normalised load entropy."""
    load, counts, entropy = [], [], []
    for l in range(trace.num_layers):
        c = slot_counts(trace.selected[l], trace.num_experts[l])
        counts.append([int(v) for v in c.tolist()])
        total = float(c.sum()) or 1.0
        load.append([float(v) / total for v in c.tolist()])
        entropy.append(load_entropy(c))
    return {"name": name, "layers": list(trace.layer_indices), "num_experts": list(trace.num_experts),
            "top_k": trace.top_k, "num_tokens": trace.num_tokens, "load": load, "counts": counts,
            "entropy": entropy}


def token_routing(trace: RoutingTrace, tokens: Sequence[str]) -> dict:
    """Per token and layer: the selected experts (router order) and their router logits.

    `tokens` are the display strings of the trace's tokens (len N, e.g. from the tokenizer).
    """
    if len(tokens) != trace.num_tokens:
        raise ValueError(f"{len(tokens)} token strings for a trace of {trace.num_tokens} tokens")
    experts, logits, top1 = [], [], []
    for l in range(trace.num_layers):
        sel = trace.selected[l]
        experts.append(sel.tolist())
        logits.append(trace.logits[l].gather(1, sel).tolist())
        top1.append(top1_expert(trace, l).tolist())
    # transpose to token-major
    return {"tokens": list(tokens), "layers": list(trace.layer_indices), "num_experts": list(trace.num_experts),
            "experts": [[experts[l][n] for l in range(trace.num_layers)] for n in range(trace.num_tokens)],
            "logits": [[logits[l][n] for l in range(trace.num_layers)] for n in range(trace.num_tokens)],
            "top1": [[top1[l][n] for l in range(trace.num_layers)] for n in range(trace.num_tokens)]}


def display_tokens(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Readable strings for token ids: spaces shown as '·', newlines as '⏎', empty as '∅'."""
    out = []
    for t in token_ids:
        s = tokenizer.decode([int(t)]) if tokenizer is not None else str(int(t))
        s = s.replace("\n", "⏎").replace(" ", "·")
        out.append(s if s else "∅")
    return out


def top1_labels(trace: RoutingTrace, layer: int) -> list[int]:
    """The top-1 expert of every token at MoE layer position `layer` (embedding colours)."""
    return top1_expert(trace, layer).tolist()


def per_token_labels(trace: RoutingTrace, labels: Sequence) -> list:
    """Labels per token from labels per token or per sequence (see metrics.routing.token_labels)."""
    return token_labels(trace, labels)


def finite(x) -> float | None:
    """x as float, or None for None / NaN / inf (tables and sentences show 'n/a')."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def label_routing(trace: RoutingTrace, labels: Sequence, answers_only: bool = False) -> dict:
    """Label (e.g. domain) x expert matrices at every layer and NMI(label; top-1 expert) per layer, as plain data.

    `labels`: one per sequence or per token; `answers_only` keeps the answer tokens (needs labels in the batch).
    """
    from ..metrics.routing import domain_expert_nmi, expert_by_label_matrix

    per_token = token_labels(trace, labels)
    if answers_only and trace.answer_mask is not None:
        keep = trace.answer_mask.tolist()
        trace = trace.subset(trace.answer_mask)
        per_token = [v for v, k in zip(per_token, keep) if k]
    nmi = domain_expert_nmi(trace, per_token)
    return {"nmi": nmi.to_dict(),
            "matrices": [expert_by_label_matrix(trace, per_token, layer=l).to_dict() for l in range(trace.num_layers)]}


def embedding_points(trace: RoutingTrace, layer: int, tokenizer=None) -> dict:
    """Router inputs of MoE layer position `layer` as a float32 array plus per-token top-1 expert and strings."""
    if trace.inputs is None:
        raise ValueError("the trace has no router inputs: trace with keep_inputs=True")
    return {"X": trace.inputs[layer].float().numpy(), "top1": top1_labels(trace, layer),
            "tokens": display_tokens(tokenizer, trace.token_ids.tolist()),
            "sequence": trace.sequence_index.tolist(), "position": trace.position.tolist()}

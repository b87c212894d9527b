"""Tracing at real width: token-budgeted batches, progress, cancel, and summaries built while streaming.

`MoEModel.trace` keeps every token's router logits (N x E floats per layer), which is what the
metrics need on a few thousand tokens. A researcher tracing a real checkpoint on a whole
dataset needs only the summaries, so `stream_routing` folds each batch into a `RoutingSummary`
and drops it: expert load per layer, domain x expert counts (for the domain <-> expert NMI)
and, optionally, each token's top-k as int16 (for the shift between two models), never logits.

    summary = stream_routing(moe, examples, token_budget=8192, progress=lambda p: print(p.eta_seconds))

Batches are cut by a TOKEN budget (rows x longest row <= budget), on examples sorted by length,
so one long text does not pad a whole batch; summaries do not depend on the batch order.

Footguns:
- The time estimate is measured, not guessed: after the first batch, eta = remaining tokens /
  measured tokens per second. The first batch includes one-off warm-up, so early estimates are
  pessimistic; they settle after a few batches.
- `cancel()` is polled between batches: the summary returned covers the batches done so far
  and says so (`complete=False`).
- Selections are stored in the original example order (`sequence_index` order of `MoEModel.trace`),
  whatever the batching, so two models' summaries of the same examples can be compared token by token.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .model import MoEModel
from .trace import trace_batch


@dataclass
class TraceProgress:
    """One progress report: after each batch."""

    tokens_done: int
    tokens_total: int
    seconds: float
    batches_done: int
    batches_total: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.seconds if self.seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float:
        tps = self.tokens_per_second
        return (self.tokens_total - self.tokens_done) / tps if tps > 0 else float("nan")

    @property
    def fraction(self) -> float:
        return self.tokens_done / max(self.tokens_total, 1)


@dataclass
class RoutingSummary:
    """Routing summaries of N real tokens through L MoE layers, accumulated batch by batch."""

    layer_indices: list[int]
    num_experts: list[int]
    top_k: int
    num_tokens: int = 0
    expert_counts: list[torch.Tensor] = field(default_factory=list)        # L x (E,) routing slots
    domain_top1: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # domain -> L x (E,) top-1 counts
    selected: list[torch.Tensor] | None = None                              # L x (N, k) int16, example order
    seconds: float = 0.0
    complete: bool = True

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0

    def expert_load(self, layer: int) -> torch.Tensor:
        """(E,) fraction of routing slots that went to each expert."""
        c = self.expert_counts[layer].double()
        return c / c.sum().clamp_min(1.0)

    def domain_nmi(self) -> list[float] | None:
        """NMI(domain; top-1 expert) per layer from the streamed contingency (None with < 2 domains).

        Arithmetic normalisation, as sklearn's normalized_mutual_info_score (and grip_core.metrics's
        domain_expert_nmi) on the same tokens.
        """
        from sklearn.metrics import mutual_info_score
        from scipy.stats import entropy

        if len(self.domain_top1) < 2:
            return None
        out = []
        for l in range(len(self.layer_indices)):
            table = torch.stack([self.domain_top1[d][l] for d in sorted(self.domain_top1)]).numpy()  # (D, E)
            table = table[:, table.sum(0) > 0]
            mi = mutual_info_score(None, None, contingency=table)
            h_d, h_e = entropy(table.sum(1)), entropy(table.sum(0))
            denom = (h_d + h_e) / 2
            out.append(float(mi / denom) if denom > 0 else 1.0)
        return out

    def to_dict(self) -> dict:
        nmi = self.domain_nmi()
        return {"layers": self.layer_indices, "num_experts": self.num_experts, "top_k": self.top_k,
                "num_tokens": self.num_tokens, "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "complete": self.complete,
                "expert_load": [self.expert_load(l).tolist() for l in range(len(self.layer_indices))],
                "domain_nmi": None if nmi is None else {"layers": self.layer_indices, "nmi": nmi,
                                                        "mean": sum(nmi) / len(nmi),
                                                        "domains": sorted(self.domain_top1)}}


def selection_shift(a: RoutingSummary, b: RoutingSummary) -> list[float]:
    """Per layer, 1 - mean overlap of the two summaries' top-k sets on the same tokens (the metrics' `shift`)."""
    from ..metrics.routing import set_agreement

    if a.selected is None or b.selected is None or a.num_tokens != b.num_tokens:
        raise ValueError("selection_shift needs two summaries of the same tokens made with keep_selection=True")
    return [1.0 - float(set_agreement(sa, sb, E)["overlap"].mean())
            for sa, sb, E in zip(a.selected, b.selected, a.num_experts)]


def token_budget_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Example indices grouped so that rows x longest row <= token_budget (a longer row goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, cur, longest = [], [], 0
    for i in order:
        n = max(int(lengths[i]), 1)
        if cur and (len(cur) + 1) * max(longest, n) > token_budget:
            batches.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        batches.append(cur)
    return batches


@torch.no_grad()
def stream_routing(moe: MoEModel, examples: Sequence, *, token_budget: int = 8192, max_length: int = 128,
                   domains: Sequence | None = None, keep_selection: bool = False,
                   progress: Callable[[TraceProgress], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> RoutingSummary:
    """Trace `examples` (QAExample or str) in token-budgeted batches, folding each into a RoutingSummary.

    `domains` (one label per example, default each QAExample's `domain`) feeds the domain x expert counts.
    """
    from ..data import encode_qa
    from ..data.encode import example_ids
    from ..data.examples import QAExample

    if not examples:
        raise ValueError("nothing to trace: no examples")
    if moe.tokenizer is None:
        raise ValueError("this MoEModel has no tokenizer: stream_routing needs one")
    items = [QAExample(id=str(i), question="", answer="", text=e) if isinstance(e, str) else e
             for i, e in enumerate(examples)]
    if domains is None:
        domains = [getattr(e, "domain", None) for e in items]
    lengths = [min(len(c) + len(t), max_length) for c, t in example_ids(moe.tokenizer, items)]
    batches = token_budget_batches(lengths, token_budget)
    L = len(moe.layers)
    summary = RoutingSummary([l.index for l in moe.layers], [l.num_experts for l in moe.layers], moe.layers[0].top_k,
                             expert_counts=[torch.zeros(l.num_experts, dtype=torch.long) for l in moe.layers])
    per_example: list[list[torch.Tensor] | None] = [None] * len(items) if keep_selection else []
    total, done_tokens, t0 = sum(lengths), 0, time.perf_counter()
    for b, idx in enumerate(batches):
        if cancel is not None and cancel():
            summary.complete = False
            break
        trace = trace_batch(moe.model, moe.layers, encode_qa(moe.tokenizer, [items[i] for i in idx], max_length))
        seq = trace.sequence_index                                               # (n,) row in this batch
        names = sorted({str(domains[i]) for i in idx if domains[i] is not None})
        code = torch.tensor([names.index(str(domains[i])) if domains[i] is not None else -1 for i in idx])
        tok_domain = code[seq]                                                   # (n,) domain id, -1 = none
        labelled = tok_domain >= 0
        for l in range(L):
            sel, E = trace.selected[l], summary.num_experts[l]                   # (n, k)
            summary.expert_counts[l] += torch.bincount(sel.flatten(), minlength=E)
            joint = torch.bincount(tok_domain[labelled] * E + sel[labelled, 0], minlength=len(names) * E)
            for d, name in enumerate(names):                                     # (D*E,) -> each domain's (E,)
                summary.domain_top1.setdefault(name, [torch.zeros(e, dtype=torch.long) for e in summary.num_experts])[
                    l] += joint[d * E:(d + 1) * E]
        if keep_selection:
            for row, i in enumerate(idx):
                per_example[i] = [trace.selected[l][seq == row].to(torch.int16) for l in range(L)]
        summary.num_tokens += trace.num_tokens
        summary.seconds = time.perf_counter() - t0
        done_tokens += sum(lengths[i] for i in idx)
        if progress is not None:
            progress(TraceProgress(done_tokens, total, summary.seconds, b + 1, len(batches)))
    if keep_selection:
        done = [p for p in per_example if p is not None]
        summary.selected = [torch.cat([p[l] for p in done]) if done else torch.zeros(0, summary.top_k, dtype=torch.int16)
                            for l in range(L)]
    return summary

"""Routing metrics from traces: how much did expert selection move, base vs unlearned?

All metrics compare two RoutingTraces of the SAME tokens (same texts, same
tokenisation, same order): token n of one trace is token n of the other. With
L MoE layers, N tokens, k experts per token and E experts per layer:

- stability   = fraction of tokens whose top-k SET is unchanged          (GRIP's headline, > 95 %)
- overlap     = mean |S ∩ S'| / k                                         (SEUF's selection overlap)
- jaccard     = mean |S ∩ S'| / |S ∪ S'|
- shift       = 1 - overlap                                               (SEUF's "expert selection shift")
- freq_kl     = KL(f_base || f_new) of the expert-load distributions, with a Jeffreys pseudo-count
                (see `load_kl`) so an expert that went silent gives a large but finite value
- entropy     = H(f) / log E, the normalised expert-load entropy (1 = perfectly balanced)
- freq_change = f_new - f_base per expert (the compare heatmap)

"Overall" pools every (token, layer) pair; with the same N in every layer that is
the mean of the per-layer values.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..moe.trace import RoutingTrace

KL_PSEUDO_COUNT = 0.5   # Jeffreys / Krichevsky-Trofimov prior: half a routing slot per expert


# ----------------------------------------------------------------------------- per-token set metrics

def set_agreement(a: torch.Tensor, b: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Per-token agreement of two selections a, b (N, k) long -> same (N,) bool, overlap, jaccard (N,) float.

    Sets are compared, not ordered lists: (3, 5) and (5, 3) are the same selection.
    """
    if a.shape != b.shape:
        raise ValueError(f"selections differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    n, k = a.shape
    ma = torch.zeros(n, num_experts, dtype=torch.bool).scatter_(1, a.long().cpu(), True)   # (N, E)
    mb = torch.zeros(n, num_experts, dtype=torch.bool).scatter_(1, b.long().cpu(), True)   # (N, E)
    inter = (ma & mb).sum(1).float()                                                        # (N,)
    union = (ma | mb).sum(1).float().clamp_min(1.0)                                         # (N,)
    return {"same": (ma == mb).all(1), "overlap": inter / k, "jaccard": inter / union}


# ----------------------------------------------------------------------------- distribution metrics

def slot_counts(selected: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) float: how many of the N*k routing slots went to each expert."""
    return torch.bincount(selected.flatten().long().cpu(), minlength=num_experts).double()


def load_entropy(counts: torch.Tensor) -> float:
    """Normalised expert-load entropy H = -Σ f_e log f_e / log E in [0, 1] (0 log 0 = 0)."""
    E = counts.numel()
    f = counts / counts.sum().clamp_min(1e-12)
    h = -(f[f > 0] * f[f > 0].log()).sum().item()
    return h / math.log(E) if E > 1 else 0.0


def load_kl(base_counts: torch.Tensor, new_counts: torch.Tensor, pseudo_count: float = KL_PSEUDO_COUNT) -> float:
    """KL(f_base || f_new) in nats with f_e = (c_e + α) / (C + α E), α = `pseudo_count` per expert.

    Why a pseudo-count on COUNTS rather than an epsilon on frequencies: it shrinks with the
    sample (α / (C + αE) of probability per expert), so on real traces (C = N·k in the
    thousands) it is negligible, and a dead expert in the unlearned model yields a finite
    value that depends on how many slots were observed, not on an arbitrary ε.
    """
    E = base_counts.numel()
    p = (base_counts + pseudo_count) / (base_counts.sum() + pseudo_count * E)
    q = (new_counts + pseudo_count) / (new_counts.sum() + pseudo_count * E)
    return float((p * (p / q).log()).sum())


# ----------------------------------------------------------------------------- results

@dataclass
class LayerRouting:
    """Base-vs-new routing at one MoE layer."""

    layer: int                      # decoder layer index
    num_tokens: int
    num_experts: int
    top_k: int
    stability: float                # fraction of tokens with an unchanged top-k set
    overlap: float                  # mean |S ∩ S'| / k
    jaccard: float                  # mean |S ∩ S'| / |S ∪ S'|
    shift: float                    # 1 - overlap
    freq_kl: float                  # KL(f_base || f_new), nats, pseudo-count smoothed
    entropy_base: float             # normalised load entropy of the base model
    entropy_new: float
    freq_base: list[float]          # (E,) expert load, base
    freq_new: list[float]           # (E,) expert load, unlearned
    freq_change: list[float]        # (E,) f_new - f_base


@dataclass
class RoutingComparison:
    """compare_traces' result: per layer, plus every (token, layer) pair pooled."""

    layers: list[LayerRouting]
    stability: float
    overlap: float
    jaccard: float
    shift: float
    freq_kl: float                  # mean over layers
    entropy_base: float             # mean over layers
    entropy_new: float
    num_tokens: int
    kl_pseudo_count: float = KL_PSEUDO_COUNT
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def freq_change_matrix(self) -> list[list[float]]:
        """Layer x expert f_new - f_base (rows may differ in length if E differs per layer)."""
        return [l.freq_change for l in self.layers]

    def per_layer(self, metric: str) -> list[float]:
        return [getattr(l, metric) for l in self.layers]


def check_same_tokens(base: RoutingTrace, new: RoutingTrace) -> None:
    """Raise unless the two traces cover the same tokens in the same order (metrics would be meaningless)."""
    if base.num_tokens != new.num_tokens or not torch.equal(base.token_ids, new.token_ids):
        raise ValueError(f"the traces are not of the same tokens ({base.num_tokens} vs {new.num_tokens} tokens, "
                         "or different token ids): trace base and unlearned models on the same batches")
    if base.layer_indices != new.layer_indices or base.num_experts != new.num_experts:
        raise ValueError(f"the traces come from different architectures: layers {base.layer_indices} vs "
                         f"{new.layer_indices}, experts {base.num_experts} vs {new.num_experts}")


def compare_traces(base: RoutingTrace, new: RoutingTrace, kl_pseudo_count: float = KL_PSEUDO_COUNT,
                   mask: torch.Tensor | None = None) -> RoutingComparison:
    """Every routing metric of `new` against `base`; `mask` (N,) bool restricts to some tokens (e.g. answers)."""
    check_same_tokens(base, new)
    if mask is not None:
        base, new = base.subset(mask), new.subset(mask)
    if base.num_tokens == 0:
        raise ValueError("no tokens to compare (empty trace or empty mask)")
    layers = []
    for l in range(base.num_layers):
        E = base.num_experts[l]
        agree = set_agreement(base.selected[l], new.selected[l], E)
        cb, cn = slot_counts(base.selected[l], E), slot_counts(new.selected[l], E)
        fb, fn = cb / cb.sum(), cn / cn.sum()
        overlap = agree["overlap"].mean().item()
        layers.append(LayerRouting(
            layer=base.layer_indices[l], num_tokens=base.num_tokens, num_experts=E, top_k=base.selected[l].shape[1],
            stability=agree["same"].float().mean().item(), overlap=overlap, jaccard=agree["jaccard"].mean().item(),
            shift=1.0 - overlap, freq_kl=load_kl(cb, cn, kl_pseudo_count), entropy_base=load_entropy(cb),
            entropy_new=load_entropy(cn), freq_base=fb.tolist(), freq_new=fn.tolist(), freq_change=(fn - fb).tolist()))
    mean = lambda name: sum(getattr(x, name) for x in layers) / len(layers)
    return RoutingComparison(layers=layers, stability=mean("stability"), overlap=mean("overlap"),
                             jaccard=mean("jaccard"), shift=mean("shift"), freq_kl=mean("freq_kl"),
                             entropy_base=mean("entropy_base"), entropy_new=mean("entropy_new"),
                             num_tokens=base.num_tokens, kl_pseudo_count=kl_pseudo_count)


# ----------------------------------------------------------------------------- label <-> expert

def token_labels(trace: RoutingTrace, labels: Sequence) -> list:
    """Per-token labels: `labels` may be per token (len N) or per sequence (len = number of sequences)."""
    labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    if len(labels) == trace.num_tokens:
        return labels
    num_seq = int(trace.meta.get("num_sequences", int(trace.sequence_index.max()) + 1 if trace.num_tokens else 0))
    if len(labels) == num_seq:
        return [labels[i] for i in trace.sequence_index.tolist()]
    raise ValueError(f"{len(labels)} labels for a trace of {trace.num_tokens} tokens in {num_seq} sequences: "
                     "give one label per token or one per sequence")


def top1_expert(trace: RoutingTrace, layer: int) -> torch.Tensor:
    """(N,) the selected expert with the largest router logit (its mixing weight is the largest).

    Taken among the SELECTED experts, so selection-bias families (DeepSeek-V3) stay exact.
    """
    sel = trace.selected[layer]                                        # (N, k)
    best = trace.logits[layer].gather(1, sel).argmax(1, keepdim=True)  # (N, 1)
    return sel.gather(1, best).squeeze(1)


@dataclass
class LabelExpertNMI:
    """Normalised mutual information between a token label (e.g. domain) and the top-1 expert, per layer."""

    layers: list[int]
    nmi: list[float]
    mean: float
    num_tokens: int
    labels: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def domain_expert_nmi(trace: RoutingTrace, labels: Sequence) -> LabelExpertNMI:
    """NMI(label; top-1 expert) per layer (sklearn, arithmetic normalisation): 0 = no specialisation, 1 = a
    bijection. Restrict the trace first (`trace.answers_only()`) to measure on answer tokens."""
    from sklearn.metrics import normalized_mutual_info_score

    y = [str(v) for v in token_labels(trace, labels)]
    nmi = [float(normalized_mutual_info_score(y, top1_expert(trace, l).tolist())) for l in range(trace.num_layers)]
    return LabelExpertNMI(list(trace.layer_indices), nmi, sum(nmi) / max(len(nmi), 1), trace.num_tokens,
                          sorted(set(y)))


@dataclass
class LabelExpertMatrix:
    """Label x expert routing frequencies at one layer: row r = where label r's tokens were sent."""

    layer: int
    labels: list[str]
    num_experts: int
    counts: list[list[float]]       # (labels, E) routing slots
    matrix: list[list[float]]       # counts normalised as asked (row: each row sums to 1)
    normalize: str

    def to_dict(self) -> dict:
        return asdict(self)


def expert_by_label_matrix(trace: RoutingTrace, labels: Sequence, layer: int = 0, normalize: str = "row",
                           top1_only: bool = False) -> LabelExpertMatrix:
    """Label x expert frequencies at MoE layer position `layer` (all k slots, or only the top-1 expert).

    normalize: "row" (distribution of each label over experts), "col" (share of each expert's
    load per label), "all" (joint distribution) or "none" (raw counts).
    """
    y = [str(v) for v in token_labels(trace, labels)]
    names = sorted(set(y))
    row = torch.tensor([names.index(v) for v in y], dtype=torch.long)                    # (N,)
    sel = top1_expert(trace, layer)[:, None] if top1_only else trace.selected[layer]     # (N, k')
    E = trace.num_experts[layer]
    counts = torch.zeros(len(names), E, dtype=torch.float64)
    counts.index_put_((row[:, None].expand_as(sel).flatten(), sel.flatten().long()),
                      torch.ones(sel.numel(), dtype=torch.float64), accumulate=True)
    if normalize == "row":
        mat = counts / counts.sum(1, keepdim=True).clamp_min(1e-12)
    elif normalize == "col":
        mat = counts / counts.sum(0, keepdim=True).clamp_min(1e-12)
    elif normalize == "all":
        mat = counts / counts.sum().clamp_min(1e-12)
    elif normalize == "none":
        mat = counts
    else:
        raise ValueError(f"normalize must be row, col, all or none, not {normalize!r}")
    return LabelExpertMatrix(trace.layer_indices[layer], names, E, counts.tolist(), mat.tolist(), normalize)

"""Does the demo model know its world, and do its experts hold the domains? Recomputed, never read back.

- accuracy: greedy exact match per scenario and split (forget / retain / holdout / paraphrase)
- NMI per layer between a token's domain and its top-1 expert (answer tokens, and all tokens)
- ablation: zero the experts a domain uses most (measured per layer, not the ones the
  routing loss assigned) and see every domain's accuracy: only the ablated one should fall.

Works on the plain HF model (hooks on `model.model.layers[l].mlp.gate`), so it needs
nothing from grip_core.moe and the tests can check the shipped files on their own.
"""
from __future__ import annotations

import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .._paths import DEMO_MODEL_DIR  # data/demo_model/ in a checkout, the packaged copy when installed
from ..data import QAExample, encode_qa, exact_match, generate_answers, load_demo_world


def load_demo(path: str | Path = DEMO_MODEL_DIR):
    """(model float32 eval, tokenizer) from a demo model directory, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, experts_implementation="eager",
                                                 local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.eval(), tok


def correct(model, tok, examples: list[QAExample], max_new_tokens: int = 12) -> list[bool]:
    preds = generate_answers(model, tok, examples, max_new_tokens=max_new_tokens)
    return [exact_match(p, ex.answer) for p, ex in zip(preds, examples)]


def accuracy(model, tok, examples: list[QAExample]) -> float:
    c = correct(model, tok, examples)
    return sum(c) / len(c) if c else float("nan")


# ----------------------------------------------------------------------------- routing

@torch.no_grad()
def top1_experts(model, tok, examples: list[QAExample], answers_only: bool, batch_size: int = 256
                 ) -> tuple[list[torch.Tensor], list[str], list[Counter]]:
    """Per layer the top-1 expert of each real (or answer) token (N,), each token's domain (N,),
    and per layer a Counter of (domain, expert) over ALL top-k selections of those tokens."""
    layers = model.model.layers
    top1: list[list[torch.Tensor]] = [[] for _ in layers]
    counts = [Counter() for _ in layers]
    domains: list[str] = []
    grabbed: list[torch.Tensor] = []
    hooks = [l.mlp.gate.register_forward_hook(lambda m, i, o: grabbed.append(o[2])) for l in layers]
    try:
        for b in range(0, len(examples), batch_size):
            chunk = examples[b:b + batch_size]
            batch = encode_qa(tok, chunk)
            B, T = batch["input_ids"].shape
            keep = (batch["labels"] != -100) if answers_only else batch["attention_mask"].bool()   # (B, T)
            grabbed.clear()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            dom = [ex.domain for ex in chunk for _ in range(T)]
            flat = keep.reshape(-1)
            dom = [d for d, k in zip(dom, flat.tolist()) if k]
            domains += dom
            for l, idx in enumerate(grabbed):                    # idx: (B*T, k), sorted by score
                sel = idx[flat]
                top1[l].append(sel[:, 0])
                counts[l].update((d, int(e)) for d, row in zip(dom, sel.tolist()) for e in row)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(t) for t in top1], domains, counts


def nmi_per_layer(model, tok, examples: list[QAExample], answers_only: bool = True) -> list[float]:
    """Normalised mutual information between token domain and top-1 expert, per layer (0 = unrelated, 1 = a function)."""
    from sklearn.metrics import normalized_mutual_info_score

    top1, domains, _ = top1_experts(model, tok, examples, answers_only)
    return [float(normalized_mutual_info_score(domains, t.tolist())) for t in top1]


def experts_used(model, tok, examples: list[QAExample], per_layer: int = 2) -> dict[str, dict[int, list[int]]]:
    """{domain: {layer: the `per_layer` experts its tokens select most often}} over all real tokens."""
    _, _, counts = top1_experts(model, tok, examples, answers_only=False)
    doms = sorted({ex.domain for ex in examples})
    return {d: {l: [e for e, _ in sorted(((e, n) for (dd, e), n in c.items() if dd == d), key=lambda t: -t[1])[:per_layer]]
                for l, c in enumerate(counts)} for d in doms}


@contextmanager
def ablate_experts(model, experts: dict[int, list[int]]):
    """Zero experts ({layer: [expert ids]}) in the fused (E, ...) expert tensors; restore them on exit.

    The router still sends tokens to a zeroed expert; its contribution is exactly 0.
    """
    saved = []
    try:
        with torch.no_grad():
            for l, ids in experts.items():
                mod = model.model.layers[l].mlp.experts
                idx = torch.tensor(sorted(set(ids)), dtype=torch.long)
                for p in (mod.gate_up_proj, mod.down_proj):       # (E, 2I, d), (E, d, I)
                    saved.append((p, idx, p.data[idx].clone()))
                    p.data[idx] = 0
        yield model
    finally:
        with torch.no_grad():
            for p, idx, old in reversed(saved):
                p.data[idx] = old


@contextmanager
def ablate_shared_expert(model):
    """Zero every layer's shared expert output projection (Qwen2-MoE `mlp.shared_expert`); restore on exit."""
    saved = []
    try:
        with torch.no_grad():
            for layer in model.model.layers:
                w = layer.mlp.shared_expert.down_proj.weight                  # (d, I_shared)
                saved.append((w, w.data.clone()))
                w.data.zero_()
        yield model
    finally:
        with torch.no_grad():
            for w, old in saved:
                w.data.copy_(old)


def has_shared_expert(model) -> bool:
    return all(hasattr(layer.mlp, "shared_expert") for layer in model.model.layers)


def ablation_table(model, tok, by_domain: dict[str, list[QAExample]], used: dict[str, dict[int, list[int]]]
                   ) -> dict[str, dict[str, float]]:
    """{ablated domain ("none" = baseline; "shared expert" where the model has one): {evaluated domain: EM}}."""
    everything = [ex for d in by_domain for ex in by_domain[d]]

    def per_domain() -> dict[str, float]:
        c = correct(model, tok, everything)
        return {d: sum(x for x, ex in zip(c, everything) if ex.domain == d) / len(by_domain[d]) for d in by_domain}

    table = {"none": per_domain()}
    for d in by_domain:
        with ablate_experts(model, used[d]):
            table[d] = per_domain()
    if has_shared_expert(model):
        with ablate_shared_expert(model):
            table["shared expert"] = per_domain()
    return table


# ----------------------------------------------------------------------------- the report

@dataclass
class DemoReport:
    accuracy: dict = field(default_factory=dict)       # scenario -> split -> EM
    counts: dict = field(default_factory=dict)         # scenario -> split -> n examples evaluated
    nmi_answer_tokens: list = field(default_factory=list)
    nmi_all_tokens: list = field(default_factory=list)
    experts_used: dict = field(default_factory=dict)   # domain -> layer -> experts
    ablation: dict = field(default_factory=dict)       # ablated domain -> domain -> EM
    probe_per_domain: int = 0                          # trained facts per domain behind NMI and ablation

    def to_dict(self) -> dict:
        return asdict(self)


def _sample(xs: list, n: int | None, seed: int) -> list:
    return list(xs) if n is None or n >= len(xs) else random.Random(seed).sample(list(xs), n)


def evaluate_demo(model, tok, world_dir: str | Path | None = None, sample: int | None = None,
                  ablation_per_domain: int = 80, seed: int = 0, experts_per_domain: int = 2) -> DemoReport:
    """Accuracies for both scenarios (each split at most `sample` examples), NMI and the ablation table
    (each domain's `experts_per_domain` most-selected experts per layer are the ones ablated)."""
    rep = DemoReport()
    worlds = {sc: load_demo_world(sc, world_dir) for sc in ("entities", "domain")}
    picked = {sc: {split: _sample(xs, sample, seed) for split, xs in w.as_dict().items()} for sc, w in worlds.items()}
    unique = list({(ex.question, ex.answer): ex for sc in picked.values() for xs in sc.values() for ex in xs}.values())
    ok = dict(zip(((ex.question, ex.answer) for ex in unique), correct(model, tok, unique)))   # each fact once
    for sc, splits in picked.items():
        rep.accuracy[sc] = {k: round(sum(ok[(e.question, e.answer)] for e in xs) / len(xs), 4) if xs else float("nan")
                            for k, xs in splits.items()}
        rep.counts[sc] = {k: len(xs) for k, xs in splits.items()}
    trained = {ex.id: ex for w in worlds.values() for ex in w.forget + w.retain}
    by_domain: dict[str, list[QAExample]] = {}
    for ex in sorted(trained.values(), key=lambda e: e.id):
        by_domain.setdefault(ex.domain, []).append(ex)
    by_domain = {d: _sample(xs, ablation_per_domain, seed) for d, xs in by_domain.items()}
    probe = [ex for xs in by_domain.values() for ex in xs]
    rep.probe_per_domain = min(len(xs) for xs in by_domain.values())
    rep.nmi_answer_tokens = [round(x, 4) for x in nmi_per_layer(model, tok, probe, answers_only=True)]
    rep.nmi_all_tokens = [round(x, 4) for x in nmi_per_layer(model, tok, probe, answers_only=False)]
    rep.experts_used = experts_used(model, tok, probe, per_layer=experts_per_domain)
    rep.ablation = {a: {d: round(v, 4) for d, v in row.items()}
                    for a, row in ablation_table(model, tok, by_domain, rep.experts_used).items()}
    return rep

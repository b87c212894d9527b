"""Knowledge probes: does the model still answer? How likely is the gold answer? Was it a member?

Per split (forget / retain / holdout / paraphrase, whatever the caller names):
- exact_match: greedy generation (grip_core.data.generate_answers) judged by grip_core.data.exact_match
- mean_nll:    per example, the mean NLL over its answer tokens (labels != -100), averaged over examples
- mean_prob:   per example exp(-mean NLL), the length-normalised answer probability P(y|x)^(1/|y|)
               (TOFU's "probability"), averaged over examples
and a loss-based membership AUC: forget (members: trained on, then unlearned) vs holdout
(never seen), score = -NLL (lower loss = member). 0.5 = indistinguishable from unseen
data; well above 0.5 = the forget set still looks trained on.

Everything runs batched under torch.no_grad in eval mode (the mode is restored).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.model import MoEModel

IGNORE_INDEX = -100
# tokens kept per example when a caller gives no max_length; runs and diagnoses always pass RunConfig.max_length
# (grip_core/runs/evaluate.py), so the probes see the same tokens as training and the traces
DEFAULT_MAX_LENGTH = 128


def unwrap(model: MoEModel | nn.Module, tokenizer=None) -> tuple[nn.Module, object]:
    """(HF model, tokenizer) from an MoEModel or a bare model + tokenizer."""
    if isinstance(model, MoEModel):
        tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        model = model.model
    if tokenizer is None:
        raise ValueError("probes need a tokenizer: pass tokenizer=... or an MoEModel that has one")
    return model, tokenizer


class _eval_mode:
    """Context: model.eval() inside, the previous train/eval mode restored after."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ----------------------------------------------------------------------------- per-example scores

@torch.no_grad()
def answer_nll(model: MoEModel | nn.Module, examples: Sequence, tokenizer=None, batch_size: int = 32,
               max_length: int = DEFAULT_MAX_LENGTH) -> torch.Tensor:
    """(n,) float: mean NLL over each example's answer tokens (NaN where truncation left no answer token)."""
    from ..data import encode_qa

    model, tokenizer = unwrap(model, tokenizer)
    device = next(model.parameters()).device
    out = []
    with _eval_mode(model):
        for i in range(0, len(examples), batch_size):
            batch = encode_qa(tokenizer, list(examples[i:i + batch_size]), max_length)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits       # (B, T, V)
            labels = batch["labels"].to(device)[:, 1:]                                          # (B, T-1)
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                  reduction="none")                                             # (B, T-1)
            count = (labels != IGNORE_INDEX).sum(1).float()                                     # (B,)
            out.append((nll.sum(1) / count).cpu())                                              # NaN if count 0
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def greedy_predictions(model: MoEModel | nn.Module, examples: Sequence, tokenizer=None, batch_size: int = 32,
                       max_new_tokens: int = 16) -> list[str]:
    """Greedy answers, `batch_size` examples per generate call."""
    from ..data import generate_answers

    model, tokenizer = unwrap(model, tokenizer)
    preds: list[str] = []
    with _eval_mode(model):
        for i in range(0, len(examples), batch_size):
            preds += list(generate_answers(model, tokenizer, list(examples[i:i + batch_size]), max_new_tokens))
    return preds


def _is_qa(ex) -> bool:
    return not getattr(ex, "is_text_only", False)


def greedy_correct(model: MoEModel | nn.Module, examples: Sequence, tokenizer=None, batch_size: int = 32,
                   max_new_tokens: int = 16) -> list[bool]:
    """Exact match per QA example (text-only examples have no question to answer: skipped)."""
    from ..data import exact_match

    qa = [ex for ex in examples if _is_qa(ex)]
    # an answer longer than gold + EOS cannot match exactly: stop generating there (a large saving
    # on unlearned models, which rarely emit EOS)
    _, tok = unwrap(model, tokenizer)
    longest = max((len(tok(" " + ex.answer, add_special_tokens=False)["input_ids"]) for ex in qa), default=0)
    preds = greedy_predictions(model, qa, tokenizer, batch_size, min(max_new_tokens, longest + 2))
    return [bool(exact_match(p, ex.answer)) for p, ex in zip(preds, qa)]


def paraphrased(examples: Sequence) -> list:
    """The examples that have a paraphrased question, with it as their question (a paraphrase split)."""
    return [dataclasses.replace(ex, question=ex.paraphrase) for ex in examples if getattr(ex, "paraphrase", None)]


def exact_match_accuracy(model: MoEModel | nn.Module, examples: Sequence, tokenizer=None, batch_size: int = 32,
                         max_new_tokens: int = 16) -> float:
    """Fraction of examples answered exactly (greedy); the attacks' and ablations' accuracy."""
    correct = greedy_correct(model, examples, tokenizer, batch_size, max_new_tokens) if examples else []
    return sum(correct) / len(correct) if correct else float("nan")


def membership_auc(member_nll: Sequence[float] | torch.Tensor, nonmember_nll: Sequence[float] | torch.Tensor) -> float | None:
    """ROC AUC of "member" from the score -NLL (lower loss = member); None when a side is empty."""
    from sklearn.metrics import roc_auc_score

    m = [float(v) for v in member_nll if not math.isnan(float(v))]
    h = [float(v) for v in nonmember_nll if not math.isnan(float(v))]
    if not m or not h:
        return None
    return float(roc_auc_score([1] * len(m) + [0] * len(h), [-v for v in m + h]))


# ----------------------------------------------------------------------------- results

@dataclass
class SplitProbe:
    n: int
    exact_match: float | None       # None when generation was skipped
    mean_nll: float
    mean_prob: float


@dataclass
class ProbeResult:
    splits: dict[str, SplitProbe]
    by_domain: dict[str, dict[str, SplitProbe]] = field(default_factory=dict)   # split -> domain -> probe
    membership_auc: float | None = None
    membership_pair: tuple[str, str] | None = None                              # (member split, non-member split)
    details: dict[str, list[dict]] = field(default_factory=dict)                # split -> per example, if kept

    def to_dict(self) -> dict:
        return asdict(self)

    def em(self, split: str) -> float | None:
        return self.splits[split].exact_match


def _summarise(nll: torch.Tensor, correct: list[bool | None] | None) -> SplitProbe:
    """Means over examples; NaN NLLs (no answer token left) and text-only rows (correct None) are left out."""
    ok = ~torch.isnan(nll)
    mean_nll = nll[ok].mean().item() if ok.any() else float("nan")
    mean_prob = torch.exp(-nll[ok]).mean().item() if ok.any() else float("nan")
    judged = None if correct is None else [c for c in correct if c is not None]
    em = None if judged is None else (sum(judged) / len(judged) if judged else None)
    return SplitProbe(n=int(nll.numel()), exact_match=em, mean_nll=mean_nll, mean_prob=mean_prob)


def run_probes(model: MoEModel | nn.Module, splits: Mapping[str, Sequence], tokenizer=None, *,
               by_domain: bool = True, membership: tuple[str, str] | None = ("forget", "holdout"),
               generate: bool = True, keep_details: bool = False, batch_size: int = 32,
               max_length: int = DEFAULT_MAX_LENGTH,
               max_new_tokens: int = 16) -> ProbeResult:
    """Probe every split of `splits` ({"forget": [QAExample, ...], "retain": [...], ...}).

    by_domain:  also break each split down by `example.domain`.
    membership: (member split, non-member split) for the loss-based AUC; skipped if either is absent.
    generate:   greedy exact match (the slow part); False gives NLL/probability only.
    """
    result = ProbeResult(splits={})
    nlls: dict[str, torch.Tensor] = {}
    for name, examples in splits.items():
        examples = list(examples)
        nll = answer_nll(model, examples, tokenizer, batch_size, max_length) if examples else torch.zeros(0)
        preds: list[str | None] | None = None       # per example; None for text-only rows
        correct: list[bool | None] = []
        if generate:
            from ..data import exact_match
            it = iter(greedy_predictions(model, [ex for ex in examples if _is_qa(ex)], tokenizer, batch_size,
                                         max_new_tokens))
            preds = [next(it) if _is_qa(ex) else None for ex in examples]
            correct = [None if p is None else bool(exact_match(p, ex.answer)) for p, ex in zip(preds, examples)]
        nlls[name] = nll
        result.splits[name] = _summarise(nll, None if preds is None else correct)
        if by_domain:
            groups: dict[str, list[int]] = {}
            for i, ex in enumerate(examples):
                groups.setdefault(str(getattr(ex, "domain", "")), []).append(i)
            result.by_domain[name] = {d: _summarise(nll[idx], None if preds is None else [correct[i] for i in idx])
                                      for d, idx in sorted(groups.items())}
        if keep_details:
            result.details[name] = [
                {"id": ex.id, "nll": float(nll[i]), **({} if preds is None else
                                                       {"prediction": preds[i], "correct": correct[i]})}
                for i, ex in enumerate(examples)]
    if membership is not None and all(s in nlls for s in membership):
        result.membership_auc = membership_auc(nlls[membership[0]], nlls[membership[1]])
        result.membership_pair = tuple(membership)
    return result

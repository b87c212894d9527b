"""The contract every attack follows, its registry, and the probe every attack reports with.

An attack asks: after unlearning, can the forgotten answers be brought back? Each attack is one
file in this package behind `@register_attack("name")` (like grip_core/methods/), and turns an
`AttackContext` (the base and unlearned models, the forget examples to probe, settings) into rows
of the agreed robustness shape (one row per setting):

    {"attack", "setting", "base_em", "unlearned_em", "attacked_em", "recovered",
     "base_prob", "unlearned_prob", "attacked_prob", "routing_shift", "n"}

- *_em: greedy exact match on the evaluation examples; *_prob: mean length-normalised answer
  probability exp(-mean answer NLL) (grip_core.metrics.probes). base_* is the BASE model under
  the same attack (None when the attack was not run on it), unlearned_* the unlearned model
  without attack, attacked_* the unlearned model under the attack.
- recovered = (attacked_em - unlearned_em) / (base_em without attack - unlearned_em), clipped to
  [0, 1]; None when the unlearned model forgot nothing (the denominator is <= 0).
- routing_shift: share of the evaluation tokens' expert slots (unlearned model, teacher-forced
  question + answer) that the attack changed: 1 - |S ∩ S'| / |S| averaged over tokens and MoE layers
  (S the unlearned model's selection, S' the attacked one). None where tokens differ (paraphrases).

Footguns:
- Every attack must leave both models exactly as it found them (in-place swaps are undone in a
  `finally`; training attacks work on copies).
- The evaluation set is the SAME for every attack (the forget set minus the relearning slice), so
  rows are comparable; `AttackContext.plain` holds the no-attack numbers measured once.
"""
from __future__ import annotations

import abc
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..data import encode_qa
from ..metrics.probes import answer_nll, greedy_correct
from ..moe import MoEModel, RoutingTrace
from ..moe.errors import ConfigError
from ..typecheck import check_fields

ROW_KEYS = ("attack", "setting", "base_em", "unlearned_em", "attacked_em", "recovered", "base_prob",
            "unlearned_prob", "attacked_prob", "routing_shift", "n")


@dataclass
class AttackConfig:
    """Settings of the robustness attacks (one set of defaults for the CLI, the run report and the study)."""

    eval_examples: int = 0          # forget examples probed after the relearning slice is set aside (0 = all)
    batch_size: int = 32            # examples per probe / trace batch
    max_new_tokens: int = 16        # greedy generation cap (shortened to the longest gold answer + 2)
    max_length: int = 64            # tokens per teacher-forced sequence (NLL, traces, relearning)
    on_base: bool = True            # also run every attack on the base model (base_em / base_prob)
    seed: int = 0                   # relearning slice and batch order
    force_n: int = 0                # expert forcing: experts forced per token (0 = the model's top-k, the paper's)
    relearn_steps: int = 30         # optimizer steps of each relearning attack (0 = none: recovers nothing)
    relearn_fraction: float = 0.1   # share of the forget set fine-tuned on (the rest is evaluated)
    relearn_batch_size: int = 8     # examples per relearning step
    relearn_lr_full: float = 3e-4   # AdamW lr, every parameter (the "shortcut"/"full" presets' lr)
    relearn_lr_router: float = 1e-2 # AdamW lr, routers only (the "routers-only" preset's lr)
    quant_scope: str = "experts"    # "experts": routed + shared expert weights; "linear": every weight matrix
                                    # of the decoder layers (attention, experts, routers); never embeddings/head
    int4_group_size: int = 64       # INT4: elements per scale/zero-point group along the input dim
    nf4_block_size: int = 64        # NF4: elements per absmax block (torchao's default)

    def __post_init__(self):
        check_fields(self, "AttackConfig")
        for name, low in (("eval_examples", 0), ("batch_size", 1), ("max_new_tokens", 1), ("max_length", 4),
                          ("force_n", 0), ("relearn_steps", 0), ("relearn_batch_size", 1),
                          ("int4_group_size", 2), ("nf4_block_size", 2)):
            if getattr(self, name) < low:
                raise ConfigError(f"attack setting {name} must be >= {low}, got {getattr(self, name)}")
        if not 0 < self.relearn_fraction < 1:
            raise ConfigError(f"attack setting relearn_fraction must be in (0, 1), got {self.relearn_fraction}")
        for name in ("relearn_lr_full", "relearn_lr_router"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"attack setting {name} must be a positive number, got {getattr(self, name)}")
        if self.quant_scope not in ("experts", "linear"):
            raise ConfigError(f"attack setting quant_scope must be 'experts' or 'linear', got {self.quant_scope!r}")


@dataclass
class Probe:
    """Exact match and mean answer probability of one model (under one attack) on the evaluation set."""

    em: float
    prob: float


@dataclass
class AttackContext:
    """Everything an attack needs. `plain` and `unlearned_trace` are measured once, by `robustness`."""

    base: MoEModel
    unlearned: MoEModel
    tokenizer: object
    eval_set: list                  # forget examples every attack is judged on
    relearn_set: list               # the forget slice relearning trains on (never evaluated)
    related_set: list               # same-domain facts never in the forget set (relearn_related)
    config: AttackConfig
    plain: dict = field(default_factory=dict)          # {"base": Probe, "unlearned": Probe} without attack
    unlearned_trace: RoutingTrace | None = None        # unlearned routing of eval_set, teacher-forced

    def probe(self, moe: MoEModel, examples: list | None = None, during: Callable[[], object] | None = None) -> Probe:
        """EM + mean answer probability of `moe` on `examples` (default: the evaluation set), inside `during()`."""
        examples = self.eval_set if examples is None else examples
        cfg = self.config
        with (during() if during else nullcontext()):
            correct = greedy_correct(moe, examples, self.tokenizer, cfg.batch_size, cfg.max_new_tokens)
            nll = answer_nll(moe, examples, self.tokenizer, cfg.batch_size, cfg.max_length)
        nll = nll[~torch.isnan(nll)]
        return Probe(em=sum(correct) / len(correct) if correct else float("nan"),
                     prob=float(torch.exp(-nll).mean()) if nll.numel() else float("nan"))

    def trace(self, moe: MoEModel, during: Callable[[], object] | None = None) -> RoutingTrace:
        """Routing of the evaluation set's teacher-forced tokens through `moe` (inside `during()`)."""
        bs = self.config.batch_size
        batches = [encode_qa(self.tokenizer, self.eval_set[i:i + bs], self.config.max_length)
                   for i in range(0, len(self.eval_set), bs)]
        with (during() if during else nullcontext()):
            return moe.trace(batches)

    def routing_shift(self, moe: MoEModel, during: Callable[[], object] | None = None) -> float:
        """Share of the unlearned model's expert slots on the evaluation tokens that `moe` (under `during`) changed."""
        return slot_shift(self.unlearned_trace, self.trace(moe, during))

    def row(self, attack: str, setting: str, attacked: Probe, base: Probe | None,
            routing_shift: float | None, n: int | None = None) -> dict:
        """One row of the agreed shape; `recovered` from the plain (no-attack) base and unlearned EM."""
        b0, u0 = self.plain["base"], self.plain["unlearned"]
        return {"attack": attack, "setting": setting,
                "base_em": None if base is None else _f(base.em), "unlearned_em": _f(u0.em),
                "attacked_em": _f(attacked.em), "recovered": recovered(b0.em, u0.em, attacked.em),
                "base_prob": None if base is None else _f(base.prob), "unlearned_prob": _f(u0.prob),
                "attacked_prob": _f(attacked.prob), "routing_shift": None if routing_shift is None else _f(routing_shift),
                "n": len(self.eval_set) if n is None else n}


def _f(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def recovered(base_em: float, unlearned_em: float, attacked_em: float) -> float | None:
    """(attacked - unlearned) / (base - unlearned) clipped to [0, 1]; None when nothing was forgotten."""
    forgotten = base_em - unlearned_em
    if not (math.isfinite(forgotten) and forgotten > 0 and math.isfinite(attacked_em)):
        return None
    return min(1.0, max(0.0, (attacked_em - unlearned_em) / forgotten))


def slot_shift(before: RoutingTrace, after: RoutingTrace) -> float:
    """1 - mean |S ∩ S'| / |S| over tokens and layers (S from `before`, S' from `after`; k may differ)."""
    if before.num_tokens != after.num_tokens or not torch.equal(before.token_ids, after.token_ids):
        raise ValueError("routing_shift compares traces of the same tokens")
    kept, slots = 0.0, 0.0
    for layer in range(before.num_layers):
        a, b = before.selection_mask(layer), after.selection_mask(layer)        # (N, E) bool
        kept += float((a & b).sum())
        slots += float(a.sum())
    return 1.0 - kept / slots if slots else 0.0


class Attack(abc.ABC):
    """One attack: `run(ctx)` returns its rows (one per setting). Subclasses set `names` via the decorator."""

    names: tuple[str, ...] = ()     # the row "attack" values this class produces (set by @register_attack)

    @abc.abstractmethod
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        """Rows for the requested `names` (a subset of `self.names`), both models left as they were."""


_REGISTRY: dict[str, type[Attack]] = {}


def register_attack(*names: str):
    """Class decorator: the attack answers to each of `names` (one class may produce a family of rows)."""
    def deco(cls: type[Attack]) -> type[Attack]:
        for n in names:
            if n in _REGISTRY:
                raise ValueError(f"attack {n!r} registered twice")
            _REGISTRY[n] = cls
        cls.names = tuple(names)
        return cls
    return deco


def available_attacks() -> list[str]:
    """Every registered attack name, in registration order."""
    return list(_REGISTRY)


def attack_class(name: str) -> type[Attack]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown attack {name!r}; available: {', '.join(_REGISTRY)}") from None


@contextmanager
def restored_parameters(tensors: dict[str, torch.Tensor]):
    """Within the block the given parameters may be overwritten in place; on exit they hold their old values.

    Costs one copy of the given tensors (not of the model).
    """
    saved = {k: t.detach().clone() for k, t in tensors.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(saved[k])

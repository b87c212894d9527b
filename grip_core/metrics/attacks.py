"""Router-restoration attack: did the unlearned model forget, or only reroute?

Put the ORIGINAL routers (a `moe.router_state()` taken before unlearning) back into the
unlearned model (swapped in place for the probe, then swapped back: no second model in
memory) and re-run the forget probe. If the answers come back,
the method hid the knowledge behind the router (the "superficial forgetting" shortcut);
if not, the knowledge left the experts/attention.

    recovered = (EM_restored - EM_unlearned) / max(EM_base - EM_unlearned, eps)

`recovered_raw` is reported as is (it can be < 0 or > 1, and is meaningless when the
method forgot nothing: see `forgotten`); `recovered` is clipped to [0, 1] for display.

The reverse, `router_transplant`, puts the unlearned routers into a copy of the BASE
model: does the router alone make it forget? forgot = (EM_base - EM_transplant) / max(EM_base - EM_unlearned, eps).

The given models are left as they were (the restoration swaps routers in place and restores
them in a `finally`; the transplant works on a copy of the base).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..moe.model import MoEModel
from .probes import DEFAULT_MAX_LENGTH, answer_nll, exact_match_accuracy

EPS = 1e-9


@torch.no_grad()
def load_router_state(moe: MoEModel, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (router parameter/buffer path -> tensor) into `moe` IN PLACE; every key must exist."""
    model = moe.model
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    missing = sorted(k for k in state if k not in targets)
    if missing:
        raise KeyError(f"router state keys not in {type(model).__name__}: {missing[:3]}"
                       f"{' ...' if len(missing) > 3 else ''} (a state of another architecture?)")
    for key, value in state.items():
        if targets[key].shape != value.shape:
            raise ValueError(f"{key}: state has shape {tuple(value.shape)}, model {tuple(targets[key].shape)}")
        targets[key].copy_(value)


def with_routers(moe: MoEModel, state: dict[str, torch.Tensor]) -> MoEModel:
    """A deep copy of `moe` whose routers are replaced by `state`; `moe` itself is untouched."""
    clone = MoEModel(copy.deepcopy(moe.model), moe.tokenizer, name=f"{moe.name}+routers")
    load_router_state(clone, state)
    return clone


@contextmanager
def swapped_routers(moe: MoEModel, state: dict[str, torch.Tensor]):
    """Within the block `moe`'s routers are `state`; on exit (even on error) they are what they were.

    Only the router tensors are copied (E x d per layer), so this costs no second model.
    """
    saved = {k: v.detach().clone() for k, v in _router_targets(moe, state).items()}
    load_router_state(moe, state)
    try:
        yield moe
    finally:
        load_router_state(moe, saved)


def _router_targets(moe: MoEModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    targets = dict(moe.model.named_parameters())
    targets.update(dict(moe.model.named_buffers()))
    return {k: targets[k] for k in state if k in targets}


@dataclass
class RestorationResult:
    """The restoration attack on one split (normally the forget set)."""

    split: str
    n: int
    em_base: float                  # original model
    em_unlearned: float             # unlearned model
    em_restored: float              # unlearned model with the original routers
    forgotten: float                # em_base - em_unlearned: how much there was to recover
    recovered_raw: float            # (em_restored - em_unlearned) / max(forgotten, eps)
    recovered: float                # recovered_raw clipped to [0, 1] (display)
    nll_unlearned: float            # mean answer NLL, unlearned
    nll_restored: float             # mean answer NLL, restored

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TransplantResult:
    """The reverse: the base model with the unlearned routers. Does the router alone forget?"""

    split: str
    n: int
    em_base: float
    em_unlearned: float
    em_transplant: float            # base model with the unlearned routers
    forgot_raw: float               # (em_base - em_transplant) / max(em_base - em_unlearned, eps)
    forgot: float                   # clipped to [0, 1]

    def to_dict(self) -> dict:
        return asdict(self)


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def _mean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return t.mean().item() if t.numel() else float("nan")


def router_restoration_attack(unlearned: MoEModel, original_routers: dict[str, torch.Tensor], examples: Sequence,
                              *, base: MoEModel | None = None, em_base: float | None = None, tokenizer=None,
                              split: str = "forget", batch_size: int = 32, max_new_tokens: int = 16,
                              max_length: int = DEFAULT_MAX_LENGTH) -> RestorationResult:
    """Put `original_routers` into `unlearned` (in place, restored afterwards) and measure exact match on `examples`.

    The answer NLLs keep `max_length` tokens per example (pass the run's RunConfig.max_length).

    EM_base comes from `base` (the original model) or, if already measured, `em_base`.
    """
    if base is None and em_base is None:
        raise ValueError("give the original model (base=...) or its exact match on these examples (em_base=...)")
    kw = dict(tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    em_b = exact_match_accuracy(base, examples, **kw) if em_base is None else float(em_base)
    em_u = exact_match_accuracy(unlearned, examples, **kw)
    nll_u = _mean(answer_nll(unlearned, examples, tokenizer, batch_size, max_length))
    with swapped_routers(unlearned, original_routers) as restored:
        em_r = exact_match_accuracy(restored, examples, **kw)
        nll_r = _mean(answer_nll(restored, examples, tokenizer, batch_size, max_length))
    raw = (em_r - em_u) / max(em_b - em_u, EPS)
    return RestorationResult(split=split, n=len(examples), em_base=em_b, em_unlearned=em_u, em_restored=em_r,
                             forgotten=em_b - em_u, recovered_raw=raw, recovered=_clip(raw),
                             nll_unlearned=nll_u, nll_restored=nll_r)


def router_transplant(base: MoEModel, unlearned_routers: dict[str, torch.Tensor], examples: Sequence,
                      *, unlearned: MoEModel | None = None, em_unlearned: float | None = None, tokenizer=None,
                      split: str = "forget", batch_size: int = 32, max_new_tokens: int = 16) -> TransplantResult:
    """Put `unlearned_routers` into a copy of `base` and measure how much of the forgetting they carry alone."""
    if unlearned is None and em_unlearned is None:
        raise ValueError("give the unlearned model (unlearned=...) or its exact match (em_unlearned=...)")
    kw = dict(tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens)
    em_b = exact_match_accuracy(base, examples, **kw)
    em_u = exact_match_accuracy(unlearned, examples, **kw) if em_unlearned is None else float(em_unlearned)
    em_t = exact_match_accuracy(with_routers(base, unlearned_routers), examples, **kw)
    raw = (em_b - em_t) / max(em_b - em_u, EPS)
    return TransplantResult(split=split, n=len(examples), em_base=em_b, em_unlearned=em_u, em_transplant=em_t,
                            forgot_raw=raw, forgot=_clip(raw))

"""The contract every unlearning method follows, the registry, and NLL helpers.

A method is one loss and nothing else: it never sees the optimizer, the
trainable scope or GRIP (GRIP wraps the update, see docs/architecture.md).
The job loop calls `method.loss(model, forget_batch, retain_batch, ref_model)`
and backpropagates `.total`.

Batches are HF-style dicts {"input_ids", "attention_mask", "labels"}, each
(B, T), right-padded, labels -100 everywhere except the answer tokens.
Logits at position t predict the token at t + 1, so every helper shifts by one.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100
Batch = Mapping[str, torch.Tensor]
Reduction = Literal["token_mean", "seq_sum", "seq_mean"]


@dataclass
class MethodLoss:
    """What one loss call returns: the scalar to backpropagate, and floats to log."""

    total: torch.Tensor  # () differentiable scalar
    parts: dict[str, float] = field(default_factory=dict)  # e.g. forget_loss, retain_loss


@dataclass
class MethodArgs:
    """Base of each method's typed hyper-parameters (one dataclass per method)."""


class UnlearningMethod(abc.ABC):
    """One unlearning loss. Subclasses set `args_cls` and implement `loss`.

    `needs_reference` tells the job loop to keep a frozen copy of the original
    model and pass it as `ref_model` (a method may set it per instance when it
    depends on its arguments, e.g. GradDiff with a KL retain term).
    """

    name: str = ""  # set by @register_method
    args_cls: type[MethodArgs] = MethodArgs
    needs_reference: bool = False

    def __init__(self, args: MethodArgs | None = None, **kwargs):
        if args is not None and kwargs:
            raise TypeError("pass either `args` or keyword hyper-parameters, not both")
        if args is None:
            valid = [f.name for f in dataclasses.fields(self.args_cls)]
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise TypeError(f"{type(self).__name__}: unknown argument(s) {unknown}; valid: {valid}")
            args = self.args_cls(**kwargs)
        elif not isinstance(args, self.args_cls):
            raise TypeError(f"{type(self).__name__} expects {self.args_cls.__name__}, got {type(args).__name__}")
        self.args = args

    @abc.abstractmethod
    def loss(
        self,
        model: nn.Module,
        forget_batch: Batch,
        retain_batch: Batch | None = None,
        ref_model: nn.Module | None = None,
    ) -> MethodLoss:
        """The scalar to minimise on one (forget, retain) pair of batches."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.args})"


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[UnlearningMethod]] = {}
M = TypeVar("M", bound=type[UnlearningMethod])


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: make a method reachable by `get_method(name)` (case-insensitive)."""

    key = name.lower()

    def deco(cls: M) -> M:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"unlearning method {key!r} is already registered by {_REGISTRY[key].__name__}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def method_class(name: str) -> type[UnlearningMethod]:
    """The registered class (its `.args_cls` is the typed config of the method)."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown unlearning method {name!r}; available: {', '.join(available_methods())}"
        ) from None


def get_method(name: str, **kwargs) -> UnlearningMethod:
    """Instantiate a method by name: `get_method("npo", beta=0.2)` or `get_method("npo", args=NPOArgs())`."""
    return method_class(name)(**kwargs)


# ----------------------------------------------------------------------------- helpers


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T, V) logits; labels are NOT passed, so no model-side loss or aux loss is added."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of the next label. logits (B, T, V), labels (B, T) -> nll (B, T-1) (0 where
    ignored), mask (B, T-1) bool. Computed in fp32 so bf16 models get the same loss."""
    targets = labels[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2),  # (B, V, T-1)
        targets,
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )  # (B, T-1)
    return nll, targets != IGNORE_INDEX


def reduce_nll(nll: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token_mean") -> torch.Tensor:
    """token_mean: () mean over every answer token of the batch (HF's `outputs.loss`);
    seq_sum: (B,) summed per sequence; seq_mean: (B,) divided by the answer length |y|.
    A sequence without answer tokens counts as length 1 (its sum is 0), never NaN."""
    if reduction == "token_mean":
        return nll.sum() / mask.sum().clamp_min(1)
    if reduction == "seq_sum":
        return nll.sum(-1)
    if reduction == "seq_mean":
        return nll.sum(-1) / mask.sum(-1).clamp_min(1)
    raise ValueError(f"unknown reduction {reduction!r}; expected token_mean, seq_sum or seq_mean")


def answer_nll(model: nn.Module, batch: Batch, reduction: Reduction = "token_mean") -> torch.Tensor:
    """NLL over the answer tokens (labels != -100); see `reduce_nll` for the reductions."""
    nll, mask = token_nll(forward_logits(model, batch), batch["labels"])
    return reduce_nll(nll, mask, reduction)


def sequence_logprob(model: nn.Module, batch: Batch, normalize: bool = False) -> torch.Tensor:
    """(B,) log π(y|x) summed over answer tokens, or divided by |y| when `normalize`."""
    return -answer_nll(model, batch, "seq_mean" if normalize else "seq_sum")


def require_batch(batch: Batch | None, method: str, what: str = "retain") -> Batch:
    if batch is None:
        raise ValueError(f"{method} needs a {what} batch")
    return batch


def require_reference(ref_model: nn.Module | None, method: str) -> nn.Module:
    if ref_model is None:
        raise ValueError(f"{method} needs a frozen reference model (ref_model=...)")
    return ref_model

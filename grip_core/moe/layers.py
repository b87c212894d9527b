"""Discovery: find every MoE block and its router in a transformers model.

A router is recognised by its class name (the family table's pattern), never by
`isinstance(nn.Linear)`: in transformers 5 most routers are bare `*TopKRouter`
modules holding a `weight` (E x d), a few subclass nn.Linear, and both kinds must
be found the same way.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import NotAnMoEModelError, UnsupportedRouterError
from .families import FamilySpec, family_for, get_attr_path
from .selection import SelectionRule

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
_TOP_K_NAMES = ("top_k", "num_experts_per_tok", "moe_topk", "moe_k")


@dataclass(eq=False)
class MoELayer:
    """One MoE block: where it is, its router, and the numbers GRIP needs.

    `index` is the DECODER layer index (OLMoE: every layer; DeepSeek-V3: dense
    layers come first and are skipped), not the position in `MoEModel.layers`.
    """

    index: int
    module_path: str          # dotted path of the MoE block, e.g. "model.layers.0.mlp"
    router_path: str          # dotted path of the router module
    block: nn.Module
    router: nn.Module
    experts: nn.Module | None
    num_experts: int          # E
    top_k: int                # k
    hidden_size: int          # d, the router input width
    family: FamilySpec
    shared_experts: str | None  # dotted path of the shared expert(s), or None

    @property
    def router_weight(self) -> nn.Parameter:
        """The router's weight Theta (E x d): the only tensor GRIP constrains."""
        return get_attr_path(self.router, self.family.weight_attr)

    @property
    def router_bias(self) -> nn.Parameter | None:
        """A bias added to the logits (GPT-OSS), or None."""
        holder = get_attr_path(self.router, self.family.weight_attr.rsplit(".", 1)[0]) \
            if "." in self.family.weight_attr else self.router
        bias = getattr(holder, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def selection_bias(self) -> torch.Tensor | None:
        """A bias used only to choose experts (DeepSeek-V3's e_score_correction_bias), or None."""
        if self.family.selection_bias_attr is None:
            return None
        return get_attr_path(self.router, self.family.selection_bias_attr)

    @property
    def score_fn(self) -> str:
        return self.family.score_fn

    def selection_rule(self) -> SelectionRule:
        """How this router picks its top-k (the family row's `selection` / `group_attrs`); the selection bias
        and group sizes are SNAPSHOT now (float32 CPU copy)."""
        sb = self.selection_bias
        if self.family.selection == "logit" or sb is None:
            if sb is not None and bool(sb.abs().max() > 0):
                warnings.warn(f"{self.family.name}: selection uses {self.score_fn}(logits) + a nonzero bias; GRIP's "
                              "margins are taken on the logits and are approximate for this family", stacklevel=3)
            return SelectionRule("logit")
        groups = (1, 1)
        if self.family.group_attrs:
            groups = tuple(getattr(self.router, a, None) for a in self.family.group_attrs)
            if not all(isinstance(g, int) and g > 0 for g in groups):
                raise UnsupportedRouterError(self.family.name, self.router_path,
                                             f"grouped top-k without integer {self.family.group_attrs} on the router")
        return SelectionRule(self.family.selection, sb.detach().float().reshape(-1).cpu().clone(), *groups)

    def describe(self) -> dict:
        """A JSON-able summary (the dashboard's architecture table)."""
        return {"layer": self.index, "module": self.module_path, "router": self.router_path,
                "router_class": type(self.router).__name__, "num_experts": self.num_experts,
                "top_k": self.top_k, "router_weight_shape": list(self.router_weight.shape),
                "router_bias": self.router_bias is not None,
                "selection_bias": self.selection_bias is not None, "score_fn": self.score_fn,
                "grouped_topk": self.family.grouped_topk, "shared_experts": self.shared_experts}


def _top_k(router: nn.Module, block: nn.Module, config) -> int | None:
    for owner in (router, block, config):
        for name in _TOP_K_NAMES:
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of `model` in depth order; raises if there is none."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    family = family_for(getattr(config, "model_type", None))
    layers: list[MoELayer] = []
    for path, module in model.named_modules():
        if not family.matches_router(type(module).__name__) or "." not in path:
            continue
        weight = get_attr_path(module, family.weight_attr)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise UnsupportedRouterError(family.name, path, f"no 2-D '{family.weight_attr}' on {type(module).__name__}")
        block_path, _, router_name = path.rpartition(".")
        block = model.get_submodule(block_path)
        top_k = _top_k(module, block, config)
        if top_k is None:
            raise UnsupportedRouterError(family.name, path, "cannot find top-k (router.top_k or config.num_experts_per_tok)")
        match = _LAYER_INDEX.search(path)
        shared = _shared_expert_path(model, block_path, family)
        layers.append(MoELayer(
            index=int(match.group(1)) if match else len(layers), module_path=block_path, router_path=path,
            block=block, router=module, experts=getattr(block, "experts", None),
            num_experts=int(weight.shape[0]), top_k=top_k, hidden_size=int(weight.shape[1]),
            family=family, shared_experts=shared))
    if not layers:
        _raise_not_moe(model, family)
    return layers


def _shared_expert_path(model: nn.Module, block_path: str, family: FamilySpec) -> str | None:
    """Shared experts sit in the MoE block (Qwen2-MoE) or beside it in the decoder layer (GraniteMoE-Shared)."""
    parent_path = block_path.rpartition(".")[0]
    for owner_path in (block_path, parent_path):
        owner = model.get_submodule(owner_path) if owner_path else model
        for attr in family.shared_expert_attrs:
            if getattr(owner, attr, None) is not None:
                return f"{owner_path}.{attr}"
    return None


def _raise_not_moe(model: nn.Module, family: FamilySpec) -> None:
    """Tell "no MoE at all" apart from "an MoE whose router we do not know"."""
    for path, module in model.named_modules():
        if hasattr(module, "experts") and any(hasattr(module, n) for n in ("gate", "router")):
            child = getattr(module, "gate", None) or getattr(module, "router")
            raise UnsupportedRouterError(
                family.name, path, f"an MoE block with router class {type(child).__name__} that the "
                "family table does not know; add a FamilySpec row in grip_core/moe/families.py")
    raise NotAnMoEModelError(type(model).__name__)

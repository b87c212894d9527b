"""Trainable scopes: which parameters unlearning may change, and at which learning rate.

A scope freezes everything outside it (requires_grad=False) and splits what is
inside into three optimizer groups, so that the routers' learning rate can be
set apart (docs/method.md#what-the-probes-found: the router shortcut appears only with routers at ×30):

    routers  the router weights (and biases) of every MoE layer
    experts  every other parameter of an MoE block: routed experts, shared
             experts and their gates
    other    the rest: attention, norms, dense MLPs, embeddings, lm_head

Kinds:
    all              every parameter
    moe              MoE blocks only (routers + routed + shared experts)
    experts+routers  routers and routed experts (no shared experts)
    routers-only     routers
    all-but-routers  every parameter except the routers
    layers           every parameter of the decoder layers in `layers`
For moe / experts+routers / routers-only, `layers` (optional) keeps only the
MoE blocks of those decoder layers.

Router access goes only through `MoELayer.router_weight` / `.router_bias`
(docs/architecture.md); the scope never looks at how a family builds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, Sequence, get_args

from torch import nn

ScopeKind = Literal["all", "moe", "layers", "experts+routers", "routers-only", "all-but-routers"]
SCOPE_KINDS: tuple[str, ...] = get_args(ScopeKind)
GROUPS = ("routers", "experts", "other")


class MoELayerLike(Protocol):
    """What a scope reads from `grip_core.moe.MoELayer`."""

    index: int  # decoder layer index
    module_path: str  # dotted path of the MoE block, e.g. "model.layers.0.mlp"
    block: nn.Module
    shared_experts: str | None  # dotted path of shared experts (inside or beside the block), or None
    router_weight: nn.Parameter  # (E, d)
    router_bias: nn.Parameter | None
    experts: nn.Module | None  # the routed experts


@dataclass
class ScopeConfig:
    kind: ScopeKind = "all"
    layers: list[int] | None = None  # decoder layer indices (required for kind="layers")
    lr: float = 1e-5
    router_lr_mult: float = 1.0
    expert_lr_mult: float = 1.0
    other_lr_mult: float = 1.0

    def __post_init__(self):
        if self.kind not in SCOPE_KINDS:
            raise ValueError(f"unknown scope kind {self.kind!r}; expected one of {', '.join(SCOPE_KINDS)}")
        if self.kind == "layers" and not self.layers:
            raise ValueError("scope kind 'layers' needs a non-empty `layers` list")
        if self.kind in ("all", "all-but-routers") and self.layers is not None:
            raise ValueError(f"scope kind {self.kind!r} takes no `layers`")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("router_lr_mult", "expert_lr_mult", "other_lr_mult"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def group_lr(self, group: str) -> float:
        mult = {"routers": self.router_lr_mult, "experts": self.expert_lr_mult, "other": self.other_lr_mult}[group]
        return self.lr * mult


def _moe_layers(moe) -> list[MoELayerLike]:
    """Accept a `MoEModel` (its `.layers`) or a plain list of MoE layers."""
    return list(getattr(moe, "layers", moe))


def decoder_layer_prefix(model: nn.Module, moe_layers: Sequence[MoELayerLike]) -> str:
    """Dotted path of the decoder-layer ModuleList, read off an MoE block's path
    ("model.layers.3.mlp" with index 3 -> "model.layers"); "model.layers" by default."""
    candidates = []
    for layer in moe_layers:
        parts = layer.module_path.split(".")
        candidates += [".".join(parts[:i]) for i, p in enumerate(parts) if p == str(layer.index) and i > 0]
    candidates.append("model.layers")
    for path in candidates:
        try:
            if isinstance(model.get_submodule(path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise ValueError("cannot find the decoder layer list (tried: " + ", ".join(dict.fromkeys(candidates)) + ")")


def classify_parameters(model: nn.Module, moe) -> dict[str, str]:
    """name -> "router" | "expert" | "shared" (MoE block, neither) | "other", for every parameter."""
    layers = _moe_layers(moe)
    kind_of: dict[int, str] = {}
    for layer in layers:
        for p in _block_params(model, layer):
            kind_of[id(p)] = "shared"
        if layer.experts is not None:
            for p in layer.experts.parameters():
                kind_of[id(p)] = "expert"
        for p in (layer.router_weight, layer.router_bias):
            if p is not None:
                kind_of[id(p)] = "router"
    return {name: kind_of.get(id(p), "other") for name, p in model.named_parameters()}


def scope_parameter_names(model: nn.Module, moe, scope: ScopeConfig) -> list[str]:
    """Names (model.named_parameters order) of the parameters that the scope trains."""
    layers = _moe_layers(moe)
    kinds = classify_parameters(model, layers)
    names = list(kinds)
    if scope.kind == "all":
        return names
    if scope.kind == "all-but-routers":
        return [n for n in names if kinds[n] != "router"]
    wanted = None if scope.layers is None else _resolve_layers(model, layers, scope.layers)
    if scope.kind == "layers":
        prefix = decoder_layer_prefix(model, layers)
        starts = tuple(f"{prefix}.{i}." for i in sorted(wanted))
        return [n for n in names if n.startswith(starts)]
    keep = {"moe": {"router", "expert", "shared"}, "experts+routers": {"router", "expert"},
            "routers-only": {"router"}}[scope.kind]
    chosen = layers
    if wanted is not None:
        known = {layer.index for layer in layers}
        if wanted - known:
            raise ValueError(f"layers {sorted(wanted - known)} have no MoE block (MoE layers: {sorted(known)})")
        chosen = [layer for layer in layers if layer.index in wanted]
    in_blocks = {id(p) for layer in chosen for p in _block_params(model, layer)}
    params = dict(model.named_parameters())
    return [n for n in names if kinds[n] in keep and id(params[n]) in in_blocks]


def _resolve_layers(model: nn.Module, moe_layers: Sequence[MoELayerLike], indices: Sequence[int]) -> set[int]:
    """Decoder layer indices, negatives counted from the end; out of range is an error."""
    n = len(model.get_submodule(decoder_layer_prefix(model, moe_layers)))
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"layers {bad} out of range for {n} decoder layers")
    return {i % n for i in indices}


def _block_params(model: nn.Module, layer: MoELayerLike) -> Iterable[nn.Parameter]:
    """Every parameter of an MoE block, with shared experts that sit beside it
    (GraniteMoE-Shared keeps them in the decoder layer) and the router wherever it lives."""
    yield from layer.block.parameters()
    shared = getattr(layer, "shared_experts", None)  # dotted path or None
    if shared:
        yield from model.get_submodule(shared).parameters()
    for p in (layer.router_weight, layer.router_bias):
        if p is not None:
            yield p


def build_param_groups(model: nn.Module, moe, scope: ScopeConfig) -> list[dict]:
    """Freeze everything outside `scope`, unfreeze everything inside, and return
    optimizer param groups [{"name", "params", "param_names", "lr"}, ...] in the
    order routers, experts, other; empty groups are left out. `moe` is a
    `MoEModel` or its list of `MoELayer`s."""
    layers = _moe_layers(moe)
    trainable = set(scope_parameter_names(model, layers, scope))
    kinds = classify_parameters(model, layers)
    group_of = {"router": "routers", "expert": "experts", "shared": "experts", "other": "other"}
    grouped: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
        if name in trainable:
            grouped[group_of[kinds[name]]].append((name, p))
    if not trainable:
        raise ValueError(f"scope {scope.kind!r} selects no parameters")
    return [
        {"name": g, "params": [p for _, p in items], "param_names": [n for n, _ in items], "lr": scope.group_lr(g)}
        for g, items in grouped.items()
        if items
    ]

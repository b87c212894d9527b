"""Routing-shift attribution: did the ROUTER move, or did its INPUTS drift?

Under full-parameter unlearning a retained token's selection S'(x') changes for
two reasons: the router weights moved (Θ -> Θ') and the router inputs moved
(x -> x', because attention, embeddings and earlier experts also trained).
GRIP constrains only the first. With the base model's router inputs X and the
unlearned model's X' on the same tokens we evaluate four selections:

    base         S(Θ,  X )   what the original model chose
    actual       S(Θ', X')   what the unlearned model chooses
    router_only  S(Θ', X )   new router on the original inputs: the router's own effect
    drift_only   S(Θ,  X')   original router on the drifted inputs: the inputs' own effect

and compare each with `base` by top-k SET equality (routing stability).

Decomposition: two-player Shapley on the shift Δ = 1 - stability,
    router = ½[Δ_router_only + (Δ_actual - Δ_drift_only)]
    drift  = ½[Δ_drift_only  + (Δ_actual - Δ_router_only)]
so router + drift = Δ_actual exactly, the interaction is split evenly, and a
factor that did not change (Θ' = Θ) gets exactly 0. Contributions can be
negative (a router change that undoes drift); shares are contribution / Δ_actual.

Every selection is recomputed by calling the ROUTER MODULE itself with the weights
swapped in (torch.func.functional_call), so sigmoid scores, grouped top-k and
selection-only biases (DeepSeek-V3) are exactly those of the family.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.func import functional_call

from ..moe.layers import MoELayer
from ..moe.model import MoEModel
from ..moe.trace import RoutingTrace, parse_router_output
from .routing import check_same_tokens, set_agreement

RouterState = dict[str, torch.Tensor]   # full parameter/buffer path -> tensor, as MoEModel.router_state()


def full_router_state(moe: MoEModel) -> RouterState:
    """Every parameter AND buffer of every router (router_state() plus e.g. DeepSeek's selection bias)."""
    state = {}
    for layer in moe.layers:
        for name, t in list(layer.router.named_parameters()) + list(layer.router.named_buffers()):
            state[f"{layer.router_path}.{name}"] = t.detach().clone()
    return state


def layer_router_params(layer: MoELayer, state: RouterState) -> dict[str, torch.Tensor]:
    """The entries of `state` that belong to this layer's router, keyed relative to the router module."""
    prefix = layer.router_path + "."
    params = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if layer.family.weight_attr not in params:
        raise KeyError(f"router state has no '{prefix}{layer.family.weight_attr}' (MoE layer {layer.index}); "
                       "take it with moe.router_state() or full_router_state(moe) of the same architecture")
    return params


@torch.no_grad()
def select_with(layer: MoELayer, params: dict[str, torch.Tensor], x: torch.Tensor,
                chunk: int = 8192) -> torch.Tensor:
    """Top-k selection (N, k) of the router module run on inputs x (N, d) with `params` swapped in.

    Runs in eval mode (PhiMoE adds jitter in training), on the router's device and dtype,
    `chunk` rows at a time; the module's own tensors are never modified.
    """
    ref = layer.router_weight
    params = {k: v.to(ref.device, v.dtype if not v.is_floating_point() else ref.dtype) for k, v in params.items()}
    was_training = layer.router.training
    layer.router.eval()
    out = []
    try:
        for i in range(0, x.shape[0], chunk):
            xi = x[i:i + chunk].to(ref.device, ref.dtype)                       # (n, d)
            _, sel = parse_router_output(layer, functional_call(layer.router, params, (xi,)), xi.shape[0])
            out.append(sel.long().cpu())
    finally:
        layer.router.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, layer.top_k, dtype=torch.long)


# ----------------------------------------------------------------------------- results

def shapley_split(shift_actual: float, shift_router: float, shift_drift: float) -> tuple[float, float]:
    """(router, drift) contributions to `shift_actual`; they sum to it exactly (see the module docstring)."""
    router = 0.5 * (shift_router + (shift_actual - shift_drift))
    drift = 0.5 * (shift_drift + (shift_actual - shift_router))
    return router, drift


@dataclass
class LayerAttribution:
    """Attribution at one MoE layer (stabilities are fractions of tokens with an unchanged top-k set)."""

    layer: int
    num_tokens: int
    stability_actual: float         # S(Θ', X') vs S(Θ, X)
    stability_router_only: float    # S(Θ', X ) vs S(Θ, X)
    stability_drift_only: float     # S(Θ,  X') vs S(Θ, X)
    shift_actual: float             # 1 - stability_actual
    router_contribution: float      # Shapley share of shift_actual caused by the router weights
    drift_contribution: float       # ... caused by the inputs drifting
    router_share: float | None      # router_contribution / shift_actual (None when nothing shifted)
    drift_share: float | None
    trace_agreement_base: float     # recomputed S(Θ, X)  == the base trace's selection (sanity, ~1.0)
    trace_agreement_new: float      # recomputed S(Θ', X') == the new trace's selection (sanity, ~1.0)


@dataclass
class AttributionResult:
    layers: list[LayerAttribution]
    stability_actual: float         # pooled over (token, layer) pairs
    stability_router_only: float
    stability_drift_only: float
    shift_actual: float
    router_contribution: float
    drift_contribution: float
    router_share: float | None
    drift_share: float | None
    num_tokens: int
    decomposition: str = "shapley-2"
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def per_layer(self, metric: str) -> list:
        return [getattr(l, metric) for l in self.layers]


def _shares(shift: float, router: float, drift: float) -> tuple[float | None, float | None]:
    return (None, None) if shift <= 0 else (router / shift, drift / shift)


def _as_state(routers: MoEModel | RouterState) -> RouterState:
    return full_router_state(routers) if isinstance(routers, MoEModel) else routers


def routing_shift_attribution(moe: MoEModel, base_routers: MoEModel | RouterState, new_routers: MoEModel | RouterState,
                              base_trace: RoutingTrace, new_trace: RoutingTrace,
                              mask: torch.Tensor | None = None) -> AttributionResult:
    """Router-vs-drift attribution of the selection shift between two traces of the same tokens.

    moe:          any MoEModel of the architecture (its router MODULES are called; its weights are not used
                  unless a state lacks an entry, e.g. a buffer missing from router_state()).
    base_routers: Θ, e.g. `moe.router_state()` taken before unlearning (or the base MoEModel itself).
    new_routers:  Θ', the unlearned model's routers (or the unlearned MoEModel).
    base_trace / new_trace: traces with keep_inputs=True of the base / unlearned model on the same tokens.
    mask:         (N,) bool, restrict to some tokens (e.g. answer tokens of the retain set).
    """
    check_same_tokens(base_trace, new_trace)
    if base_trace.inputs is None or new_trace.inputs is None:
        raise ValueError("attribution needs router inputs: trace both models with keep_inputs=True")
    if mask is not None:
        base_trace, new_trace = base_trace.subset(mask), new_trace.subset(mask)
    if base_trace.num_tokens == 0:
        raise ValueError("no tokens to attribute (empty trace or empty mask)")
    theta, theta_new = _as_state(base_routers), _as_state(new_routers)
    rows = []
    for l, layer in enumerate(moe.layers):
        p, p_new = layer_router_params(layer, theta), layer_router_params(layer, theta_new)
        X, X_new = base_trace.inputs[l], new_trace.inputs[l]                      # (N, d) each
        E = layer.num_experts
        base = select_with(layer, p, X)                                           # (N, k) S(Θ, X)
        sel = {"actual": select_with(layer, p_new, X_new), "router_only": select_with(layer, p_new, X),
               "drift_only": select_with(layer, p, X_new)}
        stab = {name: set_agreement(base, s, E)["same"].float().mean().item() for name, s in sel.items()}
        shifts = {name: 1.0 - v for name, v in stab.items()}
        router, drift = shapley_split(shifts["actual"], shifts["router_only"], shifts["drift_only"])
        rows.append(LayerAttribution(
            layer=layer.index, num_tokens=base_trace.num_tokens, stability_actual=stab["actual"],
            stability_router_only=stab["router_only"], stability_drift_only=stab["drift_only"],
            shift_actual=shifts["actual"], router_contribution=router, drift_contribution=drift,
            router_share=_shares(shifts["actual"], router, drift)[0],
            drift_share=_shares(shifts["actual"], router, drift)[1],
            trace_agreement_base=set_agreement(base, base_trace.selected[l], E)["same"].float().mean().item(),
            trace_agreement_new=set_agreement(sel["actual"], new_trace.selected[l], E)["same"].float().mean().item()))
    mean = lambda name: sum(getattr(r, name) for r in rows) / len(rows)
    shift, router, drift = mean("shift_actual"), mean("router_contribution"), mean("drift_contribution")
    return AttributionResult(layers=rows, stability_actual=mean("stability_actual"),
                             stability_router_only=mean("stability_router_only"),
                             stability_drift_only=mean("stability_drift_only"), shift_actual=shift,
                             router_contribution=router, drift_contribution=drift,
                             router_share=_shares(shift, router, drift)[0], drift_share=_shares(shift, router, drift)[1],
                             num_tokens=base_trace.num_tokens)


def attribute_models(base: MoEModel, new: MoEModel, batches, mask_answers: bool = False) -> AttributionResult:
    """Trace both models on `batches` (texts, a batch or batches) with router inputs, then attribute.

    `mask_answers` restricts to answer tokens (needs labels in the batches).
    """
    if not isinstance(batches, (dict, list, tuple, str)):
        batches = list(batches)                                   # a generator would be consumed by the first trace
    tb, tn = base.trace(batches, keep_inputs=True), new.trace(batches, keep_inputs=True)
    mask = tb.answer_mask if mask_answers else None
    if mask_answers and mask is None:
        raise ValueError("mask_answers=True needs batches with labels")
    return routing_shift_attribution(base, base, new, tb, tn, mask)

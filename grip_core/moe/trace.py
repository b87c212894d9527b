"""RoutingTrace: which experts each real token reached, per MoE layer.

Hook points have predictable names: one forward hook per router, keyed by the
router's module path, removed in a `finally` even when the forward raises.
Selection is read from what the router RETURNED (its indices), never recomputed
from logits, so grouped top-k, selection-only biases and sigmoid routers are exact.

Footgun: routers see the flattened (B*T, d) hidden states INCLUDING padding; the
trace drops pad rows with the attention mask, so token n of the trace is the n-th
real token in row-major (sequence, position) order.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedRouterError
from .layers import MoELayer


@dataclass
class RoutingTrace:
    """Routing of N real tokens through L MoE layers (all tensors on CPU)."""

    layer_indices: list[int]                   # decoder index of each MoE layer, len L
    selected: list[torch.Tensor]               # L x (N, k) long: experts as the router chose them
    logits: list[torch.Tensor]                 # L x (N, E) float32: router logits (pre-bias-for-selection)
    token_ids: torch.Tensor                    # (N,) long
    sequence_index: torch.Tensor               # (N,) long: which text/row the token came from
    position: torch.Tensor                     # (N,) long: position inside its row
    num_experts: list[int]                     # E per layer
    inputs: list[torch.Tensor] | None = None   # L x (N, d): router inputs, if keep_inputs
    answer_mask: torch.Tensor | None = None    # (N,) bool: labels != -100, if labels were given
    meta: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)

    @property
    def top_k(self) -> int:
        return int(self.selected[0].shape[1])

    def subset(self, mask: torch.Tensor) -> "RoutingTrace":
        """The trace restricted to tokens where `mask` (N,) bool is True."""
        pick = lambda xs: None if xs is None else [x[mask] for x in xs]
        return RoutingTrace(self.layer_indices, pick(self.selected), pick(self.logits), self.token_ids[mask],
                            self.sequence_index[mask], self.position[mask], self.num_experts,
                            pick(self.inputs), None if self.answer_mask is None else self.answer_mask[mask],
                            dict(self.meta))

    def answers_only(self) -> "RoutingTrace":
        if self.answer_mask is None:
            raise ValueError("this trace was made without labels, so it has no answer mask")
        return self.subset(self.answer_mask)

    def selection_mask(self, layer: int) -> torch.Tensor:
        """(N, E) bool: token n selected expert e at MoE layer `layer` (position in the trace)."""
        mask = torch.zeros(self.num_tokens, self.num_experts[layer], dtype=torch.bool)
        return mask.scatter_(1, self.selected[layer], True)

    def expert_load(self, layer: int) -> torch.Tensor:
        """(E,) fraction of routing slots that went to each expert."""
        counts = torch.bincount(self.selected[layer].flatten(), minlength=self.num_experts[layer]).float()
        return counts / counts.sum().clamp_min(1.0)

    def to_state(self) -> dict:
        """Plain tensors and lists (torch.save-able) for the run store."""
        return {k: getattr(self, k) for k in ("layer_indices", "selected", "logits", "token_ids", "sequence_index",
                                             "position", "num_experts", "inputs", "answer_mask", "meta")}

    @classmethod
    def from_state(cls, state: dict) -> "RoutingTrace":
        return cls(**state)

    @staticmethod
    def concat(traces: list["RoutingTrace"]) -> "RoutingTrace":
        """Join traces of consecutive batches (sequence indices are offset)."""
        first = traces[0]
        offsets, total = [], 0
        for t in traces:
            offsets.append(total)
            total += int(t.meta.get("num_sequences", int(t.sequence_index.max()) + 1 if t.num_tokens else 0))
        cat_layers = lambda name: None if getattr(first, name) is None else [
            torch.cat([getattr(t, name)[l] for t in traces]) for l in range(first.num_layers)]
        return RoutingTrace(
            first.layer_indices, cat_layers("selected"), cat_layers("logits"),
            torch.cat([t.token_ids for t in traces]),
            torch.cat([t.sequence_index + o for t, o in zip(traces, offsets)]),
            torch.cat([t.position for t in traces]), first.num_experts, cat_layers("inputs"),
            None if first.answer_mask is None else torch.cat([t.answer_mask for t in traces]),
            {**first.meta, "num_sequences": total})


def parse_router_output(layer: MoELayer, output, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (num_rows, E), selected (num_rows, k)) from one router call's return value."""
    fam = layer.family
    if not isinstance(output, (tuple, list)):
        raise UnsupportedRouterError(fam.name, layer.router_path, f"router returned {type(output).__name__}, expected a tuple")
    if fam.output == "logits_weights_indices" and len(output) == 3:
        logits, _, selected = output
    elif fam.output == "scores_logits" and len(output) == 2:
        scores, logits = output  # scores: E-wide, exactly 0 where not selected
        selected = torch.topk(scores.reshape(num_rows, -1).float(), layer.top_k, dim=-1).indices
    else:
        raise UnsupportedRouterError(fam.name, layer.router_path,
                                     f"expected output '{fam.output}', got a tuple of {len(output)}")
    logits, selected = logits.reshape(num_rows, -1), selected.reshape(num_rows, -1)
    if selected.dtype not in (torch.int64, torch.int32) or logits.shape[1] != layer.num_experts \
            or selected.shape[1] != layer.top_k:
        raise UnsupportedRouterError(fam.name, layer.router_path,
                                     f"unexpected shapes: logits {tuple(logits.shape)}, indices {tuple(selected.shape)} "
                                     f"{selected.dtype} for E={layer.num_experts}, k={layer.top_k}")
    return logits, selected


@contextmanager
def router_hooks(layers: list[MoELayer], callback):
    """Call `callback(position, layer, router_input (rows, d), output)` on every router call.

    Hooks are keyed by MoE layer position and always removed on exit.
    """
    handles = []
    try:
        for pos, layer in enumerate(layers):
            def hook(module, args, output, pos=pos, layer=layer):
                x = args[0] if args else None
                callback(pos, layer, x.reshape(-1, layer.hidden_size), output)
            handles.append(layer.router.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def trace_batch(model, layers: list[MoELayer], batch: dict, keep_inputs: bool = False) -> RoutingTrace:
    """Run one batch and collect the routing of its real tokens."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else mask
    real = mask.reshape(-1).bool().cpu()                   # (B*T,)
    num_rows = real.shape[0]
    selected: list = [None] * len(layers)
    logits: list = [None] * len(layers)
    inputs: list = [None] * len(layers)

    def collect(pos, layer, x, output):
        if x.shape[0] != num_rows:
            raise UnsupportedRouterError(layer.family.name, layer.router_path,
                                         f"router saw {x.shape[0]} rows for {num_rows} tokens")
        lg, sel = parse_router_output(layer, output, num_rows)
        logits[pos] = lg.detach().float().cpu()[real]
        selected[pos] = sel.detach().long().cpu()[real]
        if keep_inputs:
            inputs[pos] = x.detach().float().cpu()[real]

    was_training = model.training
    model.eval()
    try:
        with router_hooks(layers, collect):
            model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device))
    finally:
        model.train(was_training)
    missing = [layers[i].router_path for i, s in enumerate(selected) if s is None]
    if missing:
        raise UnsupportedRouterError(layers[0].family.name, missing[0], "router was never called during the forward pass")
    B, T = input_ids.shape
    seq = torch.arange(B).repeat_interleave(T)[real]
    pos = torch.arange(T).repeat(B)[real]
    labels = batch.get("labels")
    answer = None if labels is None else (labels.reshape(-1).cpu() != -100)[real]
    return RoutingTrace([l.index for l in layers], selected, logits, input_ids.reshape(-1).cpu()[real], seq, pos,
                        [l.num_experts for l in layers], inputs if keep_inputs else None, answer,
                        {"num_sequences": B})

"""MoEModel: a transformers MoE causal LM plus what GRIP Studio knows about it."""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layers import MoELayer, find_moe_layers
from .trace import RoutingTrace, trace_batch


class MoEModel:
    """Wraps an already-built model; finds its MoE layers once, on construction.

    Raises NotAnMoEModelError (naming the class) when there is no MoE block.
    """

    def __init__(self, model: nn.Module, tokenizer=None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.layers: list[MoELayer] = find_moe_layers(model)
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.load_plan = None     # grip_core.moe.memory.LoadPlan when made by load_model: device, dtype, memory

    # ---- description -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.layers[0].family.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def load_kwargs(self) -> dict:
        """load_model keyword arguments that load this model the same way again (e.g. in a worker process)."""
        if self.load_plan is not None:
            return {"device": self.load_plan.device, "dtype": self.load_plan.dtype, "device_map": self.load_plan.device_map}
        p = next(self.model.parameters())
        return {"device": str(p.device), "dtype": str(p.dtype).replace("torch.", "")}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def describe(self) -> dict:
        """Architecture summary: family, MoE layers, E, k, router type, shared experts, size."""
        return {"name": str(self.name), "class": type(self.model).__name__, "family": self.family,
                "num_parameters": self.num_parameters(), "num_moe_layers": len(self.layers),
                "num_decoder_layers": getattr(getattr(self.model, "config", None), "num_hidden_layers", None),
                "layers": [l.describe() for l in self.layers]}

    def router_state(self) -> dict[str, torch.Tensor]:
        """A copy of every router weight (and bias) keyed by parameter path: the restoration attack's input."""
        state = {}
        for l in self.layers:
            state[f"{l.router_path}.{l.family.weight_attr}"] = l.router_weight.detach().clone()
            if l.router_bias is not None:
                prefix = l.family.weight_attr.rsplit(".", 1)[0] + "." if "." in l.family.weight_attr else ""
                state[f"{l.router_path}.{prefix}bias"] = l.router_bias.detach().clone()
        return state

    # ---- tracing -----------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], max_length: int = 128) -> dict:
        if self.tokenizer is None:
            raise ValueError("this MoEModel has no tokenizer: pass token batches, not texts")
        tok = self.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "right"
        from ..data.encode import clip_text   # cut by characters first: a 10 MB text costs what a short one does

        return dict(tok([clip_text(t, max_length) for t in texts], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length))

    def trace(self, texts_or_batch, keep_inputs: bool = False, batch_size: int = 32,
              max_length: int = 128) -> RoutingTrace:
        """Routing of every real token: `texts` (list of str), one batch dict, or an iterable of batches.

        Runs under no_grad in eval mode, `batch_size` texts at a time (bounded memory);
        the model's train/eval mode is restored afterwards.
        """
        if isinstance(texts_or_batch, str):
            texts_or_batch = [texts_or_batch]
        if isinstance(texts_or_batch, dict):
            batches: Iterable[dict] = [texts_or_batch]
        elif isinstance(texts_or_batch, Sequence) and texts_or_batch and isinstance(texts_or_batch[0], str):
            batches = (self.encode_texts(texts_or_batch[i:i + batch_size], max_length)
                       for i in range(0, len(texts_or_batch), batch_size))
        else:
            batches = texts_or_batch
        traces = [trace_batch(self.model, self.layers, b, keep_inputs) for b in batches]
        if not traces:
            raise ValueError("nothing to trace: no texts or batches were given")
        return traces[0] if len(traces) == 1 else RoutingTrace.concat(traces)

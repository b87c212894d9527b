"""GRIPCallback: GRIP inside a Hugging Face `Trainer`, through the one idiom `grip.wrap(optimizer)`.

    trainer.add_callback(GRIPCallback(grip, probe_batch=held_out_retain_batch))

How it attaches: at `on_train_begin` (the Trainer has built and `accelerate`-prepared its
optimizer by then) it calls `grip.wrap` on the innermost torch optimizer. The projection
therefore runs inside `optimizer.step()`, i.e. once per REAL optimizer step: gradient
accumulation, grad clipping (before step) and schedulers (after) need nothing special, and
a step that fp16's GradScaler skips is not projected either.

What it logs, every logging step, through the Trainer's own reporting (`report_to`):
    grip/retain_stability    share of probe tokens whose top-k set equals the base model's
    grip/removed_layer{i}    ‖ΔΘ − P(ΔΘ)‖/‖ΔΘ‖ of decoder layer i's router, mean over the
                             optimizer steps since the previous log (0 = GRIP changed nothing)

Not supported (refused with a ValueError at train start): DeepSpeed (any ZeRO stage: the
engine steps inside `backward` from flat fp32 partitions and copies them over the module
weights, so a hook around `optimizer.step()` would see no router change) and FSDP (router
rows sharded across ranks; the projection and the margins need the whole E x d matrix).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..metrics import compare_traces

_DEEPSPEED = ("GRIPCallback does not support DeepSpeed: the DeepSpeed engine applies the update inside "
              "backward() from flattened fp32 partitions (ZeRO-3 also shards the router weights), so a hook on "
              "optimizer.step() never sees the router change. Train without DeepSpeed, or gather the full "
              "E x d router weights on every rank and call grip.before_step()/grip.after_step() around the "
              "engine's step yourself.")
_FSDP = ("GRIPCallback does not support FSDP: router weights are sharded (or flattened) across ranks, and the "
         "projection and the margin constraint need the full E x d router matrix on one device. Keep the routers "
         "out of FSDP's sharding (e.g. ignored_modules) or train without FSDP.")


def innermost_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's wrappers.

    Why: `AcceleratedOptimizer` subclasses torch.optim.Optimizer but never runs its own step
    hooks (it forwards step() to `.optimizer`); hooks on the wrapper would never fire, hooks on
    both levels would fire twice. The innermost optimizer is the one whose step moves weights.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def check_trainer_supported(args, grip, model=None) -> None:
    """Raise ValueError (with the reason) where GRIP cannot constrain this Trainer's router updates."""
    dist = str(getattr(getattr(args, "distributed_state", None), "distributed_type", "")).upper()
    env = lambda name: os.environ.get(name, "false").lower() in ("1", "true")
    if getattr(args, "deepspeed", None) or "DEEPSPEED" in dist or env("ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(_DEEPSPEED)
    if getattr(args, "fsdp", None) or "FSDP" in dist or env("ACCELERATE_USE_FSDP"):
        raise ValueError(_FSDP)
    if grip.config.input_anchor:
        raise ValueError("GRIPCallback cannot add GRIPConfig.input_anchor's loss term (the Trainer computes the loss): "
                         "set input_anchor=0, or add grip_core.grip.anchor.RouterInputAnchor's loss in compute_loss")
    for layer in grip.moe.layers:
        W = layer.router_weight
        dtensor = "DTensor" in (type(W).__name__, type(W.data).__name__)          # FSDP2 shards into DTensors
        if W.numel() == 0 or tuple(W.shape) != (layer.num_experts, layer.hidden_size) or hasattr(W, "ds_id") or dtensor:
            raise ValueError(f"GRIPCallback: router weight of layer {layer.index} is sharded or flattened "
                             f"(shape {tuple(W.shape)}, expected {(layer.num_experts, layer.hidden_size)}). "
                             + _FSDP)
    if model is not None and not any(p is grip.moe.layers[0].router_weight for p in model.parameters()):
        raise ValueError("GRIPCallback: GRIP was fit on a different model object than the one the Trainer trains "
                         "(a copy?); fit it on the Trainer's model, or its projection would write into the other one")


class GRIPCallback(TrainerCallback):
    """Constrain router updates of any Trainer with a fitted `GRIP`, and report what it did.

    `probe_batch`: a batch (or list of batches) of RETAINED inputs whose routing stability is
    logged; pass held-out retain data for an honest number. Default: the retain batches GRIP
    stored at fit time (seen data, so stability there is optimistic).
    """

    def __init__(self, grip, probe_batch: dict | list[dict] | None = None):
        self.grip = grip
        self.probe = probe_batch if probe_batch is not None else (grip.state.probe_batches or None)
        self.optimizer: torch.optim.Optimizer | None = None   # the torch optimizer GRIP is hooked into
        self._base = None                                      # RoutingTrace of the probe before training
        self._seen = 0                                         # len(grip.history) at the previous log
        self._logged_step = -1

    # ---- Trainer events --------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        check_trainer_supported(args, self.grip, model)
        if optimizer is None:
            raise ValueError("GRIPCallback: the Trainer passed no optimizer to on_train_begin")
        self.optimizer = self.grip.wrap(innermost_optimizer(optimizer))   # idempotent if already wrapped
        self._seen = len(self.grip.history)
        if self._base is None and self.probe is not None:
            self._base = self.grip.moe.trace(self.probe)
        self._run_before_reporters(sys._getframe(1).f_locals.get("self"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add grip/ metrics to the training logs, once per logging step (not to eval/final logs)."""
        if logs is None or "loss" not in logs or state.global_step == self._logged_step:
            return
        metrics = self.metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)          # the Trainer copied `logs` there before on_log
        self._logged_step = state.global_step

    # ---- metrics -----------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """grip/removed_layer{i} (mean since the previous call) and grip/retain_stability (now)."""
        new, self._seen = self.grip.history[self._seen:], len(self.grip.history)
        out = {}
        if new:
            for pos, layer in enumerate(self.grip.moe.layers):
                out[f"grip/removed_layer{layer.index}"] = sum(s.removed[pos] for s in new) / len(new)
        if self.probe is not None:
            out["grip/retain_stability"] = self.retain_stability()
        return out

    @torch.no_grad()
    def retain_stability(self) -> float:
        """Share of probe tokens whose top-k expert set is unchanged since the first train() (layers pooled)."""
        if self.probe is None:
            raise ValueError("GRIPCallback: no probe (GRIP stored none at fit time): pass probe_batch=")
        if self._base is None:
            self._base = self.grip.moe.trace(self.probe)
        return compare_traces(self._base, self.grip.moe.trace(self.probe)).stability

    def _run_before_reporters(self, handler) -> None:
        """Move this callback to the front of the Trainer's callback list.

        Why: the Trainer fills `logs` once and calls callbacks in list order, with the `report_to`
        integrations (TensorBoard, W&B, ...) BEFORE user callbacks; metrics added to `logs` by a
        later callback never reach them. Callbacks are not given their handler, so it is read from
        the caller's frame (CallbackHandler.call_event). Moving from index k to 0 keeps every later
        callback at its index, so the ongoing on_train_begin loop is undisturbed.
        """
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        else:
            warnings.warn("GRIPCallback could not reorder the Trainer's callbacks: report_to integrations "
                          "listed before it will not receive grip/ metrics (insert it first: "
                          "trainer.callback_handler.callbacks.insert(0, callback))", stacklevel=2)

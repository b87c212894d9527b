"""Relearning: a few fine-tuning steps on a little data; do the forgotten answers come back?

Three variants (one attack, three row names), each run on a deep copy of the unlearned model (and
of the base model), so neither model is touched:

- relearn_router  `relearn_steps` AdamW steps on the routers only, on the relearning slice of the
                  forget set (`relearn_fraction`, default 10 %). Knowledge that only hid behind
                  the router comes back from the router alone.
- relearn_full    the same steps on every parameter.
- relearn_related every parameter, on facts of the same kind that were never in the forget set
                  (the scenario's holdout facts: in the demo's "domain" scenario, chemistry facts
                  of entities never trained on). Recovery here means the forgetting was shallow
                  enough that touching nearby knowledge undoes it.

Recovery is always measured on the REST of the forget set (the attacks' evaluation set), never on
the examples trained on. The loss is the plain answer NLL (labels = answer tokens). Batches are
drawn by `random.Random(seed)`, torch is seeded: the same seed gives the same numbers on CPU.
0 steps changes nothing, so it recovers 0.

Footgun: a deep copy costs one model's memory per variant and model (one at a time).
"""
from __future__ import annotations

import copy
import random

import torch

from ..data import encode_qa
from ..moe import MoEModel
from .base import Attack, AttackContext, register_attack


def _router_params(moe: MoEModel) -> list[torch.nn.Parameter]:
    return [p for layer in moe.layers for p in layer.router.parameters()]


def relearned(moe: MoEModel, examples: list, *, routers_only: bool, steps: int, lr: float, batch_size: int,
              max_length: int, seed: int, tokenizer=None) -> MoEModel:
    """A deep copy of `moe` after `steps` AdamW steps of answer-NLL on `examples` (routers only, or all)."""
    tok = tokenizer if tokenizer is not None else moe.tokenizer
    work = MoEModel(copy.deepcopy(moe.model), tok, name=f"{moe.name}+relearned")
    if steps == 0 or not examples:
        return work
    model = work.model
    params = _router_params(work) if routers_only else list(model.parameters())
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order: list[int] = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        batch = encode_qa(tok, [examples[i] for i in order[:batch_size]], max_length)
        order = order[batch_size:]
        batch = {k: v.to(work.device) for k, v in batch.items()}
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    model.eval().requires_grad_(False)
    return work


_VARIANTS = {  # name -> (routers only, which data, setting text)
    "relearn_router": (True, "relearn", "routers, {steps} steps on {pct} of forget"),
    "relearn_full": (False, "relearn", "all weights, {steps} steps on {pct} of forget"),
    "relearn_related": (False, "related", "all weights, {steps} steps on {n} related facts never forgotten"),
}


@register_attack("relearn_router", "relearn_full", "relearn_related")
class Relearning(Attack):
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        cfg, rows = ctx.config, []
        for name in names:
            routers_only, which, text = _VARIANTS[name]
            data = ctx.relearn_set if which == "relearn" else ctx.related_set
            if not data:
                continue                   # no related facts in this data (custom files without holdout)
            kw = dict(routers_only=routers_only, steps=cfg.relearn_steps, batch_size=cfg.relearn_batch_size,
                      lr=cfg.relearn_lr_router if routers_only else cfg.relearn_lr_full,
                      max_length=cfg.max_length, seed=cfg.seed, tokenizer=ctx.tokenizer)
            attacked_model = relearned(ctx.unlearned, data, **kw)
            attacked = ctx.probe(attacked_model)
            shift = ctx.routing_shift(attacked_model)
            del attacked_model
            base = None
            if cfg.on_base:
                base_model = relearned(ctx.base, data, **kw)
                base = ctx.probe(base_model)
                del base_model
            setting = text.format(steps=cfg.relearn_steps, pct=f"{100 * cfg.relearn_fraction:.0f} %", n=len(data))
            rows.append(ctx.row(name, setting, attacked, base, shift))
        return rows

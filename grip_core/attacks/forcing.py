"""Expert forcing (the GRIP paper's own check): route every forget token to experts it did NOT select.

At inference, a forward hook on every router replaces the router's selection with the top-n
experts that are NOT among its own top-k, ranked by the family's selection score (softmax or
sigmoid of the logits, plus the selection-only bias where the family has one, e.g. DeepSeek-V3's
`e_score_correction_bias`), n = the model's top-k by default (the paper's setting). If a method
only moved the forget tokens away from the experts that hold the fact, forcing them elsewhere
(often back) brings the answer back; if the experts themselves forgot, it does not.

Mixing weights follow the family's own rule, read from what the router returned rather than from a
per-family table: when every row of the router's weights sums to the same constant c (normalised
top-k, e.g. Mixtral, GPT-OSS, or DeepSeek's scaled normalisation) the forced experts' scores are
normalised to sum to c; otherwise (OLMoE, Qwen3 without norm_topk_prob) each forced expert gets
its score times the row's ratio weights.sum / score[selected].sum (1 for plain softmax
probabilities). Llama4's E-wide (scores, logits) output is rebuilt E-wide.

Footguns:
- The hook replaces the router's RETURN value; the MoE block then sends the tokens to the forced
  experts. Hooks are removed in a `finally`.
- Every token of the probe is forced (question, and the answer tokens generated or teacher-forced):
  the whole forget prompt is a forget token.
- Grouped top-k (DeepSeek-V3): forced experts are chosen over ALL experts, not within the token's
  groups; PhiMoE's sparsemixer weights are approximated by the softmax rule above.
- n must leave enough unselected experts: n <= E - k.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..moe import MoEModel
from ..moe.errors import ConfigError
from ..moe.layers import MoELayer
from ..moe.trace import parse_router_output
from .base import Attack, AttackContext, register_attack


def _scores(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    """(rows, E) float32 mixing scores by the family's score function (sigmoid, else softmax)."""
    logits = logits.float()
    return logits.sigmoid() if layer.score_fn == "sigmoid" else logits.softmax(-1)


def forced_indices(layer: MoELayer, score: torch.Tensor, selected: torch.Tensor, n: int) -> torch.Tensor:
    """(rows, n) long: the top-n experts by selection score (score + selection bias) outside `selected` (rows, k)."""
    rank = score.clone() if layer.selection_bias is None else score + layer.selection_bias.float().to(score.device)
    return rank.scatter_(1, selected.long(), float("-inf")).topk(n, dim=-1).indices


def forced_selection(layer: MoELayer, logits: torch.Tensor, selected: torch.Tensor, weights: torch.Tensor,
                     n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(forced indices (rows, n) long, forced weights (rows, n) float32) for one router call.

    logits (rows, E), selected (rows, k) the router's own choice, weights (rows, k) its mixing weights.
    """
    score = _scores(layer, logits)                                                   # (rows, E)
    forced = forced_indices(layer, score, selected, n)                               # (rows, n)
    forced_score = score.gather(1, forced)                                           # (rows, n)
    w_sum = weights.float().sum(-1)                                                  # (rows,)
    if w_sum.numel() and torch.allclose(w_sum, w_sum[0].expand_as(w_sum), rtol=1e-4, atol=1e-5):
        new = forced_score / forced_score.sum(-1, keepdim=True).clamp_min(1e-30) * w_sum[0]   # normalised family
    else:
        ratio = w_sum / score.gather(1, selected.long()).sum(-1).clamp_min(1e-30)     # (rows,)
        new = forced_score * ratio[:, None]
    return forced, new


@torch.no_grad()
def forced_shift(ctx: AttackContext, n: int | None) -> float:
    """Routing shift of forcing vs the unlearned model on the evaluation tokens.

    Measured (not assumed 1): forcing at one layer changes the router inputs of the next, so a
    forced set may meet what the unforced model chose there. The trace cannot read a forced
    selection of n != k slots, so the hook records it.
    """
    from ..data import encode_qa

    model, bs = ctx.unlearned.model, ctx.config.batch_size
    per_layer: list[list[torch.Tensor]] = [[] for _ in ctx.unlearned.layers]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(ctx.eval_set), bs):
            batch = encode_qa(ctx.tokenizer, ctx.eval_set[i:i + bs], ctx.config.max_length)
            real = batch["attention_mask"].reshape(-1).bool()
            record: list = []
            with forced_experts(ctx.unlearned, n, record):
                model(input_ids=batch["input_ids"].to(ctx.unlearned.device),
                      attention_mask=batch["attention_mask"].to(ctx.unlearned.device), use_cache=False)
            for pos, forced in record:
                per_layer[pos].append(forced[real])
    finally:
        model.train(was_training)
    before = ctx.unlearned_trace
    kept = slots = 0.0
    for pos, chunks in enumerate(per_layer):
        forced = torch.cat(chunks)                                                  # (N, n)
        a = before.selection_mask(pos)                                              # (N, E)
        b = torch.zeros_like(a).scatter_(1, forced, True)
        kept += float((a & b).sum())
        slots += float(a.sum())
    return 1.0 - kept / slots if slots else 0.0


@contextmanager
def forced_experts(moe: MoEModel, n: int | None = None, record: list | None = None):
    """Within the block every router of `moe` sends each token to the top-n experts it did not select.

    `record`: if given, (MoE layer position, forced indices (rows, n)) is appended per router call.
    """
    handles = []
    try:
        for pos, layer in enumerate(moe.layers):
            k = n or layer.top_k
            if k > layer.num_experts - layer.top_k:
                raise ConfigError(f"expert forcing: n={k} but MoE layer {layer.index} has only "
                                  f"{layer.num_experts - layer.top_k} experts outside its top-{layer.top_k}")

            def hook(module, args, output, layer=layer, k=k, pos=pos):
                rows = args[0].reshape(-1, layer.hidden_size).shape[0]
                logits, selected = parse_router_output(layer, output, rows)
                if layer.family.output == "scores_logits":            # Llama4: E-wide scores, 0 where unselected
                    scores, raw_logits = output
                    dense = scores.reshape(rows, -1)
                    forced, w = forced_selection(layer, logits, selected, dense.gather(1, selected), k)
                    if record is not None:
                        record.append((pos, forced.cpu()))
                    new = torch.zeros_like(dense).scatter_(1, forced, w.to(dense.dtype))
                    return new.reshape(scores.shape), raw_logits
                raw_logits, weights, indices = output
                wide = weights.reshape(rows, -1).shape[1] == layer.num_experts and layer.num_experts != layer.top_k
                w_sel = weights.reshape(rows, -1).gather(1, selected) if wide else weights.reshape(rows, -1)
                forced, w = forced_selection(layer, logits, selected, w_sel, k)
                if record is not None:
                    record.append((pos, forced.cpu()))
                if wide:
                    new_w = torch.zeros_like(weights.reshape(rows, -1)).scatter_(1, forced, w.to(weights.dtype))
                    return raw_logits, new_w.reshape(weights.shape), forced.to(indices.dtype)
                return raw_logits, w.to(weights.dtype), forced.to(indices.dtype)
            handles.append(layer.router.register_forward_hook(hook))
        yield moe
    finally:
        for h in handles:
            h.remove()


@register_attack("expert_forcing")
class ExpertForcing(Attack):
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        n = ctx.config.force_n or None
        during_u = lambda: forced_experts(ctx.unlearned, n)
        attacked = ctx.probe(ctx.unlearned, during=during_u)
        shift = forced_shift(ctx, n)
        base = ctx.probe(ctx.base, during=lambda: forced_experts(ctx.base, n)) if ctx.config.on_base else None
        k = ctx.unlearned.layers[0].top_k
        return [ctx.row("expert_forcing", f"top-{n or k} unselected experts", attacked, base, shift)]

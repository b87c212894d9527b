"""Paraphrase probes: the forgotten questions asked in other words.

Unlearning trained on one wording can miss another. The evaluation examples that have a
paraphrased question (`QAExample.paraphrase`; the demo world has one per fact) are asked again
with it; exact match and answer probability are reported beside the plain ones (unlearned_em is
the plain wording, attacked_em the paraphrase, base_em the base model on the paraphrase).
routing_shift is None: the tokens differ, so slots cannot be compared one by one.
"""
from __future__ import annotations

from ..metrics.probes import paraphrased
from .base import Attack, AttackContext, register_attack


@register_attack("paraphrase")
class Paraphrase(Attack):
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        para = paraphrased(ctx.eval_set)
        if not para:
            return []                      # no paraphrases in this data
        attacked = ctx.probe(ctx.unlearned, para)
        base = ctx.probe(ctx.base, para) if ctx.config.on_base else None
        return [ctx.row("paraphrase", "reworded questions", attacked, base, None, n=len(para))]

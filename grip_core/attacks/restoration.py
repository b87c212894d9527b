"""Router restoration (the project's first attack, grip_core/metrics/attacks.py): put the base model's
routers back into the unlearned model and ask again.

If the answers come back, the method hid the knowledge behind the router. Every router tensor is
swapped (weights, logit biases and selection-only bias buffers: `full_router_state`), in place and
undone afterwards. On the base model the attack is the identity, so its base_em is the plain one.
"""
from __future__ import annotations

from ..metrics.attacks import swapped_routers
from ..metrics.attribution import full_router_state
from .base import Attack, AttackContext, register_attack


@register_attack("restoration")
class Restoration(Attack):
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        state = full_router_state(ctx.base)
        during = lambda: swapped_routers(ctx.unlearned, state)
        attacked = ctx.probe(ctx.unlearned, during=during)
        shift = ctx.routing_shift(ctx.unlearned, during=during)
        base = ctx.plain["base"] if ctx.config.on_base else None
        return [ctx.row("restoration", "base routers in the unlearned model", attacked, base, shift)]

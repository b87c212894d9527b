"""The embedded demo: an invented knowledge world and a tiny OLMoE whose experts hold its domains.

`world` generates the facts, `train` is the recipe, `verify` recomputes accuracy, NMI and the
expert-ablation table, `build` is the CLI (`python -m grip_core.demo.build [--quick]`).
"""
from .world import DOMAINS, FORGET_DOMAIN, SCENARIOS, Fact, WorldConfig, generate_world

__all__ = ["DOMAINS", "FORGET_DOMAIN", "SCENARIOS", "Fact", "WorldConfig", "generate_world"]

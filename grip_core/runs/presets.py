"""Named training regimes (scope + learning rates), from what the probes measured (docs/method.md#what-the-probes-found).

A preset is a starting point that the CLI, the dashboard and the study share, so that
"the shortcut regime" means the same numbers everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..scope import ScopeConfig


@dataclass(frozen=True)
class Preset:
    name: str
    scope: ScopeConfig
    method_args: dict
    about: str


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("shortcut", ScopeConfig(kind="moe", lr=3e-4, router_lr_mult=30.0), {},
           "MoE blocks only, experts lr 3e-4, routers x30: the regime where the probes found a selective "
           "router shortcut (restoration recovered 86-97 % of forgotten answers)"),
    Preset("full", ScopeConfig(kind="all", lr=3e-4), {},
           "every parameter at lr 3e-4: forgetting happens in the experts; retained routing drifts "
           "because router INPUTS move"),
    Preset("moe", ScopeConfig(kind="moe", lr=3e-4), {},
           "MoE blocks only, one learning rate"),
    Preset("experts+routers", ScopeConfig(kind="experts+routers", lr=3e-4, router_lr_mult=30.0), {},
           "routed experts and routers (SEUF-like), routers x30"),
    Preset("routers-only", ScopeConfig(kind="routers-only", lr=1e-2), {},
           "only the routers: forgetting can happen only by rerouting"),
)}


DEFAULT_PRESET = "shortcut"   # the regime the CLI and the dashboard start from


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}") from None

"""RunConfig: everything one unlearning job needs, as one typed, JSON-able record."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..grip import GRIPConfig
from ..scope import ScopeConfig


@dataclass
class RunConfig:
    """One unlearning job. The same config and seed give the same numbers on CPU."""

    method: str = "graddiff"                         # a name in grip_core.methods.available_methods()
    method_args: dict = field(default_factory=dict)  # typed by the method's args dataclass
    scope: ScopeConfig = field(default_factory=lambda: ScopeConfig(kind="all", lr=3e-4))
    grip: GRIPConfig = field(default_factory=GRIPConfig)
    model: str = "demo"                              # "demo" or a local checkpoint dir (for the record)
    scenario: str = "domain"                         # demo scenario: "domain" | "entities"; "custom" for files
    steps: int = 60
    batch_size: int = 16                             # forget and retain examples per step
    max_length: int = 64
    seed: int = 0
    eval_every: int = 10                             # log stability / EM every N steps (0 = only at the end)
    eval_examples: int = 64                          # examples per split in the per-step probes
    stop_at_forget_em: float | None = None           # stop early once forget EM (eval subset) falls below
    grip_fit_examples: int = 0                       # retain examples for GRIP.fit (0 = the whole retain split)
    final_eval_examples: int = 0                     # examples per split in the final probes (0 = all)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_weights: bool = False                       # keep the unlearned weights in the run folder (for Diagnose)
    weights_format: str = "delta"                    # "delta": only the tensors that changed, plus the base's name
                                                     # (loads with load_model / Diagnose); "full": a whole checkpoint
    label: str = ""

    def __post_init__(self):
        if isinstance(self.scope, dict):
            self.scope = ScopeConfig(**self.scope)
        if isinstance(self.grip, dict):
            self.grip = GRIPConfig(**self.grip)
        if self.weights_format not in ("delta", "full"):
            raise ValueError(f"weights_format must be 'delta' or 'full' (got {self.weights_format!r})")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(f"steps must be >= 0 and batch_size >= 1 (got {self.steps}, {self.batch_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RunConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def display_name(self) -> str:
        mode = self.grip.mode if self.grip.mode != "off" else "vanilla"
        if self.grip.mode != "off" and getattr(self.grip, "drift_every", 0):
            mode += f"+drift{self.grip.drift_every}"
        return self.label or f"{self.method}-{mode}-{self.scope.kind}-s{self.seed}"

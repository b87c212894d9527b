"""RunConfig: everything one unlearning job needs, as one typed, JSON-able record."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..grip import GRIPConfig
from ..moe.errors import ConfigError
from ..scope import ScopeConfig
from ..typecheck import build, check_fields


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
    final_eval_examples: int = 120                   # examples per split in the final probes (0 = all)
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    save_weights: bool = False                       # keep the unlearned weights in the run folder (for Diagnose)
    weights_format: str = "delta"                    # "delta": only the tensors that changed, plus the base's name
                                                     # (loads with load_model / Diagnose); "full": a whole checkpoint
    label: str = ""
    preset: str = ""                                 # the preset (grip_core.runs.presets) scope and method_args
                                                     # came from, for the record; "" = set by hand
    # custom data (scenario "custom"): {"forget"|"retain"|"holdout": {"path", "sha256", "examples"}}, for the record
    data_files: dict = field(default_factory=dict)

    def __post_init__(self):
        self.scope = build(ScopeConfig, self.scope, "scope")
        self.grip = build(GRIPConfig, self.grip, "grip")
        if not isinstance(self.method_args, dict):
            raise ConfigError(f"method_args must be a JSON object, got {type(self.method_args).__name__}")
        check_fields(self, "RunConfig")
        if self.preset:
            from .presets import PRESETS

            if self.preset not in PRESETS:
                raise ConfigError(f"preset must be one of {sorted(PRESETS)} or empty, got {self.preset!r}")
        if self.weights_format not in ("delta", "full"):
            raise ConfigError(f"weights_format must be 'delta' or 'full' (got {self.weights_format!r})")
        for name, low in (("steps", 0), ("batch_size", 1), ("max_length", 2), ("eval_every", 0),
                          ("eval_examples", 1), ("grip_fit_examples", 0), ("final_eval_examples", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if not math.isfinite(self.scope.lr):
            raise ConfigError(f"scope.lr must be a finite number, got {self.scope.lr}")
        if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or null, got {self.max_grad_norm}")
        if self.stop_at_forget_em is not None and not 0 <= self.stop_at_forget_em <= 1:
            raise ConfigError(f"stop_at_forget_em must be in [0, 1] or null, got {self.stop_at_forget_em}")
        self.check_method()

    def check_method(self) -> None:
        """ConfigError for an unknown method or method argument (before any run folder is made)."""
        from ..methods.base import method_class

        try:
            cls = method_class(self.method)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        args_cls = getattr(cls, "args_cls", None)
        try:
            if args_cls is not None and dataclasses.is_dataclass(args_cls) and "args" not in self.method_args:
                cls(args=build(args_cls, self.method_args, f"method_args of {self.method!r}"))
            else:
                cls(**self.method_args)
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"method_args of {self.method!r}: {exc}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """A RunConfig from a JSON object; ConfigError (one line, naming the field) for anything else."""
        return build(cls, d, "RunConfig")

    def display_name(self) -> str:
        mode = self.grip.mode if self.grip.mode != "off" else "vanilla"
        if self.grip.mode != "off" and getattr(self.grip, "drift_every", 0):
            mode += f"+drift{self.grip.drift_every}"
        return self.label or f"{self.method}-{mode}-{self.scope.kind}-s{self.seed}"

"""GRIPConfig: every knob of the GRIP adapter, typed and validated (docs/method.md#grip).

Defaults follow the paper (absolute threshold 1e-2, margin ε 1e-2, ridge λ 1e-6).
The threshold decides whether GRIP is plastic at all (docs/method.md#threshold-absolute-or-relative): at d ≈ 128 the
absolute threshold acts as a numerical-rank test and freezes most router rows
beyond layer 0, while a relative threshold (99.9 % energy) leaves many free
dimensions. `GRIPState.rank_table(kind, value)` shows that trade-off without a refit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Literal, get_args

from ..moe.errors import ConfigError

Mode = Literal["update", "gradient", "off"]       # GRIPConfig.mode; every one is also a MODES entry of that name
ThresholdKind = Literal["absolute", "relative"]
MarginMethod = Literal["scale", "kaczmarz"]
BasisDtype = Literal["float32", "float16"]
FitSolver = Literal["auto", "float64"]
RidgeForm = Literal["delta", "paper"]


@dataclass
class GRIPConfig:
    """How GRIP fits retained statistics and constrains router updates.

    mode
        the base mode; named modes (MODES below: "drift", ...) are base modes plus other fields.
        "update"   (default) project ΔΘ = Θ_new − Θ_old AFTER optimizer.step(): correct for
                   any optimizer, Adam included (its step is not linear in the gradient).
        "gradient" project the routers' .grad BEFORE optimizer.step(): exact for plain SGD
                   only; margins need the step size, so only constraint 1 is applied. For
                   comparison (docs/method.md#update-or-gradient).
        "off"      never writes anything; still records the same per-step fields (what the
                   update WOULD violate), so vanilla runs log like GRIP runs.
    threshold_kind / eps_null / energy
        absolute: keep singular directions with σ² > eps_null.  relative: keep the fewest
        directions holding `energy` of ‖X_j‖²_F (directions dropped this way are NOT held,
        so selected scores may move: plastic but approximate). With the relative threshold
        the margin rows also bound how far selected experts may fall (softmax / top-k
        families; not the sigmoid + selection-bias rule), so selection still holds on them.
    margin / margin_method / margin_eps
        constraint 2: for retained x_i that did not select j, u_jᵀx_i ≤ max(τ_i − ε, 0) with
        τ_i = min_{e∈S_i} s_e − s_j (zero is always feasible, near ties included).
        "scale": largest α∈[0,1] per row satisfying every margin (one matmul).
        "kaczmarz": randomized Kaczmarz inside the null space (rows ∝ ‖x_i‖², ≤ kaczmarz_iters),
        then re-projection and an α-guard, so the result is feasible even at the cap.
    max_margin_rows
        retained tokens kept per layer for constraint 2 (reservoir sample, `seed`); each row
        constrains the E − k experts the token did not select. Margins hold on these rows only.
    probe_tokens
        retained tokens (whole batches, in order) whose batches and original scores are stored
        for the ridge correction and the drift-aware mode.
    basis_dtype / fit_layers_per_pass (memory at real-model size, benchmarks/bench_real_shapes.py)
        basis_dtype: how U_j is STORED ("float16" halves the state; bases are orthonormal, so
        |entries| <= 1 and float16's 2^-11 relative rounding is the only cost; projections still
        run in float32). fit_layers_per_pass: 0 = every layer's Grams in one pass (L·E·d'²·8
        bytes); n > 0 = n layers per pass over the retain batches (n·E·d'²·8 bytes, L/n passes).
    fit_solver
        how each expert's Gram X_jᵀX_j is decomposed after the streaming pass (grip/fit.py,
        `eig_basis`). The Grams are always accumulated in float64, and both solvers keep the same
        ranks and (up to float32 accuracy) the same spans U_j.
        "auto"    (default) eigh in float32 (about half the float64 time) at d' ≥ 512 where the spectrum
                  CERTIFIES the float64 result: the kept rank is decided by eigenvalues farther than
                  the float32 error bound from the threshold (plus, for an absolute threshold with
                  eigenvalues inside that bound, a float64 check that none of them exceeds eps_null),
                  and the eigen-gap bounds the span's angle to the float64 span by 1e-3 rad. Any
                  expert that fails a check is redone in float64, so the ranks always equal "float64"'s.
                  The stored spectrum is then float32-accurate (±16·2⁻²³·σ²_max), so `rank_table`
                  what-ifs at a threshold that close to an eigenvalue may differ from a float64 refit.
        "float64" eigh of every Gram in float64 (the reference path).
        On CUDA (a model on the GPU) the Grams and the eigh run there.
    drift_every
        0 = off. Every N steps: re-capture the probe's router inputs from the CURRENT model,
        ridge-steer the routers toward the ORIGINAL scores on them, refit the constraints on the
        new inputs with the ORIGINAL selections as reference.
    ridge_lambda / ridge_form / correction_min_cos
        "delta" (default): regularise the change, Δ = (ΘX − Θ̃X̃)X̃ᵀ(X̃X̃ᵀ+λI)⁻¹, which leaves Θ̃
        untouched outside span(X̃). "paper": Θ̃+Δ = ΘXX̃ᵀ(X̃X̃ᵀ+λI)⁻¹, which ZEROES the router
        outside span(X̃) (identical when X̃ spans R^d and is well conditioned). A layer's
        correction is kept only if cos(ΘX, (Θ̃+Δ)X̃) ≥ correction_min_cos.
    input_anchor / input_anchor_layers
        input_anchor = λ ≥ 0 (0 = off): add λ · the mean relative squared drift of the router inputs of the
        retain batch's tokens from the frozen base model's to the method's loss (grip/anchor.py), so the
        blocks below each router keep its retained inputs still. A loss term: the job loop adds it, not
        GRIP.wrap; it costs one no-grad forward of a frozen base copy per step. Needs mode != "off".
        input_anchor_layers: anchor only the last n MoE layers (0 = every MoE layer).
    """

    mode: Mode = "update"
    threshold_kind: ThresholdKind = "absolute"
    eps_null: float = 1e-2
    energy: float = 0.999
    margin: bool = True
    margin_method: MarginMethod = "scale"
    margin_eps: float = 1e-2
    kaczmarz_iters: int = 100
    max_margin_rows: int = 4096
    probe_tokens: int = 4096
    basis_dtype: BasisDtype = "float32"
    fit_layers_per_pass: int = 0
    fit_solver: FitSolver = "auto"
    drift_every: int = 0
    ridge_lambda: float = 1e-6
    ridge_form: RidgeForm = "delta"
    correction_min_cos: float = 0.95
    input_anchor: float = 0.0
    input_anchor_layers: int = 0
    seed: int = 0

    def __post_init__(self):
        from ..typecheck import check_fields

        check_fields(self, "grip")
        for name in ("eps_null", "energy", "margin_eps", "ridge_lambda", "correction_min_cos", "input_anchor"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        for name, kind in (("mode", Mode), ("threshold_kind", ThresholdKind), ("margin_method", MarginMethod),
                           ("ridge_form", RidgeForm), ("basis_dtype", BasisDtype),
                           ("fit_solver", FitSolver)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if self.eps_null < 0:
            raise ConfigError(f"eps_null must be >= 0, got {self.eps_null}")
        if not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"energy must be in (0, 1], got {self.energy}")
        if self.margin_eps < 0:
            raise ConfigError(f"margin_eps must be >= 0, got {self.margin_eps}")
        for name in ("kaczmarz_iters", "max_margin_rows", "probe_tokens", "drift_every", "fit_layers_per_pass",
                     "input_anchor_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ridge_lambda < 0:
            raise ConfigError(f"ridge_lambda must be >= 0, got {self.ridge_lambda}")
        if self.input_anchor < 0:
            raise ConfigError(f"input_anchor must be >= 0, got {self.input_anchor}")
        if self.input_anchor > 0 and self.mode == "off":
            raise ConfigError("input_anchor needs a GRIP mode other than 'off' (a vanilla run adds no loss term)")

    def to_dict(self) -> dict:
        return asdict(self)

    def fit_key(self) -> tuple:
        """The fields that decide what GRIP.fit computes (not how steps are constrained): two configs with
        the same key fit the same GRIPState on the same model and retain batches."""
        return (self.threshold_kind, self.eps_null, self.energy, self.max_margin_rows, self.probe_tokens,
                self.seed, self.basis_dtype, self.fit_layers_per_pass, self.fit_solver)

    @classmethod
    def from_dict(cls, data: dict) -> "GRIPConfig":
        """Unknown keys are ignored (configs saved by newer versions still load); wrong types are ConfigErrors."""
        from ..typecheck import build

        return build(cls, data, "grip", strict=False)


@dataclass(frozen=True)
class GRIPMode:
    """One named GRIP mode: what the CLI (`--grip-mode(s)`), the dashboard and the study call it."""

    description: str                                   # one line, shown in CLI help and the dashboard
    overrides: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))   # GRIPConfig fields it sets


def _mode(description: str, **overrides) -> GRIPMode:
    return GRIPMode(description, MappingProxyType(overrides))


# THE registry of GRIP modes (docs/method.md#grip). Each base `Mode` is an entry of the same name; the others are
# named settings of GRIPConfig on top of one (tests/test_grip_modes.py keeps both in step).
MODES: MappingProxyType = MappingProxyType({
    "off": _mode("vanilla unlearning: GRIP records what it would remove and never writes", mode="off"),
    "update": _mode("project each optimizer step's router update into the retained null space (+ margins)",
                    mode="update"),
    "gradient": _mode("project router gradients before the step (exact for SGD only; no margins)", mode="gradient"),
    "drift": _mode("update mode + every 10 steps re-capture router inputs, ridge-correct and refit",
                   mode="update", drift_every=10),
    "anchor": _mode("update mode + a loss term (λ 1000) holding retained tokens' router inputs at the base's",
                    mode="update", input_anchor=1000.0),
    "update-relative": _mode("update mode with the relative (99.9 % energy) threshold: more plastic, approximate",
                             mode="update", threshold_kind="relative"),
})


def mode_help() -> str:
    """'name: description; ...' for argparse help texts (a '%' is doubled: argparse formats help with %)."""
    return "; ".join(f"{name}: {m.description}" for name, m in MODES.items()).replace("%", "%%")

"""RunReport: what one evaluation measured, as one typed, versioned record (a run folder's summary.json).

`evaluate_final` (grip_core/runs/evaluate.py) returns it, the job adds `timing` and `steps_done`, the
store writes `to_dict()` as summary.json, and `load_run` (grip_core/runs/store.py) parses it back with
`RunReport.from_dict`. Every reader (the Compare page, the HTML export, the CLI, the study) reads fields,
never guessed key spellings: a renamed field is an error here, not a silent "n/a" on a page.

The detail blocks are the metrics' own result types (ProbeResult, RoutingComparison, AttributionResult,
RestorationResult), so each shape is defined once, where it is computed.

Versions (`schema_version`):
    0  summary.json without a version (every run folder written before versioning): the same blocks
       and headline; read as is when complete, else "too old; re-run it".
    1  adds `schema_version`, and the optional `robustness` and `ledger` rows.

Footguns:
- `headline` is a dataclass; `verdict()` (grip_core/runs/verdict.py) takes a mapping: use
  `report.verdict()` or `verdict(report.headline.to_dict())`.
- Numbers may be NaN (e.g. a split whose answers were all truncated); JSON stores them as NaN, and
  `from_dict` keeps them as floats. Missing numbers are None.
"""
from __future__ import annotations

import dataclasses
import types
from dataclasses import asdict, dataclass
from typing import Any, Union, get_args, get_origin, get_type_hints

from ..metrics.attacks import RestorationResult
from ..metrics.attribution import AttributionResult
from ..metrics.probes import ProbeResult
from ..metrics.routing import RoutingComparison
from ..moe.errors import RunStoreError

SCHEMA_VERSION = 1


class ReportFormatError(RunStoreError):
    """A summary.json that is not a RunReport (a missing or mistyped field, or an unknown version)."""


@dataclass
class Headline:
    """The numbers every verdict, table and sentence reads (fractions in [0, 1]; None = not measured)."""

    forget_em: float | None = None                 # exact match on the forget set, unlearned model
    retain_em: float | None = None                 # ... on the retain set
    holdout_em: float | None = None                # ... on never-trained holdout facts
    paraphrase_forget_em: float | None = None      # ... on paraphrased forget questions
    base_forget_em: float | None = None            # the base model's forget EM
    base_retain_em: float | None = None            # the base model's retain EM
    membership_auc: float | None = None            # loss-based forget-vs-holdout AUC, unlearned (0.5 = unseen)
    base_membership_auc: float | None = None       # ... of the base model
    retain_stability: float | None = None          # share of retained (token, layer) top-k sets unchanged
    retain_stability_router_only: float | None = None  # ... with only the new routers (original inputs)
    retain_stability_drift_only: float | None = None   # ... with only the drifted inputs (original routers)
    forget_shift: float | None = None              # 1 - top-k overlap on forget tokens (pooled over layers)
    retain_shift: float | None = None              # ... on retained tokens
    forget_shift_router_share: float | None = None  # share of the forget shift the router weights caused
    restoration_recovered: float | None = None     # original routers put back: share of forgotten answers back
    restoration_recovered_raw: float | None = None  # the same, unclipped (meaningless when nothing was forgotten)
    restored_forget_em: float | None = None        # forget EM with the original routers put back
    collapsed: bool | None = None                  # retain EM fell below the job's collapse bar (None: unknown)
    collapse_reason: str = ""                      # why, in words ("" when not collapsed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GripRanks:
    """GRIP's null-space rank per layer x expert (grip_ranks.json; also in the report of a GRIP run)."""

    mode: str                                      # GRIPConfig.mode
    threshold_kind: str                            # "absolute" | "relative"
    eps_null: float                                # absolute threshold on sigma^2
    energy: float                                  # relative threshold: share of the energy kept
    dim: int                                       # d' = router input dim (+1 with a bias coordinate)
    null_space_rank: list[list[int]]               # (L, E) free directions of each router row; 0 = frozen
    mean_free_dims: list[float]                    # (L,) mean over experts
    layers: list[int]                              # decoder layer index of each row

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timing:
    """Where a job's time went (absent from a diagnosis)."""

    grip_fit_seconds: float                        # GRIP fit (0-ish for vanilla runs)
    grip_fit_cached: bool                          # the fit came from an earlier job on the same Baseline
    step_ms_median: float                          # median unlearning step (NaN with no steps)
    grip_ms_median: float                          # median GRIP projection time per step
    steps: int                                     # steps timed


@dataclass
class RunReport:
    """One evaluation of an unlearned model against its base (docs/architecture.md, "The run report")."""

    headline: Headline
    probes: ProbeResult                            # the unlearned model's knowledge probes, per split
    base_probes: ProbeResult                       # the base model's, on the same examples
    routing_retain: RoutingComparison              # base vs unlearned routing on retained tokens
    routing_forget: RoutingComparison              # ... on forget tokens
    attribution_retain: AttributionResult          # retained shift split into router weights / input drift
    attribution_forget: AttributionResult          # ... forget shift
    restoration: RestorationResult                 # the router-restoration attack on the forget set
    grip: GripRanks | None = None                  # GRIP runs only
    timing: Timing | None = None                   # jobs only (set by run_unlearning)
    steps_done: int | None = None                  # jobs only
    checkpoint: dict | None = None                 # diagnoses of a checkpoint: what was applied (moe/delta.py)
    # one row per (attack, setting): {"attack", "setting", "base_em", "unlearned_em", "attacked_em", "recovered",
    # "base_prob", "unlearned_prob", "attacked_prob", "routing_shift", "n"}; None when not run
    robustness: list[dict] | None = None
    # where the update landed, one row per group: {"group", "layer", "expert", "norm", "share"}; None when not run
    ledger: list[dict] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        """The JSON form (summary.json): plain dicts, lists and numbers."""
        return asdict(self)

    def verdict(self, **kwargs):
        """The run's verdict (grip_core.runs.verdict: the one verdict function)."""
        from .verdict import verdict

        return verdict(self.headline.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d, source: str = "report", file: str | None = None) -> "RunReport":
        """Parse summary.json's object. ReportFormatError (one line, naming the field) when it is not a report:
        "<source> is too old (schema 0); re-run it (<file>: <field>)" for an unversioned one that lacks what
        this version reads, and "<file>: <field> ..." for a current one (a bug or a hand edit).
        `source`: what the user knows it as ("run folder runs/<id>"); `file`: the file it came from."""
        if isinstance(d, cls):
            return d
        where = file or source
        if not isinstance(d, dict):
            raise ReportFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
        version = d.get("schema_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise ReportFormatError(f"{where}: schema_version must be a non-negative integer, got {version!r:.40}")
        if version > SCHEMA_VERSION:
            raise ReportFormatError(f"{where} was written by a newer GRIP Studio (schema {version}; this one reads "
                                    f"up to {SCHEMA_VERSION}); update GRIP Studio to open it")
        try:
            return _build(cls, {**d, "schema_version": SCHEMA_VERSION}, "report")
        except ReportFormatError as exc:
            detail = f"{file}: {exc}" if file else str(exc)
            if version < SCHEMA_VERSION:
                raise ReportFormatError(f"{source} is too old (schema {version}); re-run it ({detail})") from None
            raise ReportFormatError(detail if file else f"{source}: {exc}") from None


def parse(cls, data, where: str):
    """A report dataclass (`GripRanks`, `Headline`, ...) from its JSON form; ReportFormatError naming the field."""
    return _build(cls, data, where)


# ----------------------------------------------------------------------------- the JSON -> dataclass builder
# Written by hand: grip_core.typecheck.build checks one flat config dataclass; a report nests dataclasses
# in lists and dicts (RoutingComparison.layers: list[LayerRouting], ProbeResult.by_domain: dict[str, dict[str,
# SplitProbe]]), and the one-line error must name the path to the bad field.

def _name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _fail(where: str, hint, value) -> ReportFormatError:
    r = repr(value)
    return ReportFormatError(f"{where} must be {_name(hint)}, got {type(value).__name__} "
                             f"{r if len(r) <= 40 else r[:37] + '...'}")


def _build(hint, value, where: str):
    origin = get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(where, hint, value)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _build(a, value, where)
            except ReportFormatError as exc:
                errors.append(exc)
        raise errors[0]
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise _fail(where, hint, value)
        fields = {f.name: f for f in dataclasses.fields(hint)}
        unknown = sorted(str(k) for k in value if k not in fields)
        if unknown:
            raise ReportFormatError(f"{where}: unknown field(s) {unknown} for {hint.__name__}")
        hints = get_type_hints(hint)
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = _build(hints[name], value[name], f"{where}.{name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ReportFormatError(f"{where}: missing field {name!r} of {hint.__name__}")
        return hint(**kwargs)
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise _fail(where, hint, value)
        (arg,) = get_args(hint) or (Any,)
        return [_build(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _fail(where, hint, value)
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            raise _fail(where, hint, value)
        return tuple(_build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _fail(where, hint, value)
        kv = get_args(hint)
        if not kv:
            return value
        return {k: _build(kv[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _fail(where, hint, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(where, hint, value)
    if hint is float:
        if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) < 2 ** 1023):
            return float(value)
        raise _fail(where, hint, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _fail(where, hint, value)
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _fail(where, hint, value)
    return value


__all__ = ["RunReport", "Headline", "GripRanks", "Timing", "ReportFormatError", "SCHEMA_VERSION", "parse"]

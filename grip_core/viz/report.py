"""Read a saved run's report into per-layer series, tables and the verdict a user wants.

Every function takes a run's report as a RunReport (grip_core/runs/report.py) or its JSON form
(summary.json, `RunReport.to_dict()`, a `Diagnosis.to_dict()`), and reads its fields: no key is
guessed, so a renamed field fails loudly in RunReport.from_dict instead of rendering "n/a".
Run configs are config.json dicts (`RunConfig.to_dict()`), so a run computed on a cluster renders
the same on a laptop.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from ..fmt import pct
from ..runs.report import GripRanks, RunReport, parse
from ..runs.verdict import FORGET_TARGET, Verdict
from .summaries import finite

# ----------------------------------------------------------------------------- reading

ReportLike = RunReport | Mapping | None

# keys Diagnosis.to_dict() puts beside the report's own fields
_DIAGNOSIS_KEYS = ("verdict", "paragraph")


def as_report(report: ReportLike) -> RunReport | None:
    """A RunReport from a RunReport, its JSON form or a Diagnosis.to_dict(); None for None / {} (no report yet).

    Footgun: anything else that is not a report raises ReportFormatError naming the field.
    """
    if report is None or isinstance(report, RunReport):
        return report
    if not report:
        return None
    return RunReport.from_dict({k: v for k, v in report.items() if k not in _DIAGNOSIS_KEYS})


METHOD_NAMES = {"ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU"}


def grip_mode(config: Mapping | None) -> str:
    """"off" for vanilla runs, else the GRIP mode (+ drift correction), from a config.json dict."""
    grip = (config or {}).get("grip") or {}
    mode = str(grip.get("mode") or "off")
    drift = grip.get("drift_every") or 0
    return f"{mode}+drift{drift}" if mode != "off" and drift else mode


def _regime(config: Mapping) -> str:
    """The preset's name, else the scope in short ("moe, lr 3e-04, routers ×30"); "" when neither is recorded."""
    if config.get("preset"):
        return str(config["preset"])
    scope = config.get("scope") or {}
    if not scope.get("kind"):
        return ""
    lr, mult = scope.get("lr"), scope.get("router_lr_mult")
    out = str(scope["kind"]) + (f", lr {lr:.0e}" if isinstance(lr, (int, float)) else "")
    return out + (f", routers ×{mult:g}" if isinstance(mult, (int, float)) and mult != 1 else "")


def run_display_name(config: Mapping | None, fallback: str = "run") -> str:
    """What the run was: "GradDiff · GRIP update · shortcut · seed 0 · 60 steps" (method, GRIP mode,
    preset or scope, seed, steps), after the user's label when it says something else."""
    if not config:
        return fallback
    method = str(config.get("method", "?"))
    mode = grip_mode(config)
    mode = "vanilla" if mode == "off" else "GRIP " + mode.replace("+drift", " + drift every ")
    if mode != "vanilla" and (config.get("grip") or {}).get("threshold_kind") == "relative":
        mode += " (relative threshold)"
    parts = [METHOD_NAMES.get(method, method), mode] + ([_regime(config)] if _regime(config) else [])
    if config.get("seed") is not None:
        parts.append(f"seed {config['seed']}")
    if config.get("steps") is not None:
        parts.append(f"{config['steps']} steps")
    name = " · ".join(parts)
    label = str(config.get("label") or "")
    auto = label.startswith(f"{method}-") and label.endswith(f"-s{config.get('seed')}")   # make_config's label
    return f"{label}: {name}" if label and not auto else name


def run_names(runs) -> list[str]:
    """Display names of SavedRun-like objects (.config), unique: a repeated name gets " (2)", " (3)" ..."""
    names: list[str] = []
    for r in runs:
        n = run_display_name(r.config, getattr(r, "run_id", "run"))
        k, unique = 2, n
        while unique in names:
            unique, k = f"{n} ({k})", k + 1
        names.append(unique)
    return names


def _layer_rows(comp) -> list:
    return list(comp.layers) if comp is not None else []


def _col(rows: Sequence, key: str) -> list | None:
    vals = [getattr(r, key) for r in rows]
    return vals if rows and any(v is not None for v in vals) else None


def run_layer_series(report: ReportLike, config: Mapping | None = None) -> dict:
    """Per-layer lists from a report: retained stability / overlap, forget shift, frequency changes,
    attribution (stability actual / router-only / drift-only and the Shapley contributions)."""
    rep = as_report(report)
    retain, forget = (rep.routing_retain, rep.routing_forget) if rep else (None, None)
    attr, fattr = (rep.attribution_retain, rep.attribution_forget) if rep else (None, None)
    r_rows, f_rows, a_rows, fa_rows = _layer_rows(retain), _layer_rows(forget), _layer_rows(attr), _layer_rows(fattr)
    layers = [r.layer for r in (r_rows or f_rows or a_rows)]
    out = {"layers": layers, "grip_mode": grip_mode(config),
           "stability": _col(r_rows, "stability"), "overlap": _col(r_rows, "overlap"),
           "retain_shift": _col(r_rows, "shift"), "retain_freq_change": _col(r_rows, "freq_change"),
           "retain_freq_base": _col(r_rows, "freq_base"), "retain_freq_new": _col(r_rows, "freq_new"),
           "retain_entropy_new": _col(r_rows, "entropy_new"), "retain_entropy_base": _col(r_rows, "entropy_base"),
           "shift": _col(f_rows, "shift"), "forget_stability": _col(f_rows, "stability"),
           "forget_freq_change": _col(f_rows, "freq_change"), "forget_freq_base": _col(f_rows, "freq_base"),
           "forget_freq_new": _col(f_rows, "freq_new")}
    for key in ("stability_actual", "stability_router_only", "stability_drift_only", "router_contribution",
                "drift_contribution", "router_share", "drift_share"):
        out[key] = _col(a_rows, key)
        out[f"forget_{key}"] = _col(fa_rows, key)
    get = lambda obj, key: finite(getattr(obj, key)) if obj is not None else None
    out["overall"] = {"stability": get(retain, "stability"), "forget_shift": get(forget, "shift"),
                      "forget_stability": get(forget, "stability"),
                      "stability_router_only": get(attr, "stability_router_only"),
                      "stability_drift_only": get(attr, "stability_drift_only"),
                      "router_share": get(attr, "router_share"), "drift_share": get(attr, "drift_share"),
                      "forget_router_share": get(fattr, "router_share")}
    return out


def null_space_ranks(grip_ranks: GripRanks | Mapping | None) -> dict | None:
    """{"layers", "ranks" (L x E), "dim", "threshold" (words)} from grip_ranks.json / a report's `grip`, or None."""
    if grip_ranks is None or (isinstance(grip_ranks, Mapping) and not grip_ranks):
        return None
    g = parse(GripRanks, grip_ranks, "grip_ranks") if isinstance(grip_ranks, Mapping) else grip_ranks
    if not g.null_space_rank:
        return None
    if g.threshold_kind == "absolute":
        threshold = f"absolute threshold σ² > {g.eps_null}"
    elif g.threshold_kind == "relative":
        threshold = f"relative threshold, {pct(g.energy)} of the energy kept"
    else:
        threshold = ""
    return {"layers": list(g.layers), "ranks": [list(r) for r in g.null_space_rank], "dim": g.dim,
            "threshold": threshold}


# ----------------------------------------------------------------------------- tables

PROBE_SPLIT_ORDER = {"forget": 0, "retain": 1, "holdout": 2, "paraphrase_forget": 3, "paraphrase_retain": 4}


def probes_table(runs: Mapping[str, ReportLike]) -> pd.DataFrame:
    """Forget / retain / holdout (/ paraphrase) probes side by side: one row per split x measure,
    one column for the base model (the first report's `base_probes`) and one per run. Values are fractions / nats."""
    reports = {name: as_report(r) for name, r in runs.items()}
    columns = {}
    base = next((r.base_probes for r in reports.values() if r is not None), None)
    if base is not None:
        columns["base"] = base
    columns.update({name: r.probes for name, r in reports.items() if r is not None})
    splits = sorted(dict.fromkeys(s for p in columns.values() for s in p.splits),
                    key=lambda s: PROBE_SPLIT_ORDER.get(s, 9))
    rows = []
    for s in splits:
        for measure, key in (("exact match", "exact_match"), ("answer probability", "mean_prob"),
                             ("answer NLL (nats)", "mean_nll")):
            row = {"split": s, "measure": measure}
            for col, p in columns.items():
                row[col] = finite(getattr(p.splits[s], key)) if s in p.splits else None
            if any(row[c] is not None for c in columns):
                rows.append(row)
    auc = {col: finite(p.membership_auc) for col, p in columns.items()}
    if any(v is not None for v in auc.values()):
        rows.append({"split": "forget vs holdout", "measure": "membership AUC", **auc})
    return _floats(pd.DataFrame(rows, columns=["split", "measure", *columns]), exclude=("split", "measure"))


# the restoration table's columns: short headers, so the verdict column fits beside them
RESTORATION_COLUMNS = {"em_base": "forget EM, base", "em_unlearned": "unlearned",
                       "em_restored": "routers restored", "recovered": "recovered"}


def restoration_table(runs: Mapping[str, ReportLike]) -> pd.DataFrame:
    """The router-restoration attack per run: forget EM of the base / unlearned / unlearned with the original
    routers restored, the share recovered, and the run's verdict (grip_core.runs.verdict: the same words as
    the Compare sentence and Diagnose)."""
    rows = []
    for name, report in runs.items():
        rep = as_report(report)
        if rep is None:
            continue
        r = rep.restoration
        rows.append({"run": name, **{col: finite(getattr(r, key)) for key, col in RESTORATION_COLUMNS.items()},
                     "verdict": rep.verdict().kind})
    df = pd.DataFrame(rows, columns=["run", *RESTORATION_COLUMNS.values(), "verdict"])
    return _floats(df, exclude=("run", "verdict"))


def _floats(df: pd.DataFrame, exclude=()) -> pd.DataFrame:
    """Numeric columns as float (None -> NaN), so tables show blanks, not 'None'."""
    for c in df.columns:
        if c not in exclude:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def step_log_with_base(steps: Sequence[Mapping], report: ReportLike) -> list[dict]:
    """The step log with a step-0 row from the base model (stability 100 %, base EM), so curves start at the start."""
    rep = as_report(report)
    h = rep.headline if rep else None
    if not steps or h is None or h.base_forget_em is None or any(r.get("step") == 0 for r in steps):
        return list(steps)
    base = {"step": 0, "retain_stability": 1.0, "forget_shift": 0.0, "forget_em": h.base_forget_em,
            "retain_em": h.base_retain_em}
    return [base, *steps]


def run_verdict(report: ReportLike, forget_target: float = FORGET_TARGET) -> Verdict | None:
    """The run's verdict (grip_core.runs.verdict) from its report; None without a report."""
    rep = as_report(report)
    return None if rep is None else rep.verdict(forget_target=forget_target)


def run_summary_row(name: str, report: ReportLike, config: Mapping | None = None) -> dict:
    """One row of headline numbers for a run (the runs table), from the report's headline."""
    rep = as_report(report)
    h = rep.headline if rep else None
    get = lambda key: finite(getattr(h, key)) if h is not None else None
    recovered = get("restoration_recovered")
    if rep is not None and finite(rep.restoration.forgotten) is not None and rep.restoration.forgotten < 0.05:
        recovered = None                       # nothing was forgotten: "recovers 0 %" would mislead
    return {"run": name,
            "retained stability": get("retain_stability"),
            "router-only stability": get("retain_stability_router_only"),
            "forget selection shift": get("forget_shift"),
            "forget EM": get("forget_em"),
            "retain EM": get("retain_em"),
            "restoration recovers": recovered,
            "steps": rep.steps_done if rep else None,
            "verdict": rep.verdict().kind if rep else None}


# ----------------------------------------------------------------------------- the sentence


def compare_sentence(runs: Mapping[str, tuple[ReportLike, Mapping | None]],
                     forget_target: float = FORGET_TARGET) -> str:
    """Each run's verdict sentence (grip_core.runs.verdict), which names its trade-off: forget EM, retain EM,
    retained routing stability and what restoring the original routers brings back, rounded as in the tables
    (grip_core.fmt.pct). E.g. "GradDiff · vanilla · ... — Rerouted, not erased: forget EM 97.0 % → 0.0 %, but
    restoring the original routers brings back 99.6 % ...". `runs`: name -> (report, config)."""
    lines = []
    for name, (report, _config) in runs.items():
        v = run_verdict(report, forget_target)
        lines.append(f"{name} has no final report yet." if v is None else f"{name} — {v.sentence}")
    return " ".join(lines)


def runs_table(runs: Mapping[str, tuple[ReportLike, Mapping | None]]) -> pd.DataFrame:
    """Headline numbers of several runs (name -> (report, config)), one row each."""
    df = pd.DataFrame([run_summary_row(n, s, c) for n, (s, c) in runs.items()])
    return _floats(df, exclude=("run", "verdict"))


def percent_strings(df: pd.DataFrame, exclude=("run", "steps", "split", "measure", "verdict"), digits: int = 1
                    ) -> pd.DataFrame:
    """A display copy of a table: fractions as "66.8 %" (grip_core.fmt.pct, as in every verdict sentence), missing
    values as "—" (the CSV keeps the numbers)."""
    out = df.copy()
    for c in out.columns:
        if c not in exclude:
            out[c] = [pct(v, digits, missing="—") for v in out[c]]
        elif c == "steps":
            out[c] = ["—" if v is None or v != v else f"{int(v)}" for v in out[c]]
    return out

"""Read a saved run's summary into per-layer series, tables and the verdict a user wants.

Everything here works on plain dicts (summary.json, config.json), so a run computed on a
cluster renders the same on a laptop. The summary layout is written by grip_core.runs
(evaluate_final); `_get` tries the documented key first and a few spellings after it, so a
renamed key degrades to "n/a" instead of an exception.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from ..fmt import pct
from ..runs.verdict import FORGET_TARGET, Verdict, verdict
from .summaries import finite

# ----------------------------------------------------------------------------- lookup


def _get(d: Mapping | None, *paths: str, default=None):
    """The first present value among dotted `paths` ("routing.retain.layers")."""
    for path in paths:
        cur = d
        for part in path.split("."):
            if isinstance(cur, Mapping) and part in cur:
                cur = cur[part]
            else:
                cur = None
                break
        if cur is not None:
            return cur
    return default


RETAIN_ROUTING = ("routing_retain", "routing.retain", "retain_routing")
FORGET_ROUTING = ("routing_forget", "routing.forget", "forget_routing")
ATTRIBUTION = ("attribution_retain", "attribution.retain", "attribution")
FORGET_ATTRIBUTION = ("attribution_forget", "attribution.forget")
PROBES = ("probes",)
BASE_PROBES = ("base_probes", "probes_base")
RESTORATION = ("restoration",)
GRIP_RANKS = ("grip", "grip_ranks")


def grip_mode(config: Mapping | None) -> str:
    """"off" for vanilla runs, else the GRIP mode (+ drift correction)."""
    mode = _get(config, "grip.mode", default="off") or "off"
    drift = _get(config, "grip.drift_every", default=0) or 0
    return f"{mode}+drift{drift}" if mode != "off" and drift else mode


def run_display_name(config: Mapping | None, fallback: str = "run") -> str:
    """"vanilla GradDiff" / "GRIP GradDiff" (the label, when the user gave one)."""
    if not config:
        return fallback
    if config.get("label"):
        return str(config["label"])
    method = str(config.get("method", "?"))
    pretty = {"ga": "GA", "graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "rmu": "RMU"}.get(method, method)
    mode = grip_mode(config)
    if mode == "off":
        return f"vanilla {pretty}"
    return f"GRIP {pretty}" + (f" (drift every {_get(config, 'grip.drift_every')})" if "drift" in mode else "")


def _layers_of(comp: Mapping | None) -> list[Mapping]:
    return list((comp or {}).get("layers") or [])


def _col(rows: Sequence[Mapping], key: str) -> list | None:
    vals = [r.get(key) for r in rows]
    return vals if rows and any(v is not None for v in vals) else None


def run_layer_series(summary: Mapping | None, config: Mapping | None = None) -> dict:
    """Per-layer lists from a summary: retained stability / overlap, forget shift, frequency changes,
    attribution (stability actual / router-only / drift-only and the Shapley contributions)."""
    summary = summary or {}
    retain = _get(summary, *RETAIN_ROUTING) or {}
    forget = _get(summary, *FORGET_ROUTING) or {}
    attr = _get(summary, *ATTRIBUTION) or {}
    r_rows, f_rows, a_rows = _layers_of(retain), _layers_of(forget), _layers_of(attr)
    layers = [r.get("layer") for r in (r_rows or f_rows or a_rows)]
    out = {"layers": layers, "grip_mode": grip_mode(config),
           "stability": _col(r_rows, "stability"), "overlap": _col(r_rows, "overlap"),
           "retain_shift": _col(r_rows, "shift"), "retain_freq_change": _col(r_rows, "freq_change"),
           "retain_freq_base": _col(r_rows, "freq_base"), "retain_freq_new": _col(r_rows, "freq_new"),
           "retain_entropy_new": _col(r_rows, "entropy_new"), "retain_entropy_base": _col(r_rows, "entropy_base"),
           "shift": _col(f_rows, "shift"), "forget_stability": _col(f_rows, "stability"),
           "forget_freq_change": _col(f_rows, "freq_change"), "forget_freq_base": _col(f_rows, "freq_base"),
           "forget_freq_new": _col(f_rows, "freq_new")}
    fattr = _get(summary, *FORGET_ATTRIBUTION) or {}
    fa_rows = _layers_of(fattr)
    for key in ("stability_actual", "stability_router_only", "stability_drift_only", "router_contribution",
                "drift_contribution", "router_share", "drift_share"):
        out[key] = _col(a_rows, key)
        out[f"forget_{key}"] = _col(fa_rows, key)
    out["overall"] = {"stability": finite(retain.get("stability")), "forget_shift": finite(forget.get("shift")),
                      "forget_stability": finite(forget.get("stability")),
                      "stability_router_only": finite(attr.get("stability_router_only")),
                      "stability_drift_only": finite(attr.get("stability_drift_only")),
                      "router_share": finite(attr.get("router_share")),
                      "drift_share": finite(attr.get("drift_share")),
                      "forget_router_share": finite(fattr.get("router_share"))}
    return out


def null_space_ranks(grip_ranks: Mapping | None) -> dict | None:
    """{"layers", "ranks" (L x E), "dim", "threshold" (words)} from grip_ranks.json / summary["grip"], or None."""
    if not isinstance(grip_ranks, Mapping):
        return None
    ranks = _get(grip_ranks, "null_space_rank", "ranks", "null_space_ranks")
    if not ranks:
        return None
    layers = _get(grip_ranks, "layers", "layer_indices") or list(range(len(ranks)))
    dim = _get(grip_ranks, "dim", "hidden_size", "d")
    kind = grip_ranks.get("threshold_kind")
    if kind == "absolute":
        threshold = f"absolute threshold σ² > {grip_ranks.get('eps_null')}"
    elif kind == "relative":
        threshold = f"relative threshold, {pct(float(grip_ranks.get('energy', 0)))} of the energy kept"
    else:
        threshold = ""
    return {"layers": list(layers), "ranks": [list(r) for r in ranks], "dim": int(dim) if dim else None,
            "threshold": threshold}


# ----------------------------------------------------------------------------- tables


def _probe_splits(p: Mapping | None) -> Mapping:
    return (p or {}).get("splits") or {}


def probes_table(runs: Mapping[str, Mapping], base: Mapping | None = None) -> pd.DataFrame:
    """Forget / retain / holdout (/ paraphrase) probes side by side: one row per split x measure,
    one column for the base model (if known) and one per run. Values are fractions / nats."""
    columns: dict[str, Mapping] = {}
    if base is None:
        for summary in runs.values():
            base = _get(summary, *BASE_PROBES)
            if base:
                break
    if base:
        columns["base"] = base
    for name, summary in runs.items():
        columns[name] = _get(summary, *PROBES) or {}
    splits: list[str] = []
    for p in columns.values():
        for s in _probe_splits(p):
            if s not in splits:
                splits.append(s)
    order = {"forget": 0, "retain": 1, "holdout": 2, "paraphrase_forget": 3, "paraphrase_retain": 4}
    splits.sort(key=lambda s: order.get(s, 9))
    rows = []
    for s in splits:
        for measure, key in (("exact match", "exact_match"), ("answer probability", "mean_prob"),
                             ("answer NLL (nats)", "mean_nll")):
            row = {"split": s, "measure": measure}
            for col, p in columns.items():
                row[col] = finite(_probe_splits(p).get(s, {}).get(key))
            if any(row[c] is not None for c in columns):
                rows.append(row)
    auc = {col: finite((p or {}).get("membership_auc")) for col, p in columns.items()}
    if any(v is not None for v in auc.values()):
        rows.append({"split": "forget vs holdout", "measure": "membership AUC", **auc})
    return _floats(pd.DataFrame(rows, columns=["split", "measure", *columns]), exclude=("split", "measure"))


def restoration_table(runs: Mapping[str, Mapping]) -> pd.DataFrame:
    """The router-restoration attack per run: forget EM base / unlearned / with original routers, recovered,
    and the run's verdict (grip_core.runs.verdict, the same words as the Compare sentence and Diagnose)."""
    rows = []
    for name, summary in runs.items():
        r = _get(summary, *RESTORATION)
        if not isinstance(r, Mapping) or not r:
            continue
        rows.append({"run": name, "forget EM (base)": finite(r.get("em_base")),
                     "forget EM (unlearned)": finite(r.get("em_unlearned")),
                     "forget EM (original routers restored)": finite(r.get("em_restored")),
                     "recovered": finite(r.get("recovered")),
                     "verdict": run_verdict(summary).kind})
    df = pd.DataFrame(rows, columns=["run", "forget EM (base)", "forget EM (unlearned)",
                                     "forget EM (original routers restored)", "recovered", "verdict"])
    return _floats(df, exclude=("run", "verdict"))


def _floats(df: pd.DataFrame, exclude=()) -> pd.DataFrame:
    """Numeric columns as float (None -> NaN), so tables show blanks, not 'None'."""
    for c in df.columns:
        if c not in exclude:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def step_log_with_base(steps: Sequence[Mapping], summary: Mapping | None) -> list[dict]:
    """The step log with a step-0 row from the base model (stability 100 %, base EM), so curves start at the start."""
    h = _get(summary, "headline") or {}
    if not steps or h.get("base_forget_em") is None or any(r.get("step") == 0 for r in steps):
        return list(steps)
    base = {"step": 0, "retain_stability": 1.0, "forget_shift": 0.0, "forget_em": h.get("base_forget_em"),
            "retain_em": h.get("base_retain_em")}
    return [base, *steps]


def summary_headline(summary: Mapping | None) -> dict:
    """summary["headline"] (grip_core.runs.evaluate), each missing number filled from the details
    (probes, base_probes, routing, attribution, restoration), so older summaries get a verdict too."""
    summary = summary or {}
    h = dict(_get(summary, "headline") or {})
    probes, base = _probe_splits(_get(summary, *PROBES)), _probe_splits(_get(summary, *BASE_PROBES))
    retain, forget = _get(summary, *RETAIN_ROUTING) or {}, _get(summary, *FORGET_ROUTING) or {}
    attr = _get(summary, *ATTRIBUTION) or {}
    rest = _get(summary, *RESTORATION) or {}
    rest = rest if isinstance(rest, Mapping) else {}
    fallback = {"forget_em": probes.get("forget", {}).get("exact_match", rest.get("em_unlearned")),
                "retain_em": probes.get("retain", {}).get("exact_match"),
                "base_forget_em": base.get("forget", {}).get("exact_match", rest.get("em_base")),
                "base_retain_em": base.get("retain", {}).get("exact_match"),
                "retain_stability": retain.get("stability"), "retain_shift": retain.get("shift"),
                "forget_shift": forget.get("shift"),
                "retain_stability_router_only": attr.get("stability_router_only"),
                "retain_stability_drift_only": attr.get("stability_drift_only"),
                "restoration_recovered": rest.get("recovered"), "restored_forget_em": rest.get("em_restored")}
    for key, value in fallback.items():
        if finite(h.get(key)) is None:
            h[key] = finite(value)
    return h


def run_verdict(summary: Mapping | None, forget_target: float = FORGET_TARGET) -> Verdict | None:
    """The run's verdict (grip_core.runs.verdict) from a saved summary; None without a summary."""
    if not summary:
        return None
    return verdict(summary_headline(summary), forget_target=forget_target)


def run_summary_row(name: str, summary: Mapping | None, config: Mapping | None = None) -> dict:
    """One row of headline numbers for a run (the runs table): summary["headline"] first, then the details."""
    s = run_layer_series(summary, config)["overall"]
    h = _get(summary, "headline") or {}
    probes = _probe_splits(_get(summary, *PROBES))
    rest = _get(summary, *RESTORATION) or {}
    pick = lambda key, fallback: finite(h.get(key)) if h.get(key) is not None else fallback
    recovered = pick("restoration_recovered", finite(rest.get("recovered")) if isinstance(rest, Mapping) else None)
    forgotten = finite(rest.get("forgotten")) if isinstance(rest, Mapping) else None
    if forgotten is not None and forgotten < 0.05:
        recovered = None                       # nothing was forgotten: "recovers 0 %" would mislead
    return {"run": name,
            "retained stability": pick("retain_stability", s["stability"]),
            "router-only stability": pick("retain_stability_router_only", s["stability_router_only"]),
            "forget selection shift": pick("forget_shift", s["forget_shift"]),
            "forget EM": pick("forget_em", finite(probes.get("forget", {}).get("exact_match"))),
            "retain EM": pick("retain_em", finite(probes.get("retain", {}).get("exact_match"))),
            "restoration recovers": recovered,
            "steps": _get(summary, "steps_done", "timing.steps"),
            "verdict": v.kind if (v := run_verdict(summary)) else None}


# ----------------------------------------------------------------------------- the sentence


def compare_sentence(runs: Mapping[str, tuple[Mapping | None, Mapping | None]],
                     forget_target: float = FORGET_TARGET) -> str:
    """The verdict of each run (grip_core.runs.verdict), then the trade-off between them, e.g.
    "vanilla GradDiff — Rerouted, not erased: forget EM 97.0 % → 0.0 %, but restoring the original routers brings
    back 99.6 % ... GRIP GradDiff — Partially erased: ... Trade-off (GRIP GradDiff / vanilla GradDiff): forget EM
    14.4 % / 0.0 %, retain EM 98.9 % / 64.0 %, ...". `runs`: name -> (summary, config). Percentages as in the tables."""
    lines, verdicts = [], {}
    for name, (summary, _config) in runs.items():
        v = run_verdict(summary, forget_target)
        if v is None:
            lines.append(f"{name} has no final summary yet.")
            continue
        verdicts[name] = v
        lines.append(f"{name} — {v.sentence}")
    if len(verdicts) > 1:
        lines.append(tradeoff_sentence(verdicts))
    return " ".join(lines)


def tradeoff_sentence(verdicts: Mapping[str, Verdict]) -> str:
    """One line comparing runs on the four numbers every verdict names (same order as `verdicts`)."""
    vs = list(verdicts.values())
    col = lambda key: " / ".join(pct(v.numbers.get(key)) for v in vs)
    return (f"Trade-off ({' / '.join(verdicts)}): forget EM {col('forget_em')}, retain EM {col('retain_em')}, "
            f"retained routing stability {col('retain_stability')}, restoration brings back "
            f"{col('restoration_recovered')} of the forgotten answers.")


def runs_table(runs: Mapping[str, tuple[Mapping | None, Mapping | None]]) -> pd.DataFrame:
    """Headline numbers of several runs (name -> (summary, config)), one row each."""
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

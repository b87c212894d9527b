"""Read a saved run's summary into per-layer series, tables and the one sentence a user wants.

Everything here works on plain dicts (summary.json, config.json), so a run computed on a
cluster renders the same on a laptop. The summary layout is written by grip_core.runs
(evaluate_final); `_get` tries the documented key first and a few spellings after it, so a
renamed key degrades to "n/a" instead of an exception.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from .style import pct
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
        threshold = f"relative threshold, {100 * float(grip_ranks.get('energy', 0)):.1f} % of the energy kept"
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
    """The router-restoration attack per run: forget EM base / unlearned / with original routers, recovered."""
    rows = []
    for name, summary in runs.items():
        r = _get(summary, *RESTORATION)
        if not isinstance(r, Mapping) or not r:
            continue
        rows.append({"run": name, "forget EM (base)": finite(r.get("em_base")),
                     "forget EM (unlearned)": finite(r.get("em_unlearned")),
                     "forget EM (original routers restored)": finite(r.get("em_restored")),
                     "recovered": finite(r.get("recovered")),
                     "verdict": restoration_verdict(finite(r.get("recovered")), finite(r.get("forgotten")),
                                                    finite(r.get("em_unlearned")))})
    df = pd.DataFrame(rows, columns=["run", "forget EM (base)", "forget EM (unlearned)",
                                     "forget EM (original routers restored)", "recovered", "verdict"])
    return _floats(df, exclude=("run", "verdict"))


def _floats(df: pd.DataFrame, exclude=()) -> pd.DataFrame:
    """Numeric columns as float (None -> NaN), so tables show blanks, not 'None'."""
    for c in df.columns:
        if c not in exclude:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def restoration_verdict(recovered: float | None, forgotten: float | None = None,
                        em_unlearned: float | None = None) -> str:
    """Words for the restoration attack (the vocabulary of grip_core.runs.diagnose: rerouted / erased / mixed)."""
    if forgotten is not None and forgotten < 0.05:
        return "nothing was forgotten"
    if recovered is None:
        return "n/a"
    if recovered >= 0.5:
        return "rerouted: the knowledge is still in the experts"
    if recovered >= 0.15:
        return "mixed: restoring the routers brings part of it back"
    partial = " (forgetting still partial)" if em_unlearned is not None and em_unlearned > 0.1 else ""
    return "erased: restoring the routers brings little back" + partial


def step_log_with_base(steps: Sequence[Mapping], summary: Mapping | None) -> list[dict]:
    """The step log with a step-0 row from the base model (stability 100 %, base EM), so curves start at the start."""
    h = _get(summary, "headline") or {}
    if not steps or h.get("base_forget_em") is None or any(r.get("step") == 0 for r in steps):
        return list(steps)
    base = {"step": 0, "retain_stability": 1.0, "forget_shift": 0.0, "forget_em": h.get("base_forget_em"),
            "retain_em": h.get("base_retain_em")}
    return [base, *steps]


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
            "steps": _get(summary, "steps_done", "timing.steps")}


# ----------------------------------------------------------------------------- the sentence


def compare_sentence(runs: Mapping[str, tuple[Mapping | None, Mapping | None]]) -> str:
    """The sentence a user wants, from saved summaries only, e.g.
    "vanilla NPO rerouted 38.2 % of forget tokens and kept 61.0 % of retain routing; GRIP NPO kept 99.6 %
    of retain routing (router-only 100.0 %)". `runs`: name -> (summary, config)."""
    parts = []
    for name, (summary, config) in runs.items():
        if not summary:
            parts.append(f"{name} has no final summary yet")
            continue
        s = run_layer_series(summary, config)["overall"]
        bits = []
        if s["forget_shift"] is not None and grip_mode(config) == "off":
            bits.append(f"rerouted {pct(s['forget_shift'])} of forget-token expert slots")
        if s["stability"] is not None:
            kept = f"kept {pct(s['stability'])} of retain routing"
            if s["stability_router_only"] is not None:
                kept += f" ({pct(s['stability_router_only'])} with its inputs held fixed)"
            bits.append(kept)
        elif s["forget_shift"] is not None:
            bits.append(f"shifted {pct(s['forget_shift'])} of forget-token expert slots")
        rest = _get(summary, *RESTORATION) or {}
        rec = finite(rest.get("recovered")) if isinstance(rest, Mapping) else None
        forgotten = finite(rest.get("forgotten")) if isinstance(rest, Mapping) else None
        if rec is not None and forgotten is not None and forgotten < 0.05:
            bits.append("its forget-set exact match has not dropped yet")
        elif rec is not None:
            bits.append(f"restoring its original routers brought back {pct(rec, 0)} of the forgotten answers")
        parts.append(f"{name} " + (", ".join(bits[:-1]) + " and " + bits[-1] if len(bits) > 1 else
                                   (bits[0] if bits else "has no routing metrics")))
    return "; ".join(parts) + "."


def runs_table(runs: Mapping[str, tuple[Mapping | None, Mapping | None]]) -> pd.DataFrame:
    """Headline numbers of several runs (name -> (summary, config)), one row each."""
    df = pd.DataFrame([run_summary_row(n, s, c) for n, (s, c) in runs.items()])
    return _floats(df, exclude=("run",))


def percent_strings(df: pd.DataFrame, exclude=("run", "steps", "split", "measure", "verdict"), digits: int = 1
                    ) -> pd.DataFrame:
    """A display copy of a table: fractions as "66.8 %", missing values as "—" (the CSV keeps the numbers)."""
    out = df.copy()
    for c in out.columns:
        if c not in exclude:
            out[c] = [("—" if v is None or v != v else f"{100 * v:.{digits}f} %") for v in out[c]]
        elif c == "steps":
            out[c] = ["—" if v is None or v != v else f"{int(v)}" for v in out[c]]
    return out

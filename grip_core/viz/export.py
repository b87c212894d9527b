"""Figures of saved runs as one standalone HTML page (for the CLI and notebooks; the dashboard shows the same).

    from grip_core.viz.export import write_runs_html
    write_runs_html(["runs/<vanilla id>", "runs/<grip id>"], "compare.html")
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from .report import (compare_sentence, grip_mode, null_space_ranks, probes_table, restoration_table,
                     run_display_name, run_layer_series, runs_table, step_log_with_base)
from .routing import nullspace_heatmap, routing_shift_heatmap, shared_shift_range
from .runs import attribution_bars, selection_shift_bars, stability_bars, stability_compare_bars, training_curves
from .style import run_color


def runs_figures(runs) -> dict[str, go.Figure]:
    """Every compare figure for SavedRun-like objects (.config, .summary, .steps, .grip_ranks), in page order."""
    names, seen = [], set()
    for r in runs:
        n = run_display_name(r.config, getattr(r, "run_id", "run"))
        n = n if n not in seen else f"{n} ({getattr(r, 'run_id', '')[-4:]})"
        seen.add(n)
        names.append(n)
    colors = {n: run_color(n, grip_mode(r.config), i) for i, (n, r) in enumerate(zip(names, runs))}
    series = {n: run_layer_series(r.summary, r.config) for n, r in zip(names, runs)}
    figs: dict[str, go.Figure] = {}
    for which in ("retain", "forget"):
        mats = {n: s.get(f"{which}_freq_change") for n, s in series.items()}
        zmax = shared_shift_range(*[m for m in mats.values() if m])
        for i, n in enumerate(names):
            if mats[n]:
                s = series[n]
                figs[f"shift-{which}-{i}"] = routing_shift_heatmap(
                    mats[n], s["layers"], title=f"{n} — {which} tokens", zmax=zmax,
                    freq_base=s.get(f"{which}_freq_base"), freq_new=s.get(f"{which}_freq_new"))
    ok = {n: s for n, s in series.items() if s.get("stability")}
    if ok:
        figs["stability"] = stability_compare_bars(ok, colors=colors)
    ok = {n: s for n, s in series.items() if s.get("shift")}
    if ok:
        figs["forget-shift"] = selection_shift_bars(ok, colors=colors)
    for i, n in enumerate(names):
        if series[n].get("stability_actual"):
            figs[f"attribution-{i}"] = stability_bars(series[n]["layers"], series[n], name=n, color=colors[n])
    ok = {n: s for n, s in series.items() if s.get("router_contribution")}
    if ok:
        figs["shift-attribution"] = attribution_bars(ok, colors=colors)
    for i, (n, r) in enumerate(zip(names, runs)):
        nr = null_space_ranks(getattr(r, "grip_ranks", None) or (r.summary or {}).get("grip"))
        if nr:
            figs[f"null-space-{i}"] = nullspace_heatmap(nr["ranks"], nr["layers"], nr["dim"],
                                                        title=f"Null-space rank — {n}")
    logs = {n: step_log_with_base(r.steps, r.summary) for n, r in zip(names, runs) if getattr(r, "steps", None)}
    if logs:
        figs["curves"] = training_curves(logs, colors=colors)
    return figs


def runs_html(runs) -> str:
    """One self-contained HTML page: the sentence, the headline table, every figure, probes and restoration."""
    runs = list(runs)
    named = {run_display_name(r.config, getattr(r, "run_id", "run")): r for r in runs}
    parts = [f"<h1>GRIP Studio — {escape(' vs '.join(named))}</h1>",
             f"<p style='font-size:1.25rem'>{escape(compare_sentence({n: (r.summary, r.config) for n, r in named.items()}))}</p>",
             runs_table({n: (r.summary, r.config) for n, r in named.items()}).to_html(index=False, float_format="%.3f")]
    for i, fig in enumerate(runs_figures(runs).values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=True if i == 0 else False,
                                 config={"displaylogo": False}))
    parts.append("<h2>Knowledge probes</h2>" + probes_table({n: r.summary for n, r in named.items()})
                 .to_html(index=False, float_format="%.3f"))
    parts.append("<h2>Router-restoration attack</h2>" + restoration_table({n: r.summary for n, r in named.items()})
                 .to_html(index=False, float_format="%.3f"))
    body = "\n".join(parts)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>GRIP Studio runs</title>"
            "<style>body{font-family:Inter,Helvetica,Arial,sans-serif;max-width:1200px;margin:2rem auto;color:#1F2328}"
            "table{border-collapse:collapse}td,th{border:1px solid #DDE3EA;padding:4px 8px}</style></head>"
            f"<body>{body}</body></html>")


def write_runs_html(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Read run folders (grip_core.runs.store.load_run) and write `runs_html` to `out`."""
    from ..runs.store import load_run

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(runs_html([load_run(d) for d in run_dirs]), encoding="utf-8")
    return out

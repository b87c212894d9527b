"""Figures of saved runs as one standalone HTML page (for the CLI and notebooks; the dashboard shows the same).

    from grip_core.viz.export import write_runs_html
    write_runs_html(["runs/<vanilla id>", "runs/<grip id>"], "compare.html")

The figures are `grip_core.viz.runs.compare_figures`, the list the Compare page shows.
"""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Sequence

import plotly.graph_objects as go

from .report import compare_sentence, probes_table, restoration_table, run_names, runs_table
from .runs import compare_figures


def runs_figures(runs) -> dict[str, go.Figure]:
    """`compare_figures(runs)` keyed by slug (for scripts that want one figure by name)."""
    return {f.slug: f.figure for f in compare_figures(runs)}


def runs_html(runs) -> str:
    """One self-contained HTML page: the verdict sentences, the headline table, every figure, probes and restoration."""
    runs = list(runs)
    names = run_names(runs)
    named = dict(zip(names, runs))
    with_config = {n: (r.report, r.config) for n, r in named.items()}
    parts = [f"<h1>GRIP Studio — {escape(' vs '.join(names))}</h1>",
             f"<p style='font-size:1.25rem'>{escape(compare_sentence(with_config))}</p>",
             runs_table(with_config).to_html(index=False, float_format="%.3f")]
    section = None
    for i, f in enumerate(compare_figures(runs, names)):
        if f.section != section:
            section = f.section
            parts.append(f"<h2>{escape(section)}</h2>")
        parts.append(f.figure.to_html(full_html=False, include_plotlyjs=True if i == 0 else False,
                                      config={"displaylogo": False}))
    parts.append("<h2>Knowledge probes</h2>" + probes_table({n: r.report for n, r in named.items()})
                 .to_html(index=False, float_format="%.3f"))
    parts.append("<h2>Router-restoration attack</h2>" + restoration_table({n: r.report for n, r in named.items()})
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

"""The study's figures, from plain rows (grip_core.runs.study.figure_rows: one dict per scenario x regime x
method x GRIP mode, means and sds over seeds). Plain data in, plotly figures out; no streamlit.

Footguns:
- A row whose number is missing (e.g. no seed reached the forget target: no steps to forget) is drawn as
  a gap with a "not reached" note, never as 0.
"""
from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import BASE, GRIP, STABILITY_TARGET, VANILLA, apply_style

MODE_COLORS = {"off": VANILLA, "update": GRIP, "drift": "#009E73", "gradient": "#56B4E9", "update-relative": "#CC79A7",
               "anchor": "#E69F00"}
MODE_NAMES = {"off": "vanilla", "update": "GRIP update", "drift": "GRIP update + drift", "gradient": "GRIP gradient",
              "anchor": "GRIP update + input anchor"}


def _panels(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["scenario"], r["regime"]) for r in rows})


def _modes(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["grip"] not in seen:
            seen.append(r["grip"])
    return seen


def _bars(rows: list[dict], key: str, title: str, subtitle: str, y_title: str, y_range=None,
          missing_at: float | None = None, missing_note: str = "") -> go.Figure:
    """Grouped bars (method on x, GRIP mode as colour), one panel per scenario x regime. With `missing_at`,
    a row without the number is a hatched bar of that height (hover: `missing_note`), else a gap."""
    panels = _panels(rows)
    fig = make_subplots(rows=1, cols=max(len(panels), 1), shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[f"{s} · {g}" for s, g in panels])
    for col, (sc, rg) in enumerate(panels, start=1):
        sub = [r for r in rows if (r["scenario"], r["regime"]) == (sc, rg)]
        methods = sorted({r["method"] for r in sub})
        for mode in _modes(rows):
            by = {r["method"]: r for r in sub if r["grip"] == mode}
            y = [by[m]["mean"].get(key) if m in by else None for m in methods]
            sd = [by[m]["sd"].get(key) if m in by else None for m in methods]
            gap = [v is None and m in by and missing_at is not None for m, v in zip(methods, y)]
            name = MODE_NAMES.get(mode, mode)
            fig.add_bar(x=methods, y=[missing_at if g else v for v, g in zip(y, gap)], name=name,
                        marker=dict(color=MODE_COLORS.get(mode, BASE), pattern_shape=["/" if g else "" for g in gap],
                                    opacity=[0.35 if g else 1.0 for g in gap]),
                        legendgroup=mode, showlegend=col == 1, offsetgroup=mode,
                        error_y=dict(type="data", array=[s or 0 for s in sd], visible=True, thickness=1.2),
                        customdata=[missing_note if g else f"{v:.3f}" if v is not None else "n/a" for v, g in zip(y, gap)],
                        hovertemplate=f"{sc} · {rg}<br>%{{x}} · {name}<br>{y_title} %{{customdata}}<extra></extra>",
                        row=1, col=col)
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=y_title, row=1, col=1)
    if y_range:
        fig.update_yaxes(range=y_range)
    return apply_style(fig, title, subtitle=subtitle, height=430)


def restoration_figure(rows: list[dict]) -> go.Figure:
    """Restoration recovered (share of forgotten answers that come back when the original routers are put
    back) per method x GRIP mode, one panel per scenario x regime."""
    return _bars(rows, "restoration_recovered", "Restoring the original routers brings answers back",
                 "share of forgotten answers recovered by restoring the base routers (high = the run rerouted)",
                 "restoration recovered", y_range=[0, 1.08])


def steps_figure(rows: list[dict], max_steps: int | None = None) -> go.Figure:
    """Steps until forget EM fell below the target, per method x GRIP mode (missing: never within max_steps)."""
    return _bars(rows, "steps_to_forget", "Steps to forget",
                 "optimizer steps until forget EM fell below the target (mean over the seeds that got there)"
                 + (f"; hatched: no seed got there in {max_steps} steps" if max_steps else ""),
                 "steps", missing_at=max_steps, missing_note=f"not reached in {max_steps} steps")


def stability_forget_figure(rows: list[dict], forget_target: float | None = None) -> go.Figure:
    """Retained-routing stability against forget EM, one point per row, with the 95 % stability bar:
    the paper's claim is a point below the forget target AND above the bar."""
    fig = go.Figure()
    symbols = {}
    for mode in _modes(rows):
        sub = [r for r in rows if r["grip"] == mode and r["mean"].get("forget_em") is not None
               and r["mean"].get("retain_stability") is not None]
        for r in sub:
            symbols.setdefault(r["regime"], ["circle", "diamond", "square", "triangle-up", "x"][len(symbols) % 5])
        fig.add_scatter(
            x=[r["mean"]["forget_em"] for r in sub], y=[r["mean"]["retain_stability"] for r in sub], mode="markers",
            name=MODE_NAMES.get(mode, mode), marker=dict(color=MODE_COLORS.get(mode, BASE), size=11,
                                                         symbol=[symbols[r["regime"]] for r in sub],
                                                         line=dict(width=1, color="white")),
            customdata=[[r["scenario"], r["regime"], r["method"]] for r in sub],
            hovertemplate="%{customdata[0]} · %{customdata[1]} · %{customdata[2]}<br>forget EM %{x:.3f}<br>"
                          "retained stability %{y:.3f}<extra>" + MODE_NAMES.get(mode, mode) + "</extra>")
    fig.add_hline(y=STABILITY_TARGET, line_dash="dash", line_color=BASE,
                  annotation_text=f"{STABILITY_TARGET:.0%} stability bar", annotation_position="bottom right")
    if forget_target is not None:
        fig.add_vline(x=forget_target, line_dash="dot", line_color=BASE,
                      annotation_text=f"forget target {forget_target:g}", annotation_position="top right")
    fig.update_xaxes(title_text="forget EM (lower = forgot more)", rangemode="tozero")
    fig.update_yaxes(title_text="retained-routing stability")
    regimes = ", ".join(f"{k}: {v}" for k, v in symbols.items())
    return apply_style(fig, "Retained stability vs forgetting", subtitle=f"one point per method × scenario × regime "
                       f"(marker: {regimes}); the claim holds left of the target and above the bar", height=480)


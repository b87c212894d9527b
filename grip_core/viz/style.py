"""One look for every GRIP Studio figure: colours, fonts, layout, HTML export.

Colours are Okabe-Ito (colour-blind safe) and fixed by MEANING, so a speaker can say
"orange is vanilla, blue is GRIP" once and it holds on every page, notebook and export:

    vanilla  vermillion   GRIP  blue     base / reference  grey
    forget   reddish purple    retain  bluish green    holdout  orange
"""
from __future__ import annotations

import plotly.graph_objects as go

from ..fmt import pct  # noqa: F401  (the one percentage format; re-exported as viz.pct)
from ..runs.verdict import STABLE_RETAIN

VANILLA = "#D55E00"
GRIP = "#0072B2"
BASE = "#7F7F7F"
DRIFT = "#E69F00"          # input-drift share of a routing shift
ROUTER = "#CC79A7"         # router-weight share of a routing shift

# One colour per verdict kind (grip_core.runs.verdict), on Compare and Diagnose alike.
VERDICT_COLORS = {"erased": "#009E73", "partially erased": "#56B4E9", "mixed": "#E69F00", "rerouted": VANILLA,
                  "collapsed": "#000000", "not forgotten": BASE, "cannot diagnose": BASE}

SPLIT_COLORS = {"forget": "#CC79A7", "retain": "#009E73", "holdout": "#E69F00",
                "paraphrase_forget": "#F0A3D3", "paraphrase_retain": "#7FD1B9", "prompt": "#56B4E9"}

# Categorical colours for experts (up to 24, then they repeat).
EXPERT_COLORS = ["#1F77B4", "#FF7F0E", "#2CA02C", "#D62728", "#9467BD", "#8C564B", "#E377C2", "#7F7F7F",
                 "#BCBD22", "#17BECF", "#393B79", "#E7BA52", "#637939", "#AD494A", "#7B4173", "#3182BD",
                 "#F28E2B", "#59A14F", "#B07AA1", "#9C755F", "#76B7B2", "#EDC948", "#FF9DA7", "#4E79A7"]

SEQUENTIAL = "Blues"
DIVERGING = "RdBu_r"       # red = more load after unlearning, blue = less; white = no change (zmid=0)
NULLSPACE = "Viridis"

FONT = dict(family="Inter, Helvetica Neue, Arial, sans-serif", size=14, color="#222")
STABILITY_TARGET = STABLE_RETAIN   # the GRIP paper's headline: > 95 % of retained routing kept (the verdict's bar)


def run_color(name: str, grip_mode: str | None = None, index: int = 0) -> str:
    """Colour of a run: vanilla (GRIP off) vs GRIP, whatever the method; others by position."""
    mode = (grip_mode or "").lower()
    low = (name or "").lower()
    if mode in ("off", "vanilla") or (not mode and "vanilla" in low):
        return VANILLA
    if mode or "grip" in low:
        return GRIP
    if low in ("base", "original"):
        return BASE
    return EXPERT_COLORS[index % len(EXPERT_COLORS)]


def expert_color(e: int) -> str:
    return EXPERT_COLORS[int(e) % len(EXPERT_COLORS)]


def apply_style(fig: go.Figure, title: str | None = None, *, height: int | None = None,
                subtitle: str | None = None, legend: bool | None = None) -> go.Figure:
    """The house layout: white template, readable fonts, bold title top-left with an optional subtitle
    (plotly's own subtitle, so it never overlaps), horizontal legend under the plot."""
    top = 40 if not title else (98 if subtitle else 66)
    fig.update_layout(
        template="plotly_white", font=FONT,
        title=dict(text=f"<b>{title}</b>" if title else None, x=0.0, xref="paper", xanchor="left",
                   y=1.0, yref="container", yanchor="top", pad=dict(t=14), font=dict(size=18, color="#1F2328"),
                   subtitle=dict(text=subtitle, font=dict(size=13, color="#5A6472")) if subtitle else None),
        margin=dict(l=70, r=30, t=top, b=60),
        hoverlabel=dict(font_size=13, font_family=FONT["family"]),
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="left", x=0.0, font=dict(size=13)))
    if height:
        fig.update_layout(height=height)
    if legend is not None:
        fig.update_layout(showlegend=legend)
    return fig


def to_html(fig: go.Figure, offline: bool = True) -> str:
    """A standalone HTML page of the figure; `offline` embeds plotly.js (~4 MB) so it opens without internet."""
    return fig.to_html(include_plotlyjs=True if offline else "cdn", full_html=True,
                       config={"displaylogo": False, "toImageButtonOptions": {"format": "png", "scale": 2}})



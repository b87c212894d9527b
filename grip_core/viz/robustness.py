"""Robustness figures: the attack matrix (how much came back) and the update ledger (where ΔΘ went).

Plain data in, plotly figures out:
- `robustness_heatmap(cells)`: cells = [{"label": "graddiff · vanilla", "robustness": [row, ...]}, ...]
  (rows of grip_core.attacks' shape); one heatmap row per cell, one column per attack; colour =
  recovered (share of the forgotten answers the attack brought back); hover = setting, base /
  unlearned / attacked EM, mean answer probabilities, routing shift, n.
- `ledger_bars(cells)`: share of ‖ΔΘ‖² by parameter group, one stacked bar per cell ({"label", "ledger":
  {group: share}}).
- `ledger_expert_heatmap(rows)`: one run's routed-expert shares, MoE layer x expert.

Run names are long ("GradDiff · GRIP update · shortcut · seed 0 · 60 steps") and these figures often get half
a page: row labels are wrapped (`wrap_label`) and y margins sized to them, so the cells keep the width.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import plotly.graph_objects as go

from ..fmt import pct
from .style import BASE, ROUTER, SEQUENTIAL, apply_style

ATTACK_NAMES = {"restoration": "restore routers", "expert_forcing": "expert forcing",
                "relearn_router": "relearn (routers)", "relearn_full": "relearn (all)",
                "relearn_related": "relearn (related facts)", "quant_int8": "INT8", "quant_nf4": "NF4",
                "quant_int4": "INT4", "paraphrase": "paraphrase"}
GROUP_NAMES = {"router": "routers", "routed_expert": "routed experts", "shared_expert": "shared experts",
               "attention": "attention", "embedding": "embeddings", "norm": "norms", "other": "other"}


def ledger_shares(rows: Sequence[Mapping]) -> dict[str, float]:
    """Share of the update by group (summed over layers and experts), every group present (0 where none):
    an update ledger's rows (grip_core.attacks.ledger) -> {group: share}. Pure Python."""
    out = dict.fromkeys(GROUP_NAMES, 0.0)
    for r in rows:
        out[r["group"]] = out.get(r["group"], 0.0) + float(r["share"])
    return out


GROUP_COLORS = {"router": ROUTER, "routed_expert": "#0072B2", "shared_expert": "#56B4E9", "attention": "#009E73",
                "embedding": "#E69F00", "norm": BASE, "other": "#000000"}


def _num(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def attack_columns(cells: Sequence[Mapping]) -> list[str]:
    """Attack names in order of first appearance over the cells."""
    out: list[str] = []
    for c in cells:
        for r in c.get("robustness") or []:
            if r["attack"] not in out:
                out.append(r["attack"])
    return out


def wrap_label(label: str, width: int = 24, sep: str = " · ") -> str:
    """A long axis label on several lines ("<br>"), broken between its `sep`-joined parts (or its words when
    it has none), each line at most `width` characters where a part allows: run names such as
    "GradDiff · GRIP update · shortcut · seed 0 · 60 steps" would otherwise take half a figure's width."""
    parts = label.split(sep) if sep in label else label.split(" ")
    joiner = sep if sep in label else " "
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + len(joiner) + len(part) <= width:
            lines[-1] += joiner + part
        else:
            lines.append(part)
    return "<br>".join(lines)


def robustness_heatmap(cells: Sequence[Mapping], title: str | None = "Did it really forget?",
                       subtitle: str | None = "share of the forgotten answers brought back") -> go.Figure:
    """Method x mode rows, attack columns, colour = recovered; blank where nothing was forgotten.

    Footgun: row labels are wrapped (`wrap_label`) and must stay unique (plotly merges equal y values);
    the hover names each row in full.
    """
    columns = attack_columns(cells)
    labels = [str(c.get("label", "?")) for c in cells]
    z, text, hover = [], [], []
    for c, label in zip(cells, labels):
        by = {r["attack"]: r for r in c.get("robustness") or []}
        zr, tr, hr = [], [], []
        for a in columns:
            r = by.get(a)
            head = f"<b>{label}</b> · {ATTACK_NAMES.get(a, a)}<br>"
            if r is None:
                zr.append(math.nan), tr.append(""), hr.append(head + "not run")
                continue
            rec = _num(r.get("recovered"))
            zr.append(rec)
            tr.append(pct(rec, digits=0, missing="—"))
            hr.append(f"{head}{r.get('setting', '')}<br>recovered {pct(rec, missing='— (nothing forgotten)')}"
                      f"<br>EM: base {pct(r.get('base_em'), missing='—')} (under attack) · unlearned "
                      f"{pct(r.get('unlearned_em'), missing='—')} · attacked {pct(r.get('attacked_em'), missing='—')}"
                      f"<br>answer prob.: base {pct(r.get('base_prob'), missing='—')} · unlearned "
                      f"{pct(r.get('unlearned_prob'), missing='—')} · attacked {pct(r.get('attacked_prob'), missing='—')}"
                      f"<br>routing shift {pct(r.get('routing_shift'), missing='—')} · n = {r.get('n')}")
        z.append(zr), text.append(tr), hover.append(hr)
    rows = [wrap_label(label) for label in labels]
    lines = max((r.count("<br>") + 1 for r in rows), default=1)
    fig = go.Figure(go.Heatmap(
        z=z, x=[wrap_label(ATTACK_NAMES.get(a, a), width=10) for a in columns], y=rows,
        zmin=0, zmax=1, colorscale="Reds", text=text, texttemplate="%{text}", textfont=dict(size=14),
        customdata=hover, hovertemplate="%{customdata}<extra></extra>", xgap=2, ygap=2,
        colorbar=dict(title=dict(text="recovered", side="right"), tickformat=".0%", thickness=14,
                      tickvals=[0, 0.5, 1])))
    fig.update_xaxes(tickangle=0)                      # wrapped names, never slanted
    fig.update_yaxes(autorange="reversed")
    fig = apply_style(fig, title, subtitle=subtitle, height=170 + max(48, 18 * lines + 14) * max(len(cells), 2))
    fig.update_layout(margin=dict(l=10, b=50))
    fig.update_yaxes(automargin=True)
    return fig


def ledger_bars(cells: Sequence[Mapping], title: str | None = "Where did the update land?",
                subtitle: str | None = "share of ‖ΔΘ‖² by parameter group") -> go.Figure:
    """One stacked horizontal bar per cell: its ledger summary {group: share}. Row labels wrapped as in
    `robustness_heatmap` (unique labels stay unique); the legend sits under the axis, in pixels from the bottom."""
    fig = go.Figure()
    labels = [str(c.get("label", "?")) for c in cells]
    rows = [wrap_label(label) for label in labels]
    lines = max((r.count("<br>") + 1 for r in rows), default=1)
    groups = [g for g in GROUP_NAMES if any(_num((c.get("ledger") or {}).get(g)) > 0 for c in cells)]
    for g in groups:
        shares = [_num((c.get("ledger") or {}).get(g)) for c in cells]
        fig.add_trace(go.Bar(y=rows, x=shares, orientation="h", name=GROUP_NAMES[g], customdata=labels,
                             marker_color=GROUP_COLORS[g], text=[pct(s, digits=0, missing="") for s in shares],
                             hovertemplate=f"<b>%{{customdata}}</b><br>{GROUP_NAMES[g]}: %{{x:.1%}}<extra></extra>"))
    fig.update_layout(barmode="stack", xaxis=dict(range=[0, 1], tickformat=".0%"))
    fig.update_yaxes(autorange="reversed", automargin=True)
    fig = apply_style(fig, title, subtitle=subtitle, height=210 + max(44, 18 * lines + 14) * max(len(cells), 2))
    fig.update_layout(margin=dict(l=10, b=70), legend=dict(yref="container", y=0.0, yanchor="bottom"))
    return fig


def ledger_expert_heatmap(rows: Sequence[Mapping], title: str | None = "Routed experts' share of the update",
                          subtitle: str | None = "share of ‖ΔΘ‖² per MoE layer and expert") -> go.Figure:
    """One run's routed_expert ledger rows as a layer x expert heatmap (share of the whole update)."""
    experts = [r for r in rows if r.get("group") == "routed_expert" and r.get("expert") is not None]
    layers = sorted({int(r["layer"]) for r in experts})
    n_exp = 1 + max((int(r["expert"]) for r in experts), default=-1)
    z = [[0.0] * n_exp for _ in layers]
    for r in experts:
        z[layers.index(int(r["layer"]))][int(r["expert"])] += _num(r.get("share"))
    fig = go.Figure(go.Heatmap(z=z, x=[f"E{e}" for e in range(n_exp)], y=[f"layer {l}" for l in layers],
                               colorscale=SEQUENTIAL, zmin=0, colorbar=dict(title="share", tickformat=".0%"),
                               hovertemplate="%{y} · %{x}: %{z:.2%} of ‖ΔΘ‖²<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    return apply_style(fig, title, subtitle=subtitle, height=max(240, 120 + 40 * len(layers)))


__all__ = ["ATTACK_NAMES", "GROUP_NAMES", "GROUP_COLORS", "attack_columns", "wrap_label", "robustness_heatmap",
           "ledger_bars", "ledger_expert_heatmap"]

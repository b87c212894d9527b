"""Routing figures: expert load, expert x label, token x layer table, load entropy, routing shift.

Inputs are plain data: `routing_summary(trace)` dicts, metrics' `.to_dict()` results, or
the per-layer lists a saved run's summary holds. Every heatmap has y = MoE layer (decoder
index, first layer at the top) and x = expert, and its hover shows the exact number.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from .style import (DIVERGING, EXPERT_COLORS, NULLSPACE, SEQUENTIAL, apply_style, expert_color, run_color)


def _layer_names(layers: Sequence[int]) -> list[str]:
    return [f"layer {int(l)}" for l in layers]


def _matrix(rows: Sequence[Sequence[float]]) -> np.ndarray:
    """Ragged rows (E may differ per layer) padded with NaN into an (L, E_max) float array."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        out[i, :len(r)] = [np.nan if v is None else v for v in r]
    return out


def _cell_text(z: np.ndarray, fmt) -> list[list[str]] | None:
    if z.size == 0 or z.shape[0] * z.shape[1] > 400:
        return None
    return [["" if np.isnan(v) else fmt(v) for v in row] for row in z]


def _add_shared_column(fig: go.Figure, rows: Sequence[str], shared: int, num_experts: int) -> None:
    """Grey "shared" column(s) right of the routed experts: always-on experts, which no router selects,
    so they draw no routing slots; the column says "always on" instead of a number (Qwen2-MoE, DeepSeek, Llama4).

    Footguns: a one-column Heatmap trace on a category axis is drawn across the rest of the plot, so
    the column is an invisible marker trace (its category slot and hover), a grey shape and a label.
    """
    if shared <= 0:
        return
    names = ["shared"] if shared == 1 else [f"shared {i}" for i in range(shared)]
    for i, name in enumerate(names):
        fig.add_trace(go.Scatter(
            x=[name] * len(rows), y=list(rows), mode="markers", marker=dict(size=14, opacity=0), showlegend=False,
            hovertemplate="%{y}, %{x} expert<br>always on: every token passes through it,<br>"
                          "no router selects it (not in the routed-expert shares)<extra></extra>"))
        x = num_experts + i                                   # its category index on the x axis
        fig.add_shape(type="rect", xref="x", yref="paper", x0=x - 0.45, x1=x + 0.45, y0=0, y1=1,
                      fillcolor="#D9D9D9", line=dict(width=0), layer="below")
        fig.add_annotation(x=name, y=0.5, xref="x", yref="paper", text="always on", textangle=-90,
                           showarrow=False, font=dict(size=11, color="#444"))


def load_heatmap(summary: Mapping, title: str | None = None, subtitle: str | None = None,
                 shared: int = 0) -> go.Figure:
    """Layer x expert share of routing slots (%), from `routing_summary(trace)`.

    A balanced layer shows k/E... every cell ~ 100/E %; a hot cell is an expert that
    draws that share of all top-k slots of the layer. `shared` > 0 adds that many grey
    "always on" columns for the model's shared experts (they take no routing slots).
    """
    z = _matrix(summary["load"]) * 100
    E = z.shape[1]
    counts = _matrix(summary.get("counts") or np.zeros_like(z).tolist())
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"E{e}" for e in range(E)], y=_layer_names(summary["layers"]), colorscale=SEQUENTIAL, zmin=0,
        colorbar=dict(title=dict(text="% of slots", side="right"), ticksuffix=" %"),
        customdata=counts, text=_cell_text(z, lambda v: f"{v:.0f}"), texttemplate="%{text}" if E <= 16 else None,
        hovertemplate="%{y}, expert %{x}<br>%{z:.2f} % of routing slots<br>%{customdata:,.0f} slots<extra></extra>",
        xgap=1, ygap=1))
    name = summary.get("name") or ""
    n = summary.get("num_tokens")
    apply_style(fig, title or f"Expert load per layer{' — ' + name if name else ''}",
                subtitle=subtitle or (f"share of top-{summary.get('top_k', 'k')} slots · {n:,} tokens · "
                                      f"uniform = {100 / max(E, 1):.1f} %" if n is not None else None),
                height=max(300, 90 + 42 * z.shape[0]))
    _add_shared_column(fig, _layer_names(summary["layers"]), shared, E)
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="expert" + (" (routed, then shared)" if shared else ""), side="bottom")
    return fig


def expert_label_heatmap(matrix: Mapping, nmi: float | None = None, title: str | None = None,
                         label_name: str = "domain", shared: int = 0) -> go.Figure:
    """Label (e.g. domain) x expert routing frequencies, from `expert_by_label_matrix(...).to_dict()`.

    Row-normalised: row r shows where label r's tokens were sent (each row sums to 100 %) over the
    routed experts; `shared` > 0 adds grey "always on" columns for the shared experts.
    """
    z = np.asarray(matrix["matrix"], dtype=float)
    norm = matrix.get("normalize", "row")
    scale = 100.0 if norm in ("row", "col", "all") else 1.0
    z = z * scale
    counts = np.asarray(matrix.get("counts", matrix["matrix"]), dtype=float)
    E = z.shape[1]
    unit = {"row": f"% of the {label_name}'s slots", "col": "% of the expert's slots",
            "all": "% of all slots"}.get(norm, "slots")
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"E{e}" for e in range(E)], y=list(matrix["labels"]), colorscale=SEQUENTIAL, zmin=0,
        customdata=counts, text=_cell_text(z, lambda v: f"{v:.0f}"), texttemplate="%{text}" if E <= 16 else None,
        colorbar=dict(title=dict(text=unit, side="right")),
        hovertemplate="%{y} → expert %{x}<br>%{z:.1f} " + ("%" if scale == 100 else "") +
                      "<br>%{customdata:,.0f} slots<extra></extra>", xgap=1, ygap=1))
    sub = unit
    if nmi is not None:
        sub += f" · NMI {nmi:.2f} (0 = no specialisation, 1 = one-to-one)"
    apply_style(fig, title or "Which experts each domain uses", subtitle=sub, height=max(300, 110 + 40 * z.shape[0]))
    _add_shared_column(fig, list(matrix["labels"]), shared, E)
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="expert" + (" (routed, then shared)" if shared else ""))
    return fig


def token_routing_table(routing: Mapping, title: str | None = None) -> go.Figure:
    """Token x layer table for a typed prompt, from `token_routing(trace, tokens)`.

    Each cell lists the token's top-k experts at that layer (router order) and is coloured
    by its top-1 expert; hover shows the router logits of the selected experts.
    """
    tokens, layers = routing["tokens"], routing["layers"]
    experts, logits, top1 = routing["experts"], routing["logits"], routing["top1"]
    n, L = len(tokens), len(layers)
    E = max(routing["num_experts"]) if routing.get("num_experts") else 1 + max(
        (max(e) for row in experts for e in row), default=0)
    z = np.array(top1, dtype=float).reshape(n, L)
    text = [[" ".join(str(e) for e in experts[i][l]) for l in range(L)] for i in range(n)]
    hover = [["<br>".join(f"expert {e}: logit {g:+.2f}" for e, g in zip(experts[i][l], logits[i][l]))
              for l in range(L)] for i in range(n)]
    rows = [f"{i:>3} {t}" for i, t in enumerate(tokens)]
    # discrete colourscale: expert e -> its categorical colour
    colors = [expert_color(e) for e in range(E)]
    scale = []
    for e, c in enumerate(colors):
        scale += [[e / E, c], [(e + 1) / E, c]]
    fig = go.Figure(go.Heatmap(
        z=z, x=_layer_names(layers), y=rows, zmin=-0.5, zmax=E - 0.5, colorscale=scale, showscale=True,
        colorbar=dict(title=dict(text="top-1 expert", side="right"), tickvals=list(range(E)),
                      ticktext=[f"E{e}" for e in range(E)]),
        text=text, texttemplate="%{text}", textfont=dict(color="white", size=13), customdata=hover,
        hovertemplate="token %{y}<br>%{x}<br>%{customdata}<extra></extra>", xgap=2, ygap=2))
    apply_style(fig, title or "Experts chosen per token and layer",
                subtitle=f"cell = top-{len(experts[0][0]) if n else 'k'} experts (router order) · "
                         "colour = top-1 expert · tokens: · = space, ⏎ = newline", height=max(260, 110 + 26 * n))
    fig.update_yaxes(autorange="reversed", title=None, tickfont=dict(family="Menlo, Consolas, monospace", size=13))
    fig.update_xaxes(side="top", title=None)
    return fig


def load_entropy_bars(series: Mapping[str, Mapping], title: str | None = None) -> go.Figure:
    """Normalised expert-load entropy per layer for one or more models/splits.

    `series`: name -> {"layers": [...], "entropy": [...]} (e.g. routing_summary dicts), or
    name -> (layers, values).
    """
    fig = go.Figure()
    bars = sum(len(s["entropy"] if isinstance(s, Mapping) else s[1]) for s in series.values())
    for i, (name, s) in enumerate(series.items()):
        layers, ent = (s["layers"], s["entropy"]) if isinstance(s, Mapping) else s
        fig.add_bar(x=_layer_names(layers), y=list(ent), name=name, marker_color=run_color(name, index=i),
                    text=[f"{v:.2f}" for v in ent] if bars <= 8 else None, textposition="outside",
                    textfont=dict(size=11),
                    hovertemplate=f"{name}<br>%{{x}}: H / log E = %{{y:.4f}}<extra></extra>")
    apply_style(fig, title or "Expert-load entropy per layer",
                subtitle="H / log E · 1 = balanced, 0 = one expert takes all",
                height=380, legend=len(series) > 1)
    fig.update_yaxes(range=[0, 1.1], title="normalised entropy")
    fig.update_layout(barmode="group")
    return fig


def routing_shift_heatmap(freq_change: Sequence[Sequence[float]], layers: Sequence[int], title: str | None = None,
                          subtitle: str | None = None, zmax: float | None = None, freq_base=None,
                          freq_new=None, cell_text: bool = True) -> go.Figure:
    """Layer x expert change in routing frequency (percentage points), unlearned − base.

    Diverging scale centred at 0 (`zmid=0`): red = the expert gets more slots after
    unlearning, blue = fewer. Pass the same `zmax` to figures shown side by side
    (`shared_shift_range`) so equal colours mean equal changes.
    """
    z = _matrix(freq_change) * 100
    E = z.shape[1]
    lim = zmax if zmax is not None else max(float(np.nanmax(np.abs(z))) if z.size else 0.0, 0.5)
    custom = None
    hover = "%{y}, expert %{x}<br>change %{z:+.2f} pp<extra></extra>"
    if freq_base is not None and freq_new is not None:
        custom = np.stack([_matrix(freq_base) * 100, _matrix(freq_new) * 100], axis=-1)
        hover = ("%{y}, expert %{x}<br>change %{z:+.2f} pp<br>base %{customdata[0]:.2f} % → "
                 "unlearned %{customdata[1]:.2f} %<extra></extra>")
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"E{e}" for e in range(E)], y=_layer_names(layers), colorscale=DIVERGING, zmid=0, zmin=-lim, zmax=lim,
        customdata=custom, text=_cell_text(z, lambda v: f"{v:+.1f}" if abs(v) >= 0.05 else "·") if cell_text else None,
        texttemplate="%{text}" if E <= 16 and cell_text else None,
        colorbar=dict(title=dict(text="Δ pp", side="right")), hovertemplate=hover, xgap=1, ygap=1))
    apply_style(fig, title or "Routing shift per layer and expert",
                subtitle=subtitle or "Δ share of routing slots, unlearned − base (pp)",
                height=max(300, 100 + 42 * z.shape[0]))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="expert")
    return fig


def shared_shift_range(*matrices: Sequence[Sequence[float]], floor: float = 0.5) -> float:
    """The symmetric colour limit (pp) that fits every matrix: use it for side-by-side shift heatmaps."""
    vals = [abs(v) * 100 for m in matrices if m for row in m for v in row if v is not None and v == v]
    return max(max(vals, default=0.0), floor)


def nullspace_heatmap(ranks: Sequence[Sequence[float]], layers: Sequence[int], dim: int | None = None,
                      title: str | None = None, subtitle: str | None = None) -> go.Figure:
    """Layer x expert null-space rank (free dimensions of each router row under GRIP's constraint 1).

    0 = the row is frozen (its retained inputs span every direction); `dim` = fully free.
    """
    z = _matrix(ranks)
    E = z.shape[1]
    zmax = dim if dim else (float(np.nanmax(z)) if z.size and not np.all(np.isnan(z)) else 1.0)
    hover = "%{y}, expert %{x}<br>null-space rank %{z:.0f}" + (f" of {dim}" if dim else "") + "<extra></extra>"
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"E{e}" for e in range(E)], y=_layer_names(layers), colorscale=NULLSPACE, zmin=0, zmax=zmax,
        text=_cell_text(z, lambda v: f"{v:.0f}"), texttemplate="%{text}" if E <= 16 else None,
        colorbar=dict(title=dict(text="free dims", side="right")), hovertemplate=hover, xgap=1, ygap=1))
    apply_style(fig, title or "GRIP null-space rank per router row",
                subtitle=subtitle or ("free directions per router row" + (f" (of d = {dim})" if dim else "") +
                                      " · 0 = frozen"),
                height=max(300, 100 + 42 * z.shape[0]))
    fig.update_yaxes(autorange="reversed", title=None)
    fig.update_xaxes(title="expert")
    return fig


__all__ = ["load_heatmap", "expert_label_heatmap", "token_routing_table", "load_entropy_bars",
           "routing_shift_heatmap", "shared_shift_range", "nullspace_heatmap", "EXPERT_COLORS"]

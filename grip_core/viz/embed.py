"""2-D views of router inputs: PCA (instant) and UMAP (PCA to 50 dims first), and their scatter figures.

The projection is FIT on the "before" inputs and only APPLIED to the "after" inputs, so
before/after unlearning share axes: a point that moved, moved in the model, not in the map.
UMAP's first fit in a process compiles numba code (~40 s on 2 cores); later fits take seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .style import SPLIT_COLORS, apply_style, expert_color


@dataclass
class Projection:
    """A fitted 2-D projection: `transform(X)` maps (n, d) router inputs to (n, 2)."""

    method: str                       # "pca" | "umap"
    pca: object                       # sklearn PCA (to 2 dims for "pca", to <= 50 for "umap")
    umap: object | None = None
    explained: list[float] = field(default_factory=list)   # PCA explained variance ratio of the 2 axes

    def transform(self, X) -> np.ndarray:
        Z = self.pca.transform(np.asarray(X, dtype=np.float32))
        if self.umap is None:
            return Z[:, :2].astype(np.float32)
        return np.asarray(self.umap.transform(Z), dtype=np.float32)


def fit_projection(X, method: str = "pca", seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
                   pca_dims: int = 50) -> tuple[Projection, np.ndarray]:
    """Fit on X (n, d); return the projection and X's 2-D coordinates."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 3:
        raise ValueError(f"need at least 3 router inputs (n, d) to project, got shape {X.shape}")
    if method == "pca":
        pca = PCA(n_components=2, random_state=seed).fit(X)
        return Projection("pca", pca, None, pca.explained_variance_ratio_.tolist()), pca.transform(X).astype(np.float32)
    if method != "umap":
        raise ValueError(f"method must be 'pca' or 'umap', not {method!r}")
    import umap  # heavy import (numba); only when asked

    dims = int(min(pca_dims, X.shape[1], X.shape[0] - 1))
    pca = PCA(n_components=dims, random_state=seed).fit(X)
    Z = pca.transform(X)
    reducer = umap.UMAP(n_components=2, n_neighbors=int(min(n_neighbors, X.shape[0] - 1)), min_dist=min_dist,
                        random_state=seed, n_jobs=1)
    coords = reducer.fit_transform(Z)
    return Projection("umap", pca, reducer, pca.explained_variance_ratio_[:2].tolist()), np.asarray(coords, np.float32)


def umap_coords(X_before, X_after=None, seed: int = 0) -> dict:
    """UMAP fitted on `X_before`, applied to `X_after`: {"before": (n, 2), "after": (m, 2) or None}.

    Plain arrays in and out, so it can run in a worker process (the dashboard does, off its GIL).
    """
    proj, before = fit_projection(X_before, "umap", seed=seed)
    return {"before": before, "after": proj.transform(X_after) if X_after is not None else None}


def _color_map(labels: Sequence) -> dict:
    uniq = list(dict.fromkeys(labels))
    if all(isinstance(v, (int, np.integer)) for v in uniq):
        return {v: expert_color(v) for v in uniq}
    out = {}
    for i, v in enumerate(uniq):
        out[v] = SPLIT_COLORS.get(str(v)) or expert_color(i)
    return out


def _label_name(v) -> str:
    return f"expert {v}" if isinstance(v, (int, np.integer)) else str(v)


def _sorted_labels(labels: Sequence) -> list:
    uniq = list(dict.fromkeys(labels))
    try:
        return sorted(uniq)
    except TypeError:
        return uniq


def _add_points(fig, coords, labels, hover, cmap, row=None, col=None, in_legend=(), size=5, rank=None):
    """One trace per label; a label already in `in_legend` (shown by another panel) gets no second entry;
    `rank`: label -> legend position (default: plotly's trace order)."""
    coords = np.asarray(coords)
    labels = list(labels)
    idx_all = np.arange(len(labels))
    for v in _sorted_labels(labels):
        idx = idx_all[np.array([l == v for l in labels])]
        kw = dict(row=row, col=col) if row else {}
        fig.add_trace(go.Scattergl(
            x=coords[idx, 0], y=coords[idx, 1], mode="markers", name=_label_name(v), legendgroup=str(v),
            showlegend=v not in in_legend, legendrank=1000 + (rank or {}).get(v, 0),
            marker=dict(color=cmap[v], size=size, opacity=0.8, line=dict(width=0)),
            customdata=idx, text=None if hover is None else [hover[i] for i in idx],
            hovertemplate="%{text}<extra>" + _label_name(v) + "</extra>" if hover is not None else None), **kw)


def embedding_scatter(coords, labels: Sequence, hover: Sequence[str] | None = None, title: str | None = None,
                      subtitle: str | None = None, axis_names: tuple[str, str] = ("dim 1", "dim 2")) -> go.Figure:
    """One scatter of 2-D coordinates coloured by label (expert ids or split names).

    Each trace's `customdata` holds the points' row indices into `coords`, so a lasso
    selection maps back to tokens whatever trace it hit.
    """
    fig = go.Figure()
    _add_points(fig, coords, labels, hover, _color_map(labels))
    apply_style(fig, title or "Router inputs", subtitle=subtitle, height=560)
    fig.update_layout(dragmode="lasso", legend=dict(itemsizing="constant"))
    fig.update_xaxes(title=axis_names[0], zeroline=False)
    fig.update_yaxes(title=axis_names[1], zeroline=False)
    return fig


def embedding_pair(before, after, labels_before: Sequence, labels_after: Sequence,
                   hover_before: Sequence[str] | None = None, hover_after: Sequence[str] | None = None,
                   title: str | None = None, subtitle: str | None = None, names=("before unlearning", "after unlearning"),
                   axis_names: tuple[str, str] = ("dim 1", "dim 2")) -> go.Figure:
    """Before / after unlearning side by side on SHARED axes (one projection fitted on `before`).

    customdata = row index; the "after" points' indices are offset by len(before). The legend lists
    every label of BOTH panels (one entry per label, shared by the panels through its legendgroup):
    an expert that forget tokens reach only after unlearning is the point of the view.
    """
    fig = make_subplots(rows=1, cols=2, shared_xaxes=True, shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=names)
    cmap = _color_map(list(labels_before) + list(labels_after))
    rank = {v: i for i, v in enumerate(_sorted_labels(list(labels_before) + list(labels_after)))}
    _add_points(fig, before, labels_before, hover_before, cmap, 1, 1, rank=rank)
    n0 = len(labels_before)
    start = len(fig.data)
    _add_points(fig, after, labels_after, hover_after, cmap, 1, 2, in_legend=set(labels_before), rank=rank)
    for tr in fig.data[start:]:
        tr.customdata = np.asarray(tr.customdata) + n0
    apply_style(fig, title or "Router inputs before and after unlearning", subtitle=subtitle, height=560)
    fig.update_layout(dragmode="lasso", legend=dict(itemsizing="constant"))
    fig.update_xaxes(title=axis_names[0], zeroline=False)
    fig.update_yaxes(title=axis_names[1], zeroline=False, col=1)
    fig.update_layout(xaxis2=dict(matches="x"), yaxis2=dict(matches="y"))   # one zoom, one scale
    return fig


def selected_rows(selection, ) -> list[int]:
    """Row indices (customdata) of the points in a Streamlit/plotly selection event's `points` list."""
    rows = []
    for p in (selection or []):
        cd = p.get("customdata") if isinstance(p, dict) else None
        if isinstance(cd, (list, tuple)):
            cd = cd[0] if cd else None
        if cd is not None:
            rows.append(int(cd))
    return sorted(set(rows))

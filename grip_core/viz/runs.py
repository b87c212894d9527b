"""Run figures: stability per layer (with router/drift attribution), forget-set selection shift,
and loss / stability curves from a run's step log; `compare_figures`, the one list of figures
that compares saved runs (the Compare page and the HTML export both show it).

Runs are passed as `{name: data}` in display order; a run's colour comes from its name or
GRIP mode (`style.run_color`): vanilla is always vermillion, GRIP always blue.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .report import grip_mode, null_space_ranks, run_layer_series, run_names, step_log_with_base
from .robustness import ledger_bars, ledger_expert_heatmap, ledger_shares, robustness_heatmap
from .routing import nullspace_heatmap, routing_shift_heatmap, shared_shift_range
from .style import BASE, STABILITY_TARGET, apply_style, run_color

ATTRIBUTION_BARS = (
    ("stability_actual", "actual (new router, new inputs)", None),
    ("stability_router_only", "router only (new router, original inputs)", "#4D4D4D"),
    ("stability_drift_only", "drift only (original router, new inputs)", "#B3B3B3"),
)


def _layer_names(layers: Sequence[int]) -> list[str]:
    return [f"layer {int(l)}" for l in layers]


def _target_line(fig: go.Figure, y: float = STABILITY_TARGET) -> None:
    """The paper's bar (dashed); explained in the subtitle, so no label sits on the bars."""
    fig.add_hline(y=100 * y, line=dict(color="#333", width=1.5, dash="dash"))


def stability_bars(layers: Sequence[int], attribution: Mapping[str, Sequence[float]], name: str = "",
                   color: str | None = None, title: str | None = None) -> go.Figure:
    """Retained routing stability per layer, decomposed: actual / router-only / drift-only.

    `attribution` holds per-layer lists under stability_actual / stability_router_only /
    stability_drift_only (AttributionResult.per_layer, or a saved summary). Router-only near
    100 % with actual lower means the shift came from the inputs drifting, not the router.
    """
    color = color or run_color(name)
    fig = go.Figure()
    labels = len(layers) <= 3                  # 3 bars a layer: numbers only while they fit
    for key, label, c in ATTRIBUTION_BARS:
        vals = attribution.get(key)
        if vals is None:
            continue
        ys = [None if v is None else 100 * v for v in vals]
        fig.add_bar(x=_layer_names(layers), y=ys, name=label, marker_color=c or color,
                    text=[("" if v is None else f"{v:.1f}") for v in ys] if labels else None, textposition="outside",
                    cliponaxis=False,
                    hovertemplate=f"{label}<br>%{{x}}: %{{y:.2f}} % of retained tokens kept their top-k set"
                                  "<extra></extra>")
    _target_line(fig)
    apply_style(fig, title or (name or "Retained routing stability per layer"),
                subtitle="retained routing stability per layer: actual · router only · drift only",
                height=440)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(range=[0, 112], title="stability (%)", ticksuffix=" %")
    return fig


def per_layer_compare_bars(runs: Mapping[str, Mapping], key: str, title: str, subtitle: str, ytitle: str,
                           target: float | None = None, percent: bool = True,
                           colors: Mapping[str, str] | None = None) -> go.Figure:
    """Grouped bars: one colour per run, one group per layer. runs: name -> {"layers": [...], key: [...]}."""
    fig = go.Figure()
    scale = 100.0 if percent else 1.0
    for i, (name, r) in enumerate(runs.items()):
        vals = r.get(key)
        if vals is None:
            continue
        ys = [None if v is None else scale * v for v in vals]
        color = (colors or {}).get(name) or run_color(name, r.get("grip_mode"), i)
        fig.add_bar(x=_layer_names(r["layers"]), y=ys, name=name, marker_color=color,
                    text=[("" if v is None else (f"{v:.1f}" if percent else f"{v:.3g}")) for v in ys],
                    textposition="outside", cliponaxis=False,
                    hovertemplate=f"{name}<br>%{{x}}: %{{y:.2f}}{' %' if percent else ''}<extra></extra>")
    if target is not None:
        _target_line(fig, target)
    apply_style(fig, title, subtitle=subtitle, height=420)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title=ytitle, ticksuffix=" %" if percent else None)
    if percent:
        top = max([v for tr in fig.data for v in (tr.y or []) if v is not None], default=100)
        fig.update_yaxes(range=[0, max(10.0, min(112.0, top * 1.15 + 2))])
    return fig


def stability_compare_bars(runs: Mapping[str, Mapping], key: str = "stability", title: str | None = None,
                           colors: Mapping[str, str] | None = None) -> go.Figure:
    """Retained routing stability per layer, one bar colour per run (target line at 95 %)."""
    return per_layer_compare_bars(
        runs, key, title or "Retained routing stability per layer",
        "retained top-k sets unchanged · dashed = 95 % (GRIP paper)",
        "stability (%)", target=STABILITY_TARGET, colors=colors)


def selection_shift_bars(runs: Mapping[str, Mapping], key: str = "shift", title: str | None = None,
                         colors: Mapping[str, str] | None = None) -> go.Figure:
    """Forget-set expert selection shift per layer (1 − top-k overlap): the shortcut's fingerprint."""
    return per_layer_compare_bars(
        runs, key, title or "Forget-set expert selection shift per layer",
        "1 − |S ∩ S′| / k on forget tokens · how far their experts moved",
        "selection shift (%)", colors=colors)


def attribution_bars(runs: Mapping[str, Mapping], title: str | None = None,
                     colors: Mapping[str, str] | None = None) -> go.Figure:
    """Per layer and run: the retained routing shift split into router-weight and input-drift parts.

    runs: name -> {"layers", "router_contribution", "drift_contribution"} (Shapley split, they sum
    to the actual shift). Stacked per run, runs side by side, each under a letter (A, B, ...) that the
    legend spells out: run names are too long for tick labels.
    """
    fig = go.Figure()
    for i, (name, r) in enumerate(runs.items()):
        color = (colors or {}).get(name) or run_color(name, r.get("grip_mode"), i)
        tag = chr(ord("A") + i % 26)
        x = [_layer_names(r["layers"]), [tag] * len(r["layers"])]
        for key, label, opacity in (("router_contribution", "router weights", 1.0),
                                    ("drift_contribution", "input drift", 0.45)):
            vals = r.get(key)
            if vals is None:
                continue
            fig.add_bar(x=x, y=[None if v is None else 100 * v for v in vals], name=f"{tag} = {name}: {label}",
                        marker=dict(color=color, opacity=opacity,
                                    pattern=dict(shape="" if opacity == 1.0 else "/", fgcolor="white")),
                        offsetgroup=name, legendgroup=name,
                        hovertemplate=f"{name}<br>%{{x}}<br>{label}: %{{y:.2f}} pp of the shift<extra></extra>")
    apply_style(fig, title or "Where the retained routing shift comes from",
                subtitle="retained shift (100 % − stability) = router weights + input drift (Shapley)", height=440)
    fig.update_layout(barmode="relative")
    # the run letters form a second row of x tick labels: push the legend below them
    fig.update_layout(legend=dict(y=-0.3), margin=dict(b=130))
    fig.update_yaxes(title="shift (pp)", ticksuffix=" pp")
    return fig


# ----------------------------------------------------------------------------- curves

# step-row keys of the periodic evaluations (grip_core.runs.evaluate.STEP_EVAL_KEYS)
CURVE_KEYS = {"stability": "retain_stability", "forget_em": "forget_em", "retain_em": "retain_em",
              "forget_shift": "forget_shift"}


def _series(log: Sequence[Mapping], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in log if r.get(key) is not None and "step" in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(logs: Mapping[str, Sequence[Mapping]], title: str | None = None,
                    colors: Mapping[str, str] | None = None, total_steps: int | None = None) -> go.Figure:
    """Loss per step (left) and the periodic evaluations (right): retained stability (solid),
    forget EM (dashed), retain EM (dotted), one colour per run. `logs`: name -> step rows."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.09,
                        subplot_titles=("unlearning loss", "retained stability · forget EM · retain EM"))
    for i, (name, log) in enumerate(logs.items()):
        color = (colors or {}).get(name) or run_color(name, index=i)
        steps, loss = _series(log, "loss")
        fig.add_scatter(x=steps, y=loss, mode="lines", name=f"{name}: loss", line=dict(color=color, width=2),
                        legendgroup=name, hovertemplate=f"{name}<br>step %{{x}}<br>loss %{{y:.4f}}<extra></extra>",
                        row=1, col=1)
        for metric, dash, label in (("stability", "solid", "retained stability"), ("forget_em", "dash", "forget EM"),
                                    ("retain_em", "dot", "retain EM")):
            xs, ys = _series(log, CURVE_KEYS[metric])
            if not xs:
                continue
            fig.add_scatter(x=xs, y=[100 * v for v in ys], mode="lines+markers", name=f"{name}: {label}",
                            line=dict(color=color, dash=dash, width=2), marker=dict(size=6), legendgroup=name,
                            hovertemplate=f"{name}<br>step %{{x}}<br>{label} %{{y:.1f}} %<extra></extra>",
                            row=1, col=2)
    apply_style(fig, title or "Training curves", height=460)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.36, xanchor="left", x=0))
    fig.update_xaxes(title="step", row=1, col=1)
    fig.update_xaxes(title="step", row=1, col=2)
    if total_steps:
        fig.update_xaxes(range=[0, total_steps + 0.5])
    fig.update_yaxes(title="loss", row=1, col=1)
    fig.update_yaxes(title="%", range=[-3, 103], ticksuffix=" %", row=1, col=2)
    return fig


# ----------------------------------------------------------------------------- the compare figures


class CompareFigure(NamedTuple):
    """One figure of a comparison, with where it goes."""

    title: str              # the figure's title (plain text)
    figure: go.Figure
    section: str            # the heading it sits under (COMPARE_SECTIONS)
    slug: str               # a file-name stem / widget key, unique in the list
    run: str | None = None  # the run it shows (None: it shows every run)


COMPARE_SECTIONS = ("Routing shift per layer and expert", "Stability and selection shift",
                    "Router or input drift? (attribution)", "GRIP null-space rank", "Training curves",
                    "Did it really forget? Attacks and where the update landed")


def compare_figures(runs: Sequence, names: Sequence[str] | None = None) -> list[CompareFigure]:
    """Every figure comparing saved runs, in page order: the ONE list the Compare page and the HTML export show.

    `runs`: SavedRun-like objects (.config dict, .report RunReport or None, .steps rows, .grip_ranks, .run_id);
    `names`: their display names (default `run_names(runs)`: method, GRIP mode, preset, seed, steps).
    A run without a report (still running, failed) contributes its training curve only.
    """
    runs = list(runs)
    names = list(names) if names is not None else run_names(runs)
    colors = {n: run_color(n, grip_mode(r.config), i) for i, (n, r) in enumerate(zip(names, runs))}
    series = {n: run_layer_series(r.report, r.config) for n, r in zip(names, runs)}
    out: list[CompareFigure] = []

    def add(fig: go.Figure, section: str, slug: str, run: str | None = None) -> None:
        if run is not None and len(names) > 1:     # side by side: a smaller title keeps a long run name in view
            fig.update_layout(title_font_size=15)
        title = str(fig.layout.title.text or "").replace("<b>", "").replace("</b>", "")
        out.append(CompareFigure(title, fig, section, slug, run))

    section = COMPARE_SECTIONS[0]
    for which in ("retain", "forget"):
        mats = {n: s.get(f"{which}_freq_change") for n, s in series.items()}
        zmax = shared_shift_range(*[m for m in mats.values() if m])
        for i, n in enumerate(names):
            if mats[n]:
                s = series[n]
                add(routing_shift_heatmap(mats[n], s["layers"], title=n,
                                          subtitle=f"{which} tokens · Δ share of routing slots, unlearned − base (pp)",
                                          zmax=zmax,
                                          freq_base=s.get(f"{which}_freq_base"), freq_new=s.get(f"{which}_freq_new"),
                                          cell_text=len(names) == 1),
                    section, f"routing-shift-{which}-{i}", n)
    section = COMPARE_SECTIONS[1]
    ok = {n: s for n, s in series.items() if s.get("stability")}
    if ok:
        add(stability_compare_bars(ok, colors=colors), section, "retained-stability")
    ok = {n: s for n, s in series.items() if s.get("shift")}
    if ok:
        add(selection_shift_bars(ok, colors=colors), section, "forget-selection-shift")
    section = COMPARE_SECTIONS[2]
    for i, n in enumerate(names):
        if series[n].get("stability_actual"):
            add(stability_bars(series[n]["layers"], series[n], name=n, color=colors[n], title=n),
                section, f"attribution-{i}", n)
    ok = {n: s for n, s in series.items() if s.get("router_contribution")}
    if ok:
        add(attribution_bars(ok, colors=colors), section, "shift-attribution")
    section = COMPARE_SECTIONS[3]
    for i, (n, r) in enumerate(zip(names, runs)):
        nr = null_space_ranks(r.grip_ranks or (r.report.grip if r.report is not None else None))
        if nr:
            sub = (f"{nr['threshold']} · " if nr["threshold"] else "") + "0 = frozen row"   # fits half a page
            add(nullspace_heatmap(nr["ranks"], nr["layers"], nr["dim"], title=n, subtitle=sub),
                section, f"null-space-rank-{i}", n)
    logs = {n: step_log_with_base(r.steps, r.report) for n, r in zip(names, runs) if r.steps}
    if logs:
        add(training_curves(logs, colors=colors, title="Training curves (from the step logs)"),
            COMPARE_SECTIONS[4], "training-curves")
    section = COMPARE_SECTIONS[5]       # per-run figures first, then shared ones (the page's order in a section)
    reports = [(n, r.report) for n, r in zip(names, runs) if r.report is not None]
    ledgers = [(n, rep.ledger) for n, rep in reports if rep.ledger]
    for i, (n, rows) in enumerate(ledgers):
        if any(row.get("group") == "routed_expert" for row in rows):
            add(ledger_expert_heatmap(rows, title=n, subtitle="routed experts' share of ‖ΔΘ‖² per layer and expert"),
                section, f"ledger-experts-{i}", n)
    attacked = [{"label": n, "robustness": rep.robustness} for n, rep in reports if rep.robustness]
    if attacked:
        add(robustness_heatmap(attacked), section, "robustness-matrix")
    if ledgers:
        add(ledger_bars([{"label": n, "ledger": ledger_shares(rows)} for n, rows in ledgers]), section, "update-ledger")
    return out


__all__ = ["stability_bars", "stability_compare_bars", "selection_shift_bars", "attribution_bars",
           "per_layer_compare_bars", "training_curves", "compare_figures", "CompareFigure", "COMPARE_SECTIONS", "BASE"]

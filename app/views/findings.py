"""Page 6 — Findings: the study's figures, summary and tables, read from a study folder's cells (even one
that is still filling: its coverage grows as cells land)."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import streamlit as st

from app.lib import ui
from grip_core._paths import REPO_ROOT
from grip_core.fmt import mean_sd
from grip_core.runs import study as S
from grip_core.viz import robustness as R
from grip_core.viz import study as V

ui.page_header("Findings", "The study: the grid of methods × GRIP modes × regimes × seeds on the demo, "
                           "read from its cells.")

DEFAULT = os.environ.get("GRIP_STUDIO_STUDY") or str(REPO_ROOT / "docs" / "study")
COMMITTED = {"The demo (main study)": "main", "Robustness (attacks)": "robustness",
             "demo-fine (second demo)": "demo-fine"}


def _pick() -> None:
    choice = st.session_state.get("fd_pick")
    if choice:
        st.session_state["fd_folder"] = str(REPO_ROOT / "docs" / S.COMMITTED_STUDIES[COMMITTED[choice]])


st.pills("Committed studies", list(COMMITTED), key="fd_pick", on_change=_pick,
         help="the studies shipped with GRIP Studio (docs/study/); or type any study folder below")
folder = st.text_input("Study folder", value=DEFAULT, key="fd_folder",
                       help="a folder made by `python -m grip_core study` (cells/ inside); a study that is still "
                            "running shows the cells saved so far")
auto = st.toggle("Refresh every 20 s (a study that is still running)", key="fd_auto")


@st.fragment(run_every=20 if auto else None)
def _body(folder: str) -> None:
    st.button("Refresh", key="fd_refresh", icon=":material/refresh:", type="tertiary")
    with ui.guard("Cannot read the study", stop=True):
        study = S.read_study(Path(folder))
    cells, grid = study["cells"], study["grid"]
    cov = S.coverage(cells, grid)
    st.progress(cov["present"] / max(cov["total"], 1),
                text=f"**{cov['present']} of {cov['total']} cells** ({cov['aliased']} aliased)")
    st.caption("Cells made on: " + "; ".join(S.machines(cells) or ["no cells yet"]))
    if not cells:
        st.info(f"No cells in `{folder}` yet. Run the study into it:\n\n```\npython -m grip_core study "
                f"--out-dir {folder}\n```\n\nCells appear here as they are saved.", icon=":material/article:")
        return
    rows = S.figure_rows(cells, grid)
    ui.figure(V.restoration_figure(rows), key="fd_restoration")
    ui.figure(V.stability_forget_figure(rows, S.FORGET_TARGET), key="fd_stability")
    ui.figure(V.steps_figure(rows, grid.max_steps), key="fd_steps")

    st.subheader("Summary")
    st.markdown("\n".join(f"- {s}" for s in S.study_summary(cells, grid)))
    means = S.robustness_means(cells)
    if means:                                            # a robustness study: every cell was attacked
        st.subheader("Did it really forget? The attacks")
        st.markdown("\n".join(f"- {s}" for s in S.robustness_summary(means)))
        for (sc, rg), group in sorted(S.group_by(means, "scenario", "regime").items()):
            ui.figure(R.robustness_heatmap([{**x, "label": x["label"].rsplit(" · ", 2)[0]} for x in group],
                                           title=f"{sc} scenario · {rg} regime: recovered by each attack",
                                           subtitle="mean over seeds; hover for base / unlearned / attacked EM"),
                      key=f"fd_robust_{sc}_{rg}".replace("+", "-"))
    model = study["manifest"].get("model", "demo")
    main = REPO_ROOT / "docs" / S.COMMITTED_STUDIES["main"]
    if model != "demo" and (main / "cells").is_dir():
        other = S.read_study(main)
        lines = S.side_by_side(cells, grid, other["cells"], other["grid"], (model, "demo"))
        if lines:
            st.subheader(lines[0].lstrip("# "))
            st.markdown("\n".join(lines[2:]))

    st.subheader("Tables")
    st.caption("Mean±sd over seeds. Verdicts: docs/method.md#verdicts. Regimes that train the same parameters as "
               "another on this model are listed last.")
    aliases = study["aliases"]
    for scenario, regime, group in S.panels(S.study_rows(cells, grid), aliases):
        st.markdown(f"**{scenario} scenario · {regime} regime**")
        if regime in aliases:
            st.caption(f"`{regime}` trains exactly the parameters of `{aliases[regime]}` on this model: its rows "
                       f"are `{aliases[regime]}`'s (not run twice).")
            continue
        forget = pd.DataFrame([{"method": r["method"], "GRIP": r["grip"], "lr": f"{r['lr']:g}",
                                **{name: mean_sd([c.get(k) for c in r["cells"]]) for k, name in S.FORGET_COLUMNS},
                                "verdict": r["verdict_title"]} for r in group])
        routing = pd.DataFrame([{"method": r["method"], "GRIP": r["grip"],
                                 **{name: mean_sd([c.get(k) for c in r["cells"]]) for k, name in S.ROUTING_COLUMNS},
                                 "claim": "–" if r["claim_holds"] is None else ("holds" if r["claim_holds"] else "no")}
                                for r in group])
        slug = f"{scenario}-{regime}".replace("+", "-")
        height = 38 + 35 * len(group)                     # every row shown, no inner scrolling
        ui.table(forget, key=f"fd_forget_{slug}", file_name=f"study-{slug}-forgetting", height=height,
                 column_config={"verdict": st.column_config.TextColumn("verdict", width="medium")})
        ui.table(routing, key=f"fd_routing_{slug}", file_name=f"study-{slug}-routing", height=height)
    report = S.study_report(cells, grid, quick=False, aliases=aliases, alias_check=study["alias_check"], model=model)
    st.download_button("Download the report (markdown)", data=report.encode(), file_name="findings.md",
                       mime="text/markdown", key="fd_md", icon=":material/download:", type="tertiary",
                       on_click="ignore")


_body(folder)

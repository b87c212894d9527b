"""The robustness section shared by Compare and Diagnose: attack matrix + update ledger of saved runs.

Reads RUN_DIR/robustness.json and RUN_DIR/ledger.json (written by `python -m grip_core attack`);
draws grip_core.viz.robustness figures. Not a page of its own (the leading underscore).
"""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app.lib import ui
from grip_core import viz
from grip_core.attacks.matrix import matrix_cells
from grip_core.runs.store import load_run
from grip_core.viz.robustness import ledger_bars, ledger_expert_heatmap, robustness_heatmap


def _run_dir(path) -> Path | None:
    """The run folder of `path`: a run folder itself, or its model/ weights folder."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    if p.name == "model" and (p.parent / "config.json").is_file():
        return p.parent
    return p if (p / "config.json").is_file() else None


def render_robustness(paths, key: str) -> None:
    """Attack matrix and update ledger of the runs at `paths` (run folders or their model/ folders)."""
    dirs = [d for d in (_run_dir(p) for p in (paths or [])) if d is not None]
    st.subheader("Did it really forget? Attacks and where the update landed")
    st.caption("Each attack tries to bring the forgotten answers back: put the original routers back, force "
               "tokens onto experts they did not pick, relearn a few steps, quantize the weights, reword the "
               "questions. Colour = share of the forgotten answers recovered; hover for the numbers.")
    with ui.guard("Could not read the attack results"):
        runs = [load_run(d) for d in dirs]
        names = dict(zip(dirs, viz.run_names(runs)))      # the names Compare gives the same runs
        cells = [{**c, "label": names[d]} for d in dirs for c in matrix_cells([d])]
        if not cells:
            where = dirs[0] if len(dirs) == 1 else "RUN_DIR"
            st.info(f"No attack results for {'this run' if len(dirs) == 1 else 'these runs'} yet. Runs that kept "
                    f"their weights can be attacked with `python -m grip_core attack --base demo --run {where}`.",
                    icon=":material/info:")
            return
        attacked = [c for c in cells if c["robustness"]]
        if attacked:
            ui.figure(robustness_heatmap(attacked), key=f"{key}_robust", file_name="robustness-matrix")
        else:
            st.info("No attack results yet; runs that kept their weights can be attacked with "
                    "`python -m grip_core attack --base demo --run RUN_DIR`. The update ledger below comes "
                    "with every run.", icon=":material/info:")
        with_ledger = [c for c in cells if c.get("ledger")]
        if with_ledger:
            ui.figure(ledger_bars(with_ledger), key=f"{key}_ledger", file_name="update-ledger")
            cols = st.columns(len(with_ledger), gap="medium")
            for i, (col, c) in enumerate(zip(cols, with_ledger)):
                if any(r.get("group") == "routed_expert" for r in c.get("ledger_rows") or []):
                    with col:
                        ui.figure(ledger_expert_heatmap(c["ledger_rows"], title=f"Routed experts — {c['label']}"),
                                  key=f"{key}_ledger_exp_{i}", file_name=f"ledger-experts-{i}")

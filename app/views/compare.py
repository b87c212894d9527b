"""Page 5 — Compare: two saved runs (or base vs one run), every figure side by side, from the saved run reports."""
from __future__ import annotations

from html import escape
from pathlib import Path

import streamlit as st

from app.lib import state, ui
from grip_core import viz
from grip_core.runs.store import list_runs, load_run

ui.page_header("Compare", "Base vs unlearned, vanilla vs GRIP: where routing moved, what was kept, and whether the "
                          "forgetting survives putting the original routers back. Read from the saved runs.")

with ui.guard("Could not read the run store", stop=True):
    listed = list_runs(state.runs_dir())
unreadable = [r for r in listed if r.error]
runs = [r for r in listed if not r.error]
if unreadable:
    with st.expander(f"{len(unreadable)} run folder(s) could not be read", expanded=True, icon=":material/warning:"):
        st.markdown("\n".join(f"- `{r.run_id}` — unreadable: {r.error}" for r in unreadable))
if not runs:
    st.info(f"No {'readable ' if unreadable else ''}runs in `{state.runs_dir()}` yet. Start one on the **Unlearn** page.",
            icon=":material/info:")
    st.stop()


names_all = dict(zip((str(r.path) for r in runs), viz.run_names(runs)))   # what each run was, not when


def _label(r) -> str:
    return f"{names_all[str(r.path)]} · {r.state}"


by_path = {str(r.path): r for r in runs}
paths = list(by_path)
wanted = [p for p in st.session_state.get("compare_runs", []) if p in by_path]
c1, c2, c3 = st.columns([1, 3, 3])
mode = c1.radio("Compare", ["two runs", "base vs one run"], key="cmp_mode")
if not wanted:   # the newest two runs, vanilla first
    wanted = sorted(paths[:2], key=lambda p: viz.grip_mode(by_path[p].config) != "off")
default_a = wanted[0]
default_b = wanted[1] if len(wanted) > 1 else paths[0]
pick_a = c2.selectbox("Run A", paths, index=paths.index(default_a), format_func=lambda p: _label(by_path[p]),
                      key="cmp_a")
selected = [pick_a]
if mode == "two runs":
    pick_b = c3.selectbox("Run B", paths, index=paths.index(default_b), format_func=lambda p: _label(by_path[p]),
                          key="cmp_b")
    selected.append(pick_b)

with ui.guard("Could not read the runs", stop=True):
    loaded = [load_run(p) for p in selected]
names = viz.run_names(loaded)
for n, r in zip(names, loaded):
    if r.report is None:
        st.warning(f"**{n}** is {r.state}: {r.status.get('reason') or 'no final report'} — "
                   "only its step log can be shown.", icon=":material/warning:")

# ----------------------------------------------------------------------------- the headline
# One verdict per run (grip_core.runs.verdict: the same words as Diagnose and the CLI); each verdict sentence
# names the run's trade-off (forget EM, retain EM, retained stability, restoration), rounded as in the tables.
verdicts = {n: (r.report.verdict() if r.report is not None else None) for n, r in zip(names, loaded)}
lines = [f"<b>{escape(n)}</b> — <b style='color:{viz.VERDICT_COLORS.get(v.kind, viz.BASE)}'>{v.title}</b>. "
         f"{escape(v.sentence)}" if v else f"<b>{escape(n)}</b> has no final report yet."
         for n, v in verdicts.items()]
st.markdown(f"<div style='font-size:1.15rem;line-height:1.5;padding:0.9rem 1.1rem;border-left:6px solid "
            f"{viz.GRIP};background:#F3F7FB;border-radius:6px;margin:0.4rem 0 1rem 0'>{'<br><br>'.join(lines)}</div>",
            unsafe_allow_html=True)
# long run names: a fixed-width run column (hover shows the whole name) and short headers (hover: the full
# name), so every column, the verdict included, stays in view
RUN_COLUMN = {"run": st.column_config.TextColumn("run", width="medium")}
SHORT = {"retained stability": "stability", "router-only stability": "router-only",
         "forget selection shift": "forget shift", "restoration recovers": "recovered"}
heads = viz.runs_table({n: (r.report, r.config) for n, r in zip(names, loaded)})
ui.table(heads, "cmp_heads", "runs-headline", display=viz.percent_strings(heads),
         column_config={**RUN_COLUMN, **{c: st.column_config.TextColumn(short, help=c) for c, short in SHORT.items()}})

st.download_button("Download this comparison as one HTML page", data=lambda: viz.runs_html(loaded),
                   file_name="grip-studio-compare.html", mime="text/html", key="cmp_all_html",
                   icon=":material/download:", on_click="ignore")

# ----------------------------------------------------------------------------- the figures
# grip_core.viz.compare_figures: the same list, in the same order, as the HTML export above
CAPTIONS = {
    "Routing shift per layer and expert": "Retain tokens: what should NOT move; forget tokens: what unlearning moved. "
                                          "One colour scale for every heatmap of a row.",
    "Did it really forget? Attacks and where the update landed":
        "The update ledger (every run has one): the share of ‖ΔΘ‖² on routers, routed experts, shared experts, "
        "attention, embeddings and norms. The attack matrix appears once a run kept its weights and was attacked "
        "(`python -m grip_core attack --base demo --run RUN_DIR`): colour = share of the forgotten answers each "
        "attack brought back; hover for the numbers.",
    "GRIP null-space rank": "How many directions each router row may still move in under GRIP's equality "
                            "constraint. 0 = the row is frozen; the threshold decides whether GRIP is plastic at all.",
}
figs = viz.compare_figures(loaded, names)
for section in viz.COMPARE_SECTIONS:
    items = [f for f in figs if f.section == section]
    if not items:
        continue
    st.subheader(section)
    if section in CAPTIONS:
        st.caption(CAPTIONS[section])
    per_run = [f for f in items if f.run is not None]
    shared = [f for f in items if f.run is None]
    for group, width in ((per_run, len(names)), (shared, 2 if len(shared) > 1 else 1)):
        for start in range(0, len(group), width):
            row = group[start:start + width]
            cols = st.columns(width, gap="medium") if width > 1 else [st.container()]
            for col, f in zip(cols, row):
                with col:
                    ui.figure(f.figure, key=f"cmp_{f.slug}", file_name=f.slug)

# ----------------------------------------------------------------------------- probes / restoration
st.subheader("Knowledge probes")
probes = viz.probes_table({n: r.report for n, r in zip(names, loaded)})
if probes.empty:
    st.info("No probes: no run here has a final report.", icon=":material/info:")
else:
    numeric = [c for c in probes.columns if c not in ("split", "measure")]
    ui.table(probes, "cmp_probes", "probes",
             column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in numeric})
st.subheader("Router-restoration attack")
st.caption("Put the ORIGINAL routers back into the unlearned model and ask the forget questions again: if the "
           "answers return, the method hid the knowledge behind the router instead of erasing it. Columns: forget-set "
           "exact match of the base model, of the unlearned model, and of the unlearned model with the original "
           "routers restored; the share of the forgotten answers that came back; the run's verdict.")
rest = viz.restoration_table({n: r.report for n, r in zip(names, loaded)})
if rest.empty:
    st.info("No restoration result: no run here has a final report.", icon=":material/info:")
else:
    ui.table(rest, "cmp_restoration", "restoration", display=viz.percent_strings(rest),
             column_config=RUN_COLUMN)

# ----------------------------------------------------------------------------- configs
with st.expander("Run configurations"):
    cols = st.columns(len(names))
    for col, n, r in zip(cols, names, loaded):
        col.markdown(f"**{n}** — `{Path(r.path).name}`")
        col.json(r.config, expanded=False)


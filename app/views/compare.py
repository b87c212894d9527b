"""Page 5 — Compare: two saved runs (or base vs one run), every figure side by side, from saved summaries only."""
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
finished = [r for r in runs if r.summary]
if not runs:
    st.info(f"No {'readable ' if unreadable else ''}runs in `{state.runs_dir()}` yet. Start one on the **Unlearn** page.",
            icon=":material/info:")
    st.stop()


def _label(r) -> str:
    return f"{viz.run_display_name(r.config, r.run_id)} · {r.run_id} · {r.state}"


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
names = []
for r in loaded:
    n = viz.run_display_name(r.config, r.run_id)
    names.append(n if n not in names else f"{n} ({r.run_id[-4:]})")
colors = {n: viz.run_color(n, viz.grip_mode(r.config), i) for i, (n, r) in enumerate(zip(names, loaded))}
series = {n: viz.run_layer_series(r.summary, r.config) for n, r in zip(names, loaded)}
for n, r in zip(names, loaded):
    if r.summary is None:
        st.warning(f"**{n}** ({r.run_id}) is {r.state}: {r.status.get('reason') or 'no final summary'} — "
                   "only its step log can be shown.", icon=":material/warning:")

# ----------------------------------------------------------------------------- the headline
# One verdict per run (grip_core.runs.verdict: the same words as Diagnose and the CLI), then the trade-off.
verdicts = {n: viz.run_verdict(r.summary) for n, r in zip(names, loaded)}
lines = [f"<b>{escape(n)}</b> — <b style='color:{viz.VERDICT_COLORS.get(v.kind, viz.BASE)}'>{v.title}</b>. "
         f"{escape(v.sentence)}" if v else f"<b>{escape(n)}</b> has no final summary yet."
         for n, v in verdicts.items()]
done = {n: v for n, v in verdicts.items() if v}
if len(done) > 1:
    lines.append(escape(viz.tradeoff_sentence(done)))
st.markdown(f"<div style='font-size:1.15rem;line-height:1.5;padding:0.9rem 1.1rem;border-left:6px solid "
            f"{viz.GRIP};background:#F3F7FB;border-radius:6px;margin:0.4rem 0 1rem 0'>{'<br><br>'.join(lines)}</div>",
            unsafe_allow_html=True)
heads = viz.runs_table({n: (r.summary, r.config) for n, r in zip(names, loaded)})
ui.table(heads, "cmp_heads", "runs-headline", display=viz.percent_strings(heads))

st.download_button("Download this comparison as one HTML page", data=lambda: viz.runs_html(loaded),
                   file_name="grip-studio-compare.html", mime="text/html", key="cmp_all_html",
                   icon=":material/download:", on_click="ignore")

# ----------------------------------------------------------------------------- routing shift
st.subheader("Routing shift per layer and expert")
which = st.radio("Tokens", ["retain", "forget"], horizontal=True, key="cmp_shift_split",
                 help="retain: what should NOT move; forget: what unlearning moved")
mats = {n: s.get(f"{which}_freq_change") for n, s in series.items()}
zmax = viz.shared_shift_range(*[m for m in mats.values() if m])
cols = st.columns(len(names), gap="medium")
for i, (col, n) in enumerate(zip(cols, names)):
    with col:
        s = series[n]
        if not mats[n]:
            st.info(f"{n}: no {which}-set routing in its summary.", icon=":material/info:")
            continue
        fig = viz.routing_shift_heatmap(mats[n], s["layers"], title=n,
                                        subtitle=f"{which} tokens · Δ share of routing slots (pp)",
                                        zmax=zmax, freq_base=s.get(f"{which}_freq_base"),
                                        freq_new=s.get(f"{which}_freq_new"), cell_text=len(names) == 1)
        ui.figure(fig, key=f"cmp_shift_{i}", file_name=f"routing-shift-{which}-{i}")

# ----------------------------------------------------------------------------- stability / shift
st.subheader("Stability and selection shift")
col1, col2 = st.columns(2, gap="medium")
with col1:
    ok = {n: s for n, s in series.items() if s.get("stability")}
    if ok:
        ui.figure(viz.stability_compare_bars(ok, colors=colors), key="cmp_stab", file_name="retained-stability")
    else:
        st.info("No retained-routing stability in these summaries.", icon=":material/info:")
with col2:
    ok = {n: s for n, s in series.items() if s.get("shift")}
    if ok:
        ui.figure(viz.selection_shift_bars(ok, colors=colors), key="cmp_fshift", file_name="forget-selection-shift")
    else:
        st.info("No forget-set selection shift in these summaries.", icon=":material/info:")

st.subheader("Router or input drift? (attribution)")
cols = st.columns(len(names), gap="medium")
for i, (col, n) in enumerate(zip(cols, names)):
    with col:
        s = series[n]
        if s.get("stability_actual"):
            ui.figure(viz.stability_bars(s["layers"], s, name=n, color=colors[n]), key=f"cmp_attr_{i}",
                      file_name=f"attribution-{i}")
        else:
            st.info(f"{n}: no attribution in its summary.", icon=":material/info:")
ok = {n: s for n, s in series.items() if s.get("router_contribution")}
if ok:
    ui.figure(viz.attribution_bars(ok, colors=colors), key="cmp_attr_split", file_name="shift-attribution")

# ----------------------------------------------------------------------------- null space
ranked = [(n, viz.null_space_ranks(r.grip_ranks or (r.summary or {}).get("grip"))) for n, r in zip(names, loaded)]
ranked = [(n, nr) for n, nr in ranked if nr]
if ranked:
    st.subheader("GRIP null-space rank")
    st.caption("How many directions each router row may still move in under GRIP's equality constraint. "
               "0 = the row is frozen; the threshold decides whether GRIP is plastic at all.")
    cols = st.columns(len(ranked), gap="medium")
    for i, (col, (n, nr)) in enumerate(zip(cols, ranked)):
        with col:
            sub = "free directions per router row · 0 = frozen" + (f" · {nr['threshold']}" if nr["threshold"] else "")
            ui.figure(viz.nullspace_heatmap(nr["ranks"], nr["layers"], nr["dim"], title=f"Null-space rank — {n}",
                                            subtitle=sub), key=f"cmp_ns_{i}", file_name=f"null-space-rank-{i}")

# ----------------------------------------------------------------------------- probes / restoration
st.subheader("Knowledge probes")
probes = viz.probes_table({n: r.summary for n, r in zip(names, loaded)})
if probes.empty:
    st.info("No probes in these summaries.", icon=":material/info:")
else:
    numeric = [c for c in probes.columns if c not in ("split", "measure")]
    ui.table(probes, "cmp_probes", "probes",
             column_config={c: st.column_config.NumberColumn(c, format="%.3f") for c in numeric})
st.subheader("Router-restoration attack")
st.caption("Put the ORIGINAL routers back into the unlearned model and ask the forget questions again: if the "
           "answers return, the method hid the knowledge behind the router instead of erasing it.")
rest = viz.restoration_table({n: r.summary for n, r in zip(names, loaded)})
if rest.empty:
    st.info("No restoration result in these summaries.", icon=":material/info:")
else:
    ui.table(rest, "cmp_restoration", "restoration", display=viz.percent_strings(rest))

# ----------------------------------------------------------------------------- curves and configs
logs = {n: viz.step_log_with_base(r.steps, r.summary) for n, r in zip(names, loaded) if r.steps}
if logs:
    ui.figure(viz.training_curves(logs, colors=colors, title="Training curves (from the step logs)"),
              key="cmp_curves", file_name="training-curves")
with st.expander("Run configurations"):
    cols = st.columns(len(names))
    for col, n, r in zip(cols, names, loaded):
        col.markdown(f"**{n}** — `{Path(r.path).name}`")
        col.json(r.config, expanded=False)

from app.views._robustness import render_robustness  # noqa: E402
render_robustness([r.path for r in loaded], key="cmp")

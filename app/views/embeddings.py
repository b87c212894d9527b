"""Page 3 — Embeddings: router inputs at one layer in 2-D (PCA now, UMAP on request), lasso → tokens."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app.lib import jobs, state, ui
from grip_core import viz

ui.page_header("Embeddings", "What each router sees: the hidden state entering the router at one MoE layer, one "
                             "point per token. PCA is instant; UMAP runs in the background. Lasso a cluster to "
                             "list its tokens.")

source, key = state.current_source(), state.data_key()
with ui.guard("Could not read the model or data", stop=True):
    info = state.describe(source)
    splits = state.splits_for(key)

layers = [l["layer"] for l in info["layers"]]
c1, c2, c3, c4 = st.columns([1, 2, 3, 2])
pos = c1.selectbox("MoE layer", list(range(len(layers))), format_func=lambda p: f"layer {layers[p]}", key="em_layer")
color_by = c2.radio("Colour by", ["top-1 expert", "split"], horizontal=True, key="em_color")
chosen = c3.multiselect("Splits", [s for s in ("forget", "retain", "holdout") if s in splits],
                        default=[s for s in ("forget", "retain", "holdout") if s in splits], key="em_splits")
per_split = c4.select_slider("Examples per split", [16, 32, 64, 128], value=32, key="em_n")
c5, c6, c7 = st.columns([2, 3, 2])
answers_only = c5.toggle("Answer tokens only", value=True, key="em_answers")
models = jobs.in_memory_models()
after_options = ["(base model only)"] + list(models)
after_id = c6.selectbox("After unlearning (this session's runs)", after_options, key="em_after",
                        help="runs you trained on the Unlearn page in this session; the map is fitted on the base "
                             "model and only applied to the unlearned one, so the axes are shared")
run_id = None if after_id == after_options[0] else after_id
method = c7.radio("Projection", ["PCA", "UMAP"], horizontal=True, key="em_method")

if not chosen:
    st.info("Pick at least one split.", icon=":material/info:")
    st.stop()

args = (source, key, pos, tuple(chosen), per_split, answers_only, run_id)
with ui.guard("Could not trace the router inputs", stop=True):
    with st.spinner("Tracing router inputs …"):
        data = state.embedding_data(*args, _after=models.get(run_id) if run_id else None)
        pca = state.pca_coords(*args, _after=models.get(run_id) if run_id else None)

coords = pca
axis_names = (f"PC 1 ({100 * pca['explained'][0]:.0f} % var.)", f"PC 2 ({100 * pca['explained'][1]:.0f} % var.)")
if method == "UMAP":
    fut = state.umap_future(args, data, start=False)
    if fut is None:
        st.info("UMAP is not computed for these settings yet. The first fit in a fresh server also compiles "
                "numba code (~40 s on 2 cores); the PCA view stays here meanwhile.", icon=":material/schedule:")
        if st.button("Compute UMAP", key="em_umap_start", type="primary"):
            state.umap_future(args, data, start=True)
            st.rerun()
    else:
        @st.fragment(run_every=2.0)
        def _umap_wait():
            f = state.umap_future(args, data, start=False)
            if f is not None and not f.done():
                st.info("Computing UMAP in the background … (PCA shown meanwhile)", icon=":material/hourglass_top:")
            else:
                st.session_state["em_umap_ready"] = True
                st.rerun()
        if fut.done():
            with ui.guard("UMAP failed"):
                coords = fut.result()
                axis_names = ("UMAP 1", "UMAP 2")
        else:
            _umap_wait()

before, after = data["before"], data["after"]
n = len(before["tokens"])
lab_b = before["top1"] if color_by == "top-1 expert" else before["split"]
hover_b = [f"{t!s} · {s}<br>expert {e}<br>{q[:70]}" for t, s, e, q in
           zip(before["tokens"], before["split"], before["top1"], before["question"])]
title = f"Router inputs at layer {layers[pos]} — {n:,} tokens ({method if coords is not pca else 'PCA'})"
if after is not None:
    lab_a = after["top1"] if color_by == "top-1 expert" else before["split"]
    hover_a = [f"{t!s} · {s}<br>expert {e} (after)<br>{q[:70]}" for t, s, e, q in
               zip(before["tokens"], before["split"], after["top1"], before["question"])]
    fig = viz.embedding_pair(coords["before"], coords["after"], lab_b, lab_a, hover_b, hover_a, title=title,
                             subtitle=f"one map fitted on the base model, applied to {run_id}; "
                                      f"colour = {color_by}", axis_names=axis_names)
else:
    fig = viz.embedding_scatter(coords["before"], lab_b, hover_b, title=title,
                                subtitle=f"colour = {color_by}; lasso or box-select points to list their tokens",
                                axis_names=axis_names)
event = ui.figure(fig, key="em_scatter", file_name=f"router-inputs-layer{layers[pos]}", on_select="rerun",
                  selection_mode=("lasso", "box"))
if after is not None and color_by == "top-1 expert":
    only_after = sorted(set(after["top1"]) - set(before["top1"]))
    st.caption("The legend lists the experts of both panels (click one to hide it in both). "
               + (f"Only after unlearning: {', '.join(f'expert {e}' for e in only_after)} — where these tokens "
                  "went." if only_after else "Every expert used after unlearning was already used before."))

rows = viz.selected_rows((event or {}).get("selection", {}).get("points", []) if event else [])
st.subheader(f"Selected tokens ({len(rows)})")
if not rows:
    st.caption("Draw a lasso (or a box) around a cluster in the plot above.")
else:
    table = []
    for r in rows:
        is_after = r >= n
        i = r - n if is_after else r
        table.append({"model": "after" if is_after else "before", "token": before["tokens"][i],
                      "split": before["split"][i],
                      "top-1 expert": (after["top1"][i] if is_after else before["top1"][i]),
                      "question": before["question"][i]})
    df = pd.DataFrame(table)
    counts = df["token"].value_counts().head(12)
    st.caption("Most frequent: " + ", ".join(f"`{t}` ×{c}" for t, c in counts.items()))
    ui.table(df, "em_selected", "selected-tokens", height=300)

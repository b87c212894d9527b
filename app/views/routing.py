"""Page 2 — Routing explorer: expert load per layer, experts per domain, a typed prompt's routing, load entropy."""
from __future__ import annotations

import pandas as pd
import streamlit as st

from app.lib import loading, state, ui
from grip_core import viz

ui.page_header("Routing explorer", "Which experts the base model sends tokens to — per layer, per split, per domain, "
                                   "per token. Hover any cell for the exact number.")

source, key = state.current_source(), state.data_key()
with ui.guard("Could not read the data", stop=True):
    splits = state.splits_for(key)

c1, c2, c3 = st.columns([2, 2, 2])
split = c1.selectbox("Split", list(splits), index=list(splits).index("retain") if "retain" in splits else 0,
                     key="rx_split", help="forget = what unlearning removes; retain = what it must keep; "
                                          "holdout = never trained")
n_examples = c2.select_slider("Examples traced", [16, 32, 64, 128, 256, 512], value=64, key="rx_n",
                              help="questions + answers traced through the base model (a fixed sample)")
answers_only = c3.toggle("Answer tokens only", value=False, key="rx_answers",
                         help="count only the answer tokens (where the facts live), not the question template")

with ui.guard("Could not trace the model", stop=True):
    with st.spinner(f"Tracing {n_examples} {split} examples …"):
        summary = state.split_routing(source, key, split, min(n_examples, len(splits[split])), answers_only)

left, right = st.columns([3, 2], gap="medium")
with left:
    shared = loading.shared_expert_count(state.describe(source))     # always-on experts: a grey column
    ui.figure(viz.load_heatmap(summary, title=f"Expert load per layer — {split}", shared=shared), key="rx_load",
              file_name=f"expert-load-{split}")
    load_df = pd.DataFrame(summary["load"], index=[f"layer {l}" for l in summary["layers"]],
                           columns=[f"E{e}" for e in range(len(summary["load"][0]))])
    with st.expander("Load table (share of routing slots)"):
        ui.table(load_df.round(4), "rx_load_table", f"expert-load-{split}", hide_index=False)
with right:
    compare = st.multiselect("Entropy of", list(splits), default=[s for s in ("forget", "retain", "holdout")
                                                                   if s in splits], key="rx_entropy_splits")
    series = {}
    with ui.guard("Could not trace the model"):
        for s in compare:
            series[s] = state.split_routing(source, key, s, min(n_examples, len(splits[s])), answers_only)
    if series:
        fig = viz.load_entropy_bars(series)
        for tr in fig.data:
            tr.marker.color = viz.SPLIT_COLORS.get(tr.name, tr.marker.color)
        ui.figure(fig, key="rx_entropy", file_name="load-entropy")

st.divider()
st.subheader("Experts per domain")
st.caption("NMI = normalised mutual information between a token's domain and its top-1 expert (0 = no "
           "specialisation, 1 = each domain has its own expert). It depends on WHICH tokens are counted: answer "
           "tokens carry the facts and specialise most; the question template (\"Question:\", \"Answer:\", "
           "punctuation) is shared by every domain and pulls NMI down when it is counted too.")
with ui.guard("Could not compute the domain × expert matrix"):
    num_layers = len(summary["layers"])
    lc1, lc2 = st.columns([1, 4])
    pos = lc1.selectbox("MoE layer", list(range(num_layers)), format_func=lambda p: f"layer {summary['layers'][p]}",
                        key="rx_dom_layer")
    dom_tokens = lc1.radio("Tokens counted", ["answer tokens only", "all tokens"], key="rx_dom_tokens",
                           help="answer tokens only: where the facts live (the NMI the docs quote); all tokens: "
                                "question template and answer")
    by_kind = {kind: state.label_routing(source, key, n_examples * 2, kind == "answer tokens only")
               for kind in ("answer tokens only", "all tokens")}
    lab = by_kind[dom_tokens]
    if lab is None:
        st.info("These examples carry no `domain` labels (the demo's do). Upload files with a `domain` column "
                "to see which experts each domain uses.", icon=":material/info:")
    else:
        nmi = lab["nmi"]["nmi"]
        lc1.metric("NMI, this layer", f"{nmi[pos]:.2f}",
                   help=f"normalised mutual information between domain and top-1 expert on {dom_tokens}")
        for kind, other in by_kind.items():
            lc1.caption(f"NMI per layer, {kind}: " + ", ".join(
                f"L{l} {v:.2f}" for l, v in zip(other["nmi"]["layers"], other["nmi"]["nmi"])))
        with lc2:
            ui.figure(viz.expert_label_heatmap(
                lab["matrices"][pos], nmi=nmi[pos], shared=shared,
                title=f"Which experts each domain uses — layer {summary['layers'][pos]}, {dom_tokens}"),
                key="rx_domain", file_name=f"experts-per-domain-layer{summary['layers'][pos]}")

st.divider()
st.subheader("A prompt, token by token")
default_prompt = "Question: What is the capital of France?\nAnswer: Paris"
if splits.get("forget"):
    ex = splits["forget"][0]
    default_prompt = f"Question: {ex.question}\nAnswer: {ex.answer}"
text = st.text_area("Type a prompt", value=default_prompt, key="rx_prompt", height=80, max_chars=600)
if text.strip():
    with ui.guard("Could not trace the prompt"):
        routing = state.prompt_routing(source, text)
        ui.figure(viz.token_routing_table(routing), key="rx_prompt_fig", file_name="prompt-routing")
        st.caption("Token glyphs: **·** is a space that belongs to the token (`·Paris` is \" Paris\"), **⏎** a "
                   "newline, **∅** a token that decodes to no text.")
        rows = []
        for i, tok in enumerate(routing["tokens"]):
            row = {"position": i, "token": tok}
            for l, layer in enumerate(routing["layers"]):
                row[f"layer {layer}"] = " ".join(str(e) for e in routing["experts"][i][l])
            rows.append(row)
        with st.expander("Token × layer table"):
            ui.table(pd.DataFrame(rows), "rx_prompt_table", "prompt-routing")

"""Page 1 — Model: pick the demo or a local checkpoint, see its MoE architecture, choose the data."""
from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from app.lib import state, ui
from grip_core import viz

ui.page_header("Model", "Which MoE, which routers, which data. Everything else in GRIP Studio uses what you pick here.")

# ----------------------------------------------------------------------------- model source
DEMO, LOCAL, TINY = "Demo MoE (shipped with GRIP Studio)", "Local checkpoint directory", "Tiny random OLMoE (development)"
options = [DEMO, LOCAL] + ([TINY] if os.environ.get("GRIP_STUDIO_DEV") or state.current_source().startswith("tiny:")
                          else [])
source = state.current_source()
index = 2 if source.startswith("tiny:") and TINY in options else (0 if source == "demo" else 1)

left, right = st.columns([2, 3], gap="large")
with left:
    kind = st.radio("Model", options, index=index, key="model_kind")
    if kind == DEMO:
        wanted = "demo"
        if not state.demo_available():
            st.warning("The demo model is not built yet (expected in `data/demo_model/`). "
                       "Rebuild it with `python -m grip_core.demo` or load a local checkpoint.",
                       icon=":material/warning:")
    elif kind == TINY:
        wanted = state.DEV_TINY
    else:
        path = st.text_input("Checkpoint directory (config.json + *.safetensors)",
                             value="" if source in ("demo",) or source.startswith("tiny:") else source,
                             placeholder="/path/to/an/moe-checkpoint", key="model_path")
        wanted = path.strip()
    load_clicked = st.button("Load model", type="primary", key="load_model", disabled=not wanted)
    if load_clicked or (wanted == source):
        if load_clicked:
            with st.status(f"Loading `{wanted}` …", expanded=False) as status_box:
                try:
                    state.base_model(wanted)
                    st.session_state["model_source"] = wanted
                    status_box.update(label=f"Loaded `{wanted}`", state="complete")
                except Exception as exc:  # noqa: BLE001
                    status_box.update(label="Could not load the model", state="error")
                    st.error(f"**Could not load `{wanted}`** — {ui.error_message(exc)}", icon=":material/error:")

source = state.current_source()
with right:
    with ui.guard(f"Could not load the model `{source}`"):
        info = state.describe(source)
        layers = info["layers"]
        l0 = layers[0]
        router = f"{l0['score_fn']} top-{l0['top_k']}" + (" · grouped" if l0.get("grouped_topk") else "") \
            + (" · sel. bias" if l0.get("selection_bias") else "")
        shared = "yes" if any(l.get("shared_experts") for l in layers) else "no"
        st.subheader(f"{info['class']}")
        ui.facts([("Family", info["family"], "the router family GRIP Studio recognised"),
                       ("MoE layers", f"{info['num_moe_layers']} / {info.get('num_decoder_layers') or '?'}",
                        "MoE blocks / decoder layers"),
                       ("Experts E", str(l0["num_experts"]), "routed experts per MoE layer"),
                       ("Top-k", str(l0["top_k"]), "experts chosen per token")])
        ui.facts([("Router", router, f"{l0['router_class']}: how scores are computed and experts selected"),
                       ("Shared experts", shared, "always-on experts beside the routed ones"),
                       ("Parameters", f"{info['num_parameters'] / 1e6:.2f} M", f"{info['num_parameters']:,}"),
                       ("Router weight", " × ".join(str(v) for v in l0["router_weight_shape"]), "E × d")])
        df = pd.DataFrame([{"layer": l["layer"], "router module": l["router"], "router class": l["router_class"],
                            "E": l["num_experts"], "k": l["top_k"], "score": l["score_fn"],
                            "router bias": l["router_bias"], "selection bias": l["selection_bias"],
                            "shared experts": l["shared_experts"] or ""} for l in layers])
        with st.expander("MoE layers", expanded=False):
            ui.table(df, "arch_table", "moe-layers")

# ----------------------------------------------------------------------------- routing at a glance
# The landing page shows the base model's routing at once (the Routing explorer's default view,
# from the same cache): a speaker opens the app and the expert-load heatmap is already there.
with st.container(key="glance"):
    with ui.guard("Could not trace the model"):
        glance_key = state.data_key()
        glance_splits = state.splits_for(glance_key)
        if "retain" in glance_splits:
            n = min(64, len(glance_splits["retain"]))
            with st.spinner(f"Tracing {n} retain examples …"):
                glance = state.split_routing(source, glance_key, "retain", n, False)
            ui.figure(viz.load_heatmap(glance, title=f"Expert load per layer — retain split, {n} examples "
                                                     "(more on the Routing explorer page)"),
                      key="model_glance", file_name="expert-load-retain")

st.divider()

# ----------------------------------------------------------------------------- data
st.subheader("Data")
DEMO_DOMAIN, DEMO_ENTITIES, UPLOAD = ("Demo · forget one domain (WMDP-like)",
                                      "Demo · forget 10 % of entities (TOFU-like)", "Upload files")
key = state.data_key()
choice_index = {"demo:domain": 0, "demo:entities": 1}.get(key, 2)
dcol, scol = st.columns([2, 3], gap="large")
with dcol:
    choice = st.radio("Forget / retain data", [DEMO_DOMAIN, DEMO_ENTITIES, UPLOAD], index=choice_index, key="data_kind")
    if choice == DEMO_DOMAIN:
        st.session_state["data_key"] = "demo:domain"
    elif choice == DEMO_ENTITIES:
        st.session_state["data_key"] = "demo:entities"
    else:
        st.caption(f"JSONL, CSV/TSV or TOFU-style JSON with `question` + `answer` columns; "
                   f"≤ {state.MAX_UPLOAD_MB} MB and ≤ {state.MAX_UPLOAD_EXAMPLES:,} examples per file.")
        types = ["jsonl", "json", "csv", "tsv", "ndjson"]
        up = {split: st.file_uploader(f"{split} set" + (" (optional)" if split == "holdout" else ""), type=types,
                                      key=f"upload_{split}", max_upload_size=state.MAX_UPLOAD_MB)
              for split in ("forget", "retain", "holdout")}
        if st.button("Use these files", key="use_upload", disabled=not (up["forget"] and up["retain"])):
            try:
                files = {s: (f.name, f.getvalue()) for s, f in up.items() if f is not None}
                st.session_state["data_key"] = state.register_upload(files)
                st.success("Files read.", icon=":material/check_circle:")
            except Exception as exc:  # noqa: BLE001
                st.error(f"**Could not read the files** — {ui.error_message(exc)}", icon=":material/error:")

with scol:
    key = state.data_key()
    with ui.guard("Could not read the data"):
        splits = state.splits_for(key)
        st.markdown(f"**In use:** {state.data_label(key)}")
        sizes = pd.DataFrame([{"split": name, "examples": len(ex),
                               "domains": ", ".join(sorted({e.domain for e in ex if e.domain})) or "—"}
                              for name, ex in splits.items()])
        ui.table(sizes, "split_sizes", "splits")
        split = st.selectbox("Preview split", list(splits), key="preview_split")
        rows = [{"question": e.question, "answer": e.answer, "domain": e.domain, "entity": e.entity}
                for e in splits[split][:200]]
        ui.table(pd.DataFrame(rows), "split_preview", f"{split}-preview", height=240)

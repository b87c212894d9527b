"""Page 1 — Model: pick the demo or a local checkpoint, see its MoE architecture, choose the data."""
from __future__ import annotations

import os
import threading
import time

import pandas as pd
import streamlit as st

from app.lib import loading, state, ui
from grip_core import viz
from grip_core.moe.memory import fmt_bytes



def _resident_bytes() -> int:
    """Resident memory of this server process (VmRSS: anonymous + mapped file pages); 0 where unknown."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _load_with_progress(key: str, plan) -> None:
    """Load the shared model `key` in a worker thread while a progress bar advances.

    What the bar measures: transformers has no per-tensor callback, so phases (headers read →
    weights → routers) set its ends, and while the weights load it follows the growth of this
    process's resident memory against the plan's byte count (safetensors pages are resident once
    read; dtype conversion allocates the copy). Other sessions' work in the same process moves that
    number too: it is an honest estimate, capped below 100 % until the load returns.
    """
    bar = st.progress(0.05, text="Memory plan read from the safetensors headers …")
    need = plan.need_bytes if plan is not None else 0
    box: dict = {}

    def work():
        try:
            box["moe"] = state.load_base(key)
        except BaseException as exc:  # noqa: BLE001 - reported on the page
            box["error"] = exc

    rss0, t0 = _resident_bytes(), time.time()
    worker = threading.Thread(target=work, name="grip-load-model", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        grown = max(0, _resident_bytes() - rss0)
        frac = min(0.9, 0.05 + 0.85 * grown / need) if need else 0.05
        bar.progress(frac, text=f"Loading weights and tokenizer … {time.time() - t0:.0f} s"
                                + (f" · {fmt_bytes(grown)} of {fmt_bytes(need)} resident" if need else ""))
    if "error" in box:
        exc = box.pop("error")
        bar.empty()
        # after the rerun the radio shows the model still in use (it may not claim the one that failed)
        st.session_state["model_load_failed"] = (f"**Could not load `{loading.key_label(key)}`** — "
                                                 f"{ui.error_message(exc)} · still in use: "
                                                 f"`{loading.key_label(state.current_source())}`")
        del exc
        st.rerun()
    bar.progress(0.92, text=f"Weights loaded in {time.time() - t0:.0f} s; discovering the routers …")
    try:
        state.describe(key)
    except Exception as exc:  # noqa: BLE001
        bar.empty()
        st.error(f"**Could not read the model's routers** — {ui.error_message(exc)}", icon=":material/error:")
        return
    bar.progress(1.0, text=f"Loaded `{loading.key_label(key)}` in {time.time() - t0:.0f} s")
    st.session_state["model_source"] = key


ui.page_header("Model", "Which MoE, which routers, which data. Everything else in GRIP Studio uses what you pick here.")

# ----------------------------------------------------------------------------- model source
DEMO, LOCAL, TINY = "Demo MoE (shipped with GRIP Studio)", "Local checkpoint directory", "Tiny random OLMoE (development)"
DEMO_FINE = "Fine-grained demo MoE (Qwen2-MoE: 32 experts top-4 + a shared expert)"
DEMO_NAMES = {DEMO: "demo", DEMO_FINE: "demo-fine"}      # radio option -> load_model name
options = [DEMO, DEMO_FINE, LOCAL] + ([TINY] if os.environ.get("GRIP_STUDIO_DEV")
                                      or state.current_source().startswith("tiny:") else [])
source = state.current_source()


def _kind_of(key: str) -> str:
    """The radio option of the model key `key` (the model in use)."""
    if key.startswith("tiny:"):
        return TINY
    name = loading.parse_key(key)[0]
    return next((opt for opt, n in DEMO_NAMES.items() if n == name), LOCAL)


index = options.index(_kind_of(source)) if _kind_of(source) in options else 0
failed = st.session_state.pop("model_load_failed", None)
if failed:
    st.session_state["model_kind"] = options[index]

left, right = st.columns([2, 3], gap="large")
with left:
    kind = st.radio("Model", options, index=index, key="model_kind")
    if failed:
        st.error(failed, icon=":material/error:")
    if kind in DEMO_NAMES:
        name = DEMO_NAMES[kind]
        if not loading.demo_available(name):
            folder, flag = ("demo_model", "") if name == "demo" else ("demo_fine_model", " --preset fine")
            st.warning(f"This demo model is not built yet (expected in `data/{folder}/`). "
                       f"Rebuild it with `python -m grip_core.demo.build{flag}` or load a local checkpoint.",
                       icon=":material/warning:")
    elif kind == TINY:
        name = state.DEV_TINY
    else:
        source_name = loading.parse_key(source)[0]
        path = st.text_input("Checkpoint directory (config.json + *.safetensors)",
                             value="" if source_name in loading.DEMO_LABELS or source.startswith("tiny:") else source_name,
                             placeholder="/path/to/an/moe-checkpoint", key="model_path")
        name = path.strip()
    plan, plan_error, chosen = None, None, ("auto", "auto", None)
    if kind != TINY:
        o1, o2 = st.columns(2)
        device = o1.selectbox("Device", loading.device_options(), key="model_device",
                              help="auto: the GPU when there is one, else the CPU")
        dtype = o2.selectbox("Dtype", loading.DTYPE_OPTIONS, key="model_dtype",
                             help="auto: bfloat16 on a GPU; on a CPU float32 when it fits (bfloat16 matmuls are "
                                  "about 3x slower there), else bfloat16")
        device_map = None
        if loading.gpu_machine():
            device_map = st.selectbox("Device map", loading.DEVICE_MAP_OPTIONS, key="model_device_map",
                                      help="accelerate's big-model loading: weights that do not fit the GPU go to "
                                           "the CPU (none: everything on the device above)")
        limit_gb = st.number_input("Memory limit (GB, 0 = none)", min_value=0.0, step=1.0, key="model_mem_limit",
                                   value=float(os.environ.get("GRIP_STUDIO_MEMORY_LIMIT_GB") or 0.0),
                                   help="on a shared machine: refuse a model that needs more than this, even if "
                                        "more memory is free")
        chosen = (device, dtype, device_map)
        if name:
            # the plan reads config.json and the safetensors headers only: no weight is loaded here
            try:
                plan, plan_note = loading.plan_for(name, device, dtype, device_map, limit_gb or None)
            except Exception as exc:  # noqa: BLE001
                plan_error = ui.error_message(exc)
                st.error(f"**Cannot load `{name}`** — {plan_error}", icon=":material/error:")
            else:
                st.markdown(f"**Memory plan:** {plan.describe()}"
                            + (f" · limit {limit_gb:g} GB" if limit_gb else "") + (f" · {plan_note}" if plan_note else ""))
                if not plan.fits:
                    st.error(f"**Will not fit, not loaded** — {plan.refusal(flags=False)}", icon=":material/memory:")
    wanted = loading.key_for_plan(name, plan, chosen) if plan is not None else name
    refused = plan is not None and not plan.fits           # a plan error is already shown above; so is a refusal
    load_clicked = st.button("Load model", type="primary", key="load_model", disabled=not name or refused)
    if load_clicked and not refused and plan_error is None:
        _load_with_progress(wanted, plan)

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
        loaded_plan = getattr(state.base_model(source), "load_plan", None)
        st.caption(f"In use: `{loading.key_label(source)}`"
                   + (f" — {loaded_plan.describe()}" if loaded_plan is not None else ""))
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
                                                     "(more on the Routing explorer page)",
                                       shared=loading.shared_expert_count(state.describe(source))),
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

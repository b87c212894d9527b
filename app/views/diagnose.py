"""Page 7 — Diagnose: base + unlearned checkpoints + forget/retain files → "forgot, or rerouted?"."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import streamlit as st

from app.lib import state, ui
from grip_core import viz

ui.page_header("Diagnose", "Give an original and an unlearned checkpoint of the same MoE and the forget / retain "
                           "questions: GRIP Studio measures whether the model forgot, or only rerouted.")

try:
    from grip_core.runs.diagnose import diagnose as _diagnose
except ImportError:  # pragma: no cover - an older build
    _diagnose = None

with st.form("dg_form"):
    c1, c2 = st.columns(2)
    base = c1.text_input("Original (base) checkpoint", value="demo", key="dg_base",
                         help='"demo" or a local directory with config.json + *.safetensors')
    unlearned = c2.text_input("Unlearned checkpoint directory", value="", key="dg_unlearned",
                              placeholder="runs/<run id>/model  or  /path/to/unlearned")
    f1, f2, f3 = st.columns(3)
    types = ["jsonl", "json", "csv", "tsv"]
    forget = f1.file_uploader("Forget set", type=types, key="dg_forget", max_upload_size=state.MAX_UPLOAD_MB)
    retain = f2.file_uploader("Retain set", type=types, key="dg_retain", max_upload_size=state.MAX_UPLOAD_MB)
    holdout = f3.file_uploader("Holdout set (optional)", type=types, key="dg_holdout",
                               max_upload_size=state.MAX_UPLOAD_MB)
    d1, d2 = st.columns([3, 1])
    use_demo = d1.checkbox("Use the demo scenario's forget / retain / holdout sets instead of uploads",
                           value=state.data_key().startswith("demo:"), key="dg_use_demo")
    n_examples = d2.number_input("Examples per split", value=64, min_value=8, max_value=2000, step=32,
                                 key="dg_n", help="a sample of each split, so the diagnosis takes seconds, not "
                                                  "minutes, on a CPU")
    go = st.form_submit_button("Diagnose", type="primary", icon=":material/troubleshoot:")

if _diagnose is None:
    st.info("The diagnosis engine (`grip_core.runs.diagnose`) is not in this build yet; the form above will run it "
            "as soon as it lands. The CLI equivalent: `python -m grip_core diagnose --base … --unlearned … "
            "--forget-file … --retain-file …`.", icon=":material/construction:")


def _data(tmp: Path, n: int, seed: int):
    """UnlearningData from the demo scenario or the uploads, each split capped at `n` examples (speed)."""
    from grip_core.runs.data import UnlearningData

    if use_demo and state.data_key().startswith("demo:"):
        splits = state.splits_for(state.data_key())
    else:
        if forget is None or retain is None:
            raise ValueError("upload a forget file and a retain file (or tick the demo scenario)")
        from grip_core.data import read_qa_file

        splits = {}
        for name, up in (("forget", forget), ("retain", retain), ("holdout", holdout)):
            if up is not None:
                path = tmp / f"{name}{Path(up.name).suffix}"
                path.write_bytes(up.getvalue())
                splits[name] = read_qa_file(path, name=up.name)
    capped = {k: state.sample(v, n, seed) for k, v in splits.items()}
    train, held = UnlearningData._split_retain(capped["retain"], max(8, n // 2), seed)
    return UnlearningData(capped["forget"], train, held, capped.get("holdout", []), name="diagnose")


if go and _diagnose is not None:
    if not unlearned.strip():
        st.error("**Give the unlearned checkpoint directory.**", icon=":material/error:")
    else:
        with tempfile.TemporaryDirectory() as tmp, st.status("Diagnosing …", expanded=True) as box:
            try:
                from grip_core import load_model
                from grip_core.metrics.probes import exact_match_accuracy
                from grip_core.runs.verdict import base_knowledge_warning

                box.write("Reading the forget / retain data …")
                data = _data(Path(tmp), int(n_examples), 0)
                box.write(f"Loading the base model `{base.strip()}` …")
                base_moe = (state.private_copy(base.strip()) if base.strip() == state.current_source()
                            else state.load_checkpoint(base.strip()))
                box.write("Checking that the base model knows the forget set …")
                unknown = base_knowledge_warning(exact_match_accuracy(base_moe, data.forget), len(data.forget))
                st.session_state["dg_warning"] = unknown
                if unknown:   # the verdict would be "cannot diagnose": say so now, skip the slow part
                    st.session_state.pop("dg_report", None)
                    box.update(label="Cannot diagnose: the base model does not know the forget set", state="error",
                               expanded=False)
                else:
                    box.write(f"Loading the unlearned model `{unlearned.strip()}` …")
                    new_moe = state.load_checkpoint(unlearned.strip())
                    box.write("Measuring: probes, routing of both models, attribution, restoration attack …")
                    result = _diagnose(base_moe, new_moe, data, seed=0, eval_examples=int(n_examples))
                    st.session_state["dg_report"] = result.to_dict()
                    box.update(label=f"Diagnosis complete: {result.verdict}", state="complete", expanded=False)
            except Exception as exc:  # noqa: BLE001
                box.update(label="Diagnosis failed", state="error")
                st.error(f"**Could not diagnose** — {ui.error_message(exc)}", icon=":material/error:")

if st.session_state.get("dg_warning"):
    st.warning(f"**Cannot diagnose.** {st.session_state['dg_warning']}", icon=":material/warning:")
report = st.session_state.get("dg_report")
if report:
    verdict = str(report.get("verdict", ""))       # a kind of grip_core.runs.verdict (docs/method.md, Verdicts)
    color = viz.VERDICT_COLORS.get(verdict, viz.BASE)
    st.markdown(f"<div style='font-size:1.6rem;font-weight:700;color:{color}'>{verdict.upper()}</div>"
                f"<div style='font-size:1.1rem;line-height:1.5;padding:0.8rem 1rem;border-left:6px solid {color};"
                f"background:#F6F8FA;border-radius:6px;margin-bottom:1rem'>{report.get('paragraph', '')}</div>",
                unsafe_allow_html=True)
    summary = report
    s = viz.run_layer_series(summary)
    cols = st.columns(2, gap="medium")
    if s.get("retain_freq_change"):
        with cols[0]:
            ui.figure(viz.routing_shift_heatmap(s["retain_freq_change"], s["layers"], title="Retained routing shift"),
                      key="dg_shift_r", file_name="diagnose-retain-shift")
    if s.get("forget_freq_change"):
        with cols[1]:
            ui.figure(viz.routing_shift_heatmap(s["forget_freq_change"], s["layers"], title="Forget routing shift"),
                      key="dg_shift_f", file_name="diagnose-forget-shift")
    if s.get("stability_actual"):
        ui.figure(viz.stability_bars(s["layers"], s, name="unlearned"), key="dg_attr", file_name="diagnose-attribution")
    rest = viz.restoration_table({"unlearned": summary})
    if not rest.empty:
        ui.table(rest, "dg_rest", "diagnose-restoration", display=viz.percent_strings(rest))
    probes = viz.probes_table({"unlearned": summary})
    if not probes.empty:
        ui.table(probes, "dg_probes", "diagnose-probes")
    with st.expander("Full report (JSON)"):
        st.json(report, expanded=False)
        st.download_button("Download JSON", data=json.dumps(report, indent=2, default=str).encode(), file_name="diagnosis.json",
                           key="dg_json", type="tertiary", on_click="ignore")

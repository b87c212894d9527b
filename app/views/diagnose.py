"""Page 7 — Diagnose: base + unlearned checkpoints + forget/retain files → "forgot, or rerouted?"."""
from __future__ import annotations

import json
import os
import tempfile
import traceback
from pathlib import Path

import streamlit as st

from app.lib import loading, state, ui
from grip_core import viz

ui.page_header("Diagnose", "Give an original and an unlearned checkpoint of the same MoE and the forget / retain "
                           "questions: GRIP Studio measures whether the model forgot, or only rerouted.")

try:
    from grip_core.runs.diagnose import diagnose as _diagnose
except ImportError:  # pragma: no cover - an older build
    _diagnose = None

# ----------------------------------------------------------------------------- saved runs with weights
NO_RUN = "none: type the checkpoint paths below"


def _has_weights(run) -> bool:
    return (run.path / "model").is_dir()


def _run_base(run) -> str:
    """The base a run's weights belong to: the delta's base, else the model the run was made from."""
    from grip_core.moe.delta import is_delta_dir, read_delta_manifest

    if is_delta_dir(run.path / "model"):
        return str(read_delta_manifest(run.path / "model")["base"])
    return loading.parse_key(str(run.config.get("model") or "demo"))[0]


def _run_label(run) -> str:
    cfg = run.config
    what = " · ".join(str(v) for v in (cfg.get("method"), (cfg.get("grip") or {}).get("mode") and
                                       f"GRIP {cfg['grip']['mode']}", run.state) if v)
    return f"{run.run_id} ({what}) — " + ("weights saved" if _has_weights(run) else "no weights")


def _run_folder_without_weights(path: Path) -> str | None:
    """One line when `path` is a saved run (or its missing model/ folder) without weights, else None."""
    folder = path.parent if path.name == "model" and not path.exists() else path
    if (folder / "status.json").is_file() and (folder / "config.json").is_file() and not (folder / "model").is_dir():
        return (f"Run `{folder.name}` saved no weights, so it cannot be diagnosed: run it again with “Save the "
                "unlearned weights” ticked on the Unlearn page.")
    return None


runs = {}
try:
    from grip_core.runs.store import list_runs

    runs = {r.run_id: r for r in list_runs(state.runs_dir()) if not r.error}
except Exception as exc:  # noqa: BLE001
    st.error(f"**Could not list the saved runs** — {ui.error_message(exc)}", icon=":material/error:")
with_weights = [r for r in runs.values() if _has_weights(r)]


def _pick_run() -> None:
    """Fill the checkpoint fields from the picked run (before the form's widgets are drawn); a run without
    weights puts its folder in the field, so Diagnose says in one line why it cannot run."""
    run = runs.get(st.session_state.get("dg_run"))
    if run is None:
        return
    if not _has_weights(run):
        st.session_state["dg_unlearned"] = str(run.path)
        return
    try:
        st.session_state["dg_base"] = _run_base(run)
    except Exception as exc:  # noqa: BLE001 - shown below the picker
        st.session_state["dg_pick_error"] = ui.error_message(exc)
    st.session_state["dg_unlearned"] = str(run.path / "model")


st.session_state.setdefault("dg_base", "demo")
st.session_state.setdefault("dg_unlearned", "")
if st.session_state.get("dg_run") not in (None, NO_RUN, *runs):
    st.session_state["dg_run"] = NO_RUN                 # a run that is gone is not offered
picked = st.selectbox("Saved run to diagnose", [NO_RUN] + list(runs), key="dg_run", on_change=_pick_run,
                      format_func=lambda r: r if r == NO_RUN else _run_label(runs[r]),
                      help="runs saved with their unlearned weights (Unlearn page: “Save the unlearned weights”) "
                           "fill in the two checkpoints below")
st.caption(f"{len(with_weights)} of {len(runs)} saved run(s) kept their weights and can be diagnosed"
           + ("." if len(with_weights) == len(runs) else " (tick “Save the unlearned weights” on the Unlearn page "
                                                          "to keep them)."))
if picked in runs and not _has_weights(runs[picked]):
    st.warning(f"Run `{picked}` saved no weights, so it cannot be diagnosed: run it again with “Save the unlearned "
               "weights” ticked on the Unlearn page.", icon=":material/warning:")
if st.session_state.get("dg_pick_error"):
    st.error(f"**Could not read the run's base model** — {st.session_state.pop('dg_pick_error')}",
             icon=":material/error:")

with st.form("dg_form"):
    c1, c2 = st.columns(2)
    base = c1.text_input("Original (base) checkpoint", key="dg_base",
                         help='"demo" or a local directory with config.json + *.safetensors')
    unlearned = c2.text_input("Unlearned checkpoint directory", key="dg_unlearned",
                              placeholder="runs/<run id>/model  or  /path/to/unlearned",
                              help="a full checkpoint or a GRIP Studio weight delta: its tensors are streamed "
                                   "into the base model (one model in memory)")
    o1, o2, o3 = st.columns(3)
    dg_device = o1.selectbox("Device", loading.device_options(), key="dg_device")
    dg_dtype = o2.selectbox("Dtype", loading.DTYPE_OPTIONS, key="dg_dtype",
                            help="the base is loaded privately in this dtype, and the unlearned tensors into it")
    dg_device_map = (o3.selectbox("Device map", loading.DEVICE_MAP_OPTIONS, key="dg_device_map")
                     if loading.gpu_machine() else None)
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


def _private_base(name: str, box):
    """A freshly loaded base model owned by this diagnosis (never the shared cache: it is changed in place)."""
    from grip_core.moe.memory import ModelTooLargeError

    if name.startswith("tiny:"):
        return state.load_private(name)
    limit = float(os.environ.get("GRIP_STUDIO_MEMORY_LIMIT_GB") or 0) or None
    plan, note = loading.plan_for(name, dg_device, dg_dtype, dg_device_map, limit)
    box.write(f"Memory plan: {plan.describe()}" + (f" · {note}" if note else ""))
    if not plan.fits:                               # refuses with the numbers before any weight is read
        raise ModelTooLargeError(plan.refusal(flags=False))
    box.write(f"Loading a private copy of the base model `{name}` ({plan.dtype} on {plan.device}) …")
    return state.load_private(loading.model_key(name, plan.device, plan.dtype, plan.device_map))


if go and _diagnose is not None:
    base_name, new_path = base.strip(), unlearned.strip()
    failure, details = None, None
    if not new_path:
        failure = "give the unlearned checkpoint directory (or pick a saved run with weights)"
    elif _run_folder_without_weights(Path(new_path).expanduser()):
        failure = _run_folder_without_weights(Path(new_path).expanduser())
    elif not Path(new_path).expanduser().exists():
        failure = f"{new_path}: not a readable checkpoint directory"
    elif not base_name:
        failure = "give the original (base) checkpoint"
    else:
        with tempfile.TemporaryDirectory() as tmp, st.status("Diagnosing …", expanded=True) as box:
            base_moe = None
            try:
                from grip_core.metrics.probes import exact_match_accuracy
                from grip_core.runs.verdict import base_knowledge_warning

                box.write("Reading the forget / retain data …")
                data = _data(Path(tmp), int(n_examples), 0)
                base_moe = _private_base(base_name, box)
                box.write("Checking that the base model knows the forget set …")
                unknown = base_knowledge_warning(exact_match_accuracy(base_moe, data.forget), len(data.forget))
                st.session_state["dg_warning"] = unknown
                if unknown:   # the verdict would be "cannot diagnose": say so now, skip the slow part
                    st.session_state.pop("dg_report", None)
                    box.update(label="Cannot diagnose: the base model does not know the forget set", state="error",
                               expanded=False)
                else:
                    box.write("Measuring the base, then streaming the unlearned checkpoint's changed tensors into "
                              "it and measuring again: probes, routing, attribution, restoration attack …")
                    result = _diagnose(base_moe, str(Path(new_path).expanduser()), data, seed=0,
                                       eval_examples=int(n_examples))
                    st.session_state["dg_report"] = result.to_dict()
                    box.update(label=f"Diagnosis complete: {result.verdict}", state="complete", expanded=False)
            except Exception as exc:  # noqa: BLE001 - shown below, outside the status box
                failure = ui.error_message(loading.oom_error(base_name, exc) if loading.is_oom(exc) else exc)
                details = "".join(traceback.format_exception(exc))[-4000:]
                box.update(label="Diagnosis failed (the reason is below)", state="error", expanded=False)
            finally:
                base_moe = None                     # the private (now unlearned) model goes now, not at the next GC
                loading.release_memory()
    if failure:
        first, _, rest = failure.strip().partition("\n")
        st.error(f"**Could not diagnose** — {first}", icon=":material/error:")
        if rest.strip() or details:
            with st.expander("Details"):
                st.code((rest.strip() + "\n\n" + (details or "")).strip(), language="text")

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
    if report.get("ledger"):   # measured by this diagnosis: the checkpoint's tensors against the base's
        from grip_core.attacks.ledger import ledger_summary
        from grip_core.viz.robustness import ledger_bars
        ui.figure(ledger_bars([{"label": "this checkpoint", "ledger": ledger_summary(report["ledger"])}]),
                  key="dg_ledger_now", file_name="diagnose-update-ledger")
    with st.expander("Full report (JSON)"):
        st.json(report, expanded=False)
        st.download_button("Download JSON", data=json.dumps(report, indent=2, default=str).encode(), file_name="diagnosis.json",
                           key="dg_json", type="tertiary", on_click="ignore")

from app.views._robustness import render_robustness  # noqa: E402
render_robustness([st.session_state.get("dg_unlearned")], key="dg")

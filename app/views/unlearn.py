"""Page 4 — Unlearn: the same settings run twice, vanilla and with GRIP, side by side, live."""
from __future__ import annotations

import dataclasses
import typing

import streamlit as st

from app.lib import jobs, state, ui
from grip_core import viz

ui.page_header("Unlearn", "One method, one scope, one seed — run without and with GRIP on identical settings, and "
                          "watch forgetting and retained routing as they happen. Runs are saved to the run store.")

source, key = state.current_source(), state.data_key()

# ----------------------------------------------------------------------------- settings
from grip_core.grip import config as grip_config  # noqa: E402
from grip_core.grip.config import GRIPConfig  # noqa: E402
from grip_core.methods import available_methods, method_class  # noqa: E402
from grip_core.runs.config import RunConfig  # noqa: E402
from grip_core.runs.pair import pair_configs  # noqa: E402
from grip_core.runs.presets import DEFAULT_PRESET, PRESETS  # noqa: E402
from grip_core.scope import SCOPE_KINDS, ScopeConfig  # noqa: E402

METHOD_ABOUT = {
    "ga": "gradient ascent: L = −NLL(forget)",
    "graddiff": "gradient difference: L = −γ·NLL(forget) + α·NLL(retain)",
    "npo": "negative preference optimisation against a frozen reference (β), plus α·NLL(retain)",
    "simnpo": "NPO with length-normalised log-probability and no reference (β, δ), plus α·NLL(retain)",
    "rmu": "push forget activations at one layer toward a random direction c·u; keep retain activations (α)",
}

pair = jobs.current_pair()
busy = pair is not None and pair.running
RC, GC = RunConfig(), GRIPConfig()              # the one set of defaults (grip_core.runs.config, grip_core.grip.config)
# GRIPConfig.mode values a run can use, less "off" (the named modes of grip_config.MODES such as "drift" or
# "update-relative" are these plus the threshold / drift widgets below; their descriptions are the help text)
GRIP_MODES = [m for m in typing.get_args(grip_config.Mode) if m != "off"]
MODE_HELP = "; ".join(f"{m}: {grip_config.MODES[m].description}" for m in GRIP_MODES if m in grip_config.MODES)


def _args_of(method: str, preset) -> dict:
    """The method's arguments as widgets (typed by its args dataclass; defaults: the preset's, else the class's)."""
    args_cls = method_class(method).args_cls
    hints = typing.get_type_hints(args_cls)
    fields = list(dataclasses.fields(args_cls))
    out = {}
    cols = st.columns(min(len(fields), 5)) if fields else []
    for i, f in enumerate(fields):
        col, hint = cols[i % len(cols)], hints.get(f.name)
        default, name = preset.method_args.get(f.name, f.default), f"ul_arg_{method}_{f.name}"
        if typing.get_origin(hint) is typing.Literal:
            out[f.name] = state.kept(col.selectbox, f.name, name, default, list(typing.get_args(hint)), disabled=busy)
        elif hint is bool:
            out[f.name] = state.kept(col.checkbox, f.name, name, bool(default), disabled=busy)
        elif hint is int:
            out[f.name] = int(state.kept(col.number_input, f.name, name, int(default), step=1, disabled=busy))
        elif hint is float:
            out[f.name] = float(state.kept(col.number_input, f.name, name, float(default), format="%g", disabled=busy))
        else:
            out[f.name] = state.kept(col.text_input, f.name, name, str(default), disabled=busy)
    return out


with st.container(border=True):
    st.markdown("**Scenario and method**")
    c1, c2, c3 = st.columns([2, 2, 2])
    if key.startswith("demo:"):
        scen = c1.selectbox("Scenario", ["domain", "entities"], index=["domain", "entities"].index(key.split(":")[1]),
                            format_func=lambda s: state.data_label(f"demo:{s}"),
                            key="ul_scenario", disabled=busy)
        if f"demo:{scen}" != key:
            st.session_state["data_key"] = key = f"demo:{scen}"
    else:
        c1.text_input("Scenario", value="uploaded files (Model page)", disabled=True, key="ul_scenario_custom")
    preset_name = state.kept(c2.selectbox, "Regime (preset)", "ul_preset", DEFAULT_PRESET, list(PRESETS),
                             disabled=busy, help="\n\n".join(f"**{p.name}**: {p.about}" for p in PRESETS.values()))
    preset = PRESETS[preset_name]
    method = state.kept(c3.selectbox, "Method", "ul_method", RC.method, available_methods(), disabled=busy)
    st.caption(f"**{preset.name}** — {preset.about}  \n**{method}** — "
               f"{METHOD_ABOUT.get(method, 'a registered unlearning loss')}")
    method_args = _args_of(method, preset)

with st.container(border=True):
    st.markdown("**Scope and schedule**")
    c1, c2, c3, c4, c5 = st.columns(5)
    kinds = [k for k in SCOPE_KINDS if k != "layers"]
    scope_kind = state.kept(c1.selectbox, "Trainable scope", f"ul_scope_{preset_name}", preset.scope.kind, kinds,
                            disabled=busy)
    lr = state.kept(c2.number_input, "Learning rate", f"ul_lr_{preset_name}", float(preset.scope.lr), format="%g",
                    disabled=busy)
    router_mult = state.kept(c3.number_input, "Router lr ×", f"ul_rmult_{preset_name}", float(preset.scope.router_lr_mult),
                             min_value=0.0, disabled=busy,
                             help="×30 is where the probes found the router shortcut (docs/method.md#what-the-probes-found)")
    steps = int(state.kept(c4.number_input, "Steps", "ul_steps", RC.steps, min_value=1, max_value=2000, step=10,
                           disabled=busy))
    seed = int(state.kept(c5.number_input, "Seed", "ul_seed", RC.seed, min_value=0, step=1, disabled=busy))

with st.container(border=True):
    st.markdown("**GRIP** (the vanilla run uses the same settings with GRIP off)")
    g1, g2, g3, g4, g5, g6 = st.columns(6)
    mode = state.kept(g1.selectbox, "Mode", "ul_grip_mode", GC.mode, GRIP_MODES, disabled=busy, help=MODE_HELP)
    tkind = state.kept(g2.selectbox, "Null-space threshold", "ul_grip_tkind", GC.threshold_kind,
                       list(typing.get_args(grip_config.ThresholdKind)), disabled=busy,
                       help="absolute σ² > ε acts as a numerical-rank test and can freeze whole router rows; "
                            "relative keeps the directions holding a share of the energy (plastic)")
    if tkind == "absolute":
        eps_null = state.kept(g3.number_input, "ε_null (σ² >)", "ul_grip_eps", GC.eps_null, format="%g", disabled=busy)
        energy = GC.energy
    else:
        energy = state.kept(g3.number_input, "energy kept", "ul_grip_energy", GC.energy, min_value=0.5, max_value=1.0,
                            format="%g", disabled=busy)
        eps_null = GC.eps_null
    margin_method = state.kept(g4.selectbox, "Margin constraint", "ul_grip_margin", GC.margin_method,
                               list(typing.get_args(grip_config.MarginMethod)), disabled=busy,
                               help="scale: closed-form α per row (fast); kaczmarz: projection (tighter)")
    drift_every = int(state.kept(g5.number_input, "Drift correction every", "ul_grip_drift", GC.drift_every, min_value=0,
                                 step=5, disabled=busy, help="drift-aware GRIP: every N steps re-capture the retained "
                                 "router inputs and steer the routers back (0 = off; docs/method.md#drift-aware-grip)"))
    input_anchor = float(state.kept(g6.number_input, "Router-input anchor λ", "ul_grip_anchor", GC.input_anchor,
                                    min_value=0.0, step=100.0, format="%g", disabled=busy,
                                    help="the anchor mode (λ 1000): a loss term holding retained tokens' router "
                                         "inputs at the base model's, against input drift (0 = off; GRIP run only; "
                                         "docs/method.md#router-input-anchor)"))

with st.expander("Batch and evaluation"):
    a1, a2, a3, a4 = st.columns(4)
    batch_size = int(state.kept(a1.number_input, "Batch size", "ul_bs", RC.batch_size, min_value=1, max_value=256,
                                disabled=busy))
    eval_every = int(state.kept(a2.number_input, "Evaluate every N steps", "ul_eval_every", RC.eval_every, min_value=0,
                                disabled=busy))
    eval_examples = int(state.kept(a3.number_input, "Examples per split (step probes)", "ul_eval_n", RC.eval_examples,
                                   min_value=8, max_value=1024, disabled=busy,
                                   help="the live cards and curves: the first N forget examples and N held-out "
                                        "retain examples, every N steps"))
    final_examples = int(state.kept(a4.number_input, "Examples per split (final probes, 0 = all)", "ul_final_n",
                                    RC.final_eval_examples, min_value=0, disabled=busy,
                                    help="the table at the end and Compare: the first N examples of every split "
                                         "(forget, retain, holdout, paraphrases)"))
    a5, a6 = st.columns([1, 1])
    fit_examples = int(state.kept(a5.number_input, "Retain examples for the GRIP fit (0 = the whole retain split)",
                                  "ul_fit_n", RC.grip_fit_examples, min_value=0, step=64, disabled=busy,
                                  help="fewer examples fit faster but constrain the routers on fewer inputs"))
    a6.write("")
    save_weights = state.kept(a6.checkbox, "Save the unlearned weights with the run (for Diagnose or later use)",
                              "ul_save_weights", RC.save_weights, disabled=busy)

scope = ScopeConfig(kind=scope_kind, lr=float(lr), router_lr_mult=float(router_mult),
                    expert_lr_mult=preset.scope.expert_lr_mult, other_lr_mult=preset.scope.other_lr_mult)
grip_cfg = GRIPConfig(mode=mode, threshold_kind=tkind, eps_null=float(eps_null), energy=float(energy),
                      margin_method=margin_method, drift_every=drift_every, input_anchor=input_anchor, seed=seed)
scenario = key.split(":", 1)[1] if key.startswith("demo:") else "custom"
common = dict(method=method, method_args=method_args, scope=scope, model=source, scenario=scenario, steps=steps,
              batch_size=batch_size, seed=seed, eval_every=eval_every, eval_examples=eval_examples,
              final_eval_examples=final_examples, grip_fit_examples=fit_examples, save_weights=save_weights,
              preset=preset_name if scope == preset.scope else "")   # the regime, unless its scope was edited
final_label = f"{final_examples} examples per split" if final_examples else "every example of every split"
st.caption(f"Live cards: step probes on {eval_examples} forget and {eval_examples} held-out retain examples every "
           f"{eval_every} steps. Final table and Compare: final probes on {final_label}. "
           + ("The unlearned weights are saved (Diagnose can read them)." if save_weights else
              "Weights are not saved: tick “Save the unlearned weights” to diagnose these runs later."))

_others = [p for p in jobs.running_pairs() if p is not pair]
if not busy and len(_others) >= jobs.max_concurrent_jobs():
    st.info(f"The server is busy: {len(_others)} unlearning job pair(s) are running (its limit is "
            f"{jobs.max_concurrent_jobs()}). Start again when one has finished.", icon=":material/hourglass_top:")
b1, b2, b3 = st.columns([2, 1, 4])
start = b1.button("Run vanilla + GRIP", type="primary", key="ul_start", disabled=busy, icon=":material/play_arrow:")
cancel = b2.button("Cancel", key="ul_cancel", disabled=not busy, icon=":material/stop:")
if cancel and pair is not None:
    pair.request_cancel()
    st.toast("Cancelling: the jobs stop at their next forward pass …")
if start:
    try:
        configs = pair_configs(RunConfig(**common, grip=grip_cfg))
        data = state.unlearning_data(key, seed, eval_examples)
        pair = jobs.start_pair(state.base_model(source), state.model_lock(source), data, configs, state.runs_dir(),
                               source)
    except Exception as exc:  # noqa: BLE001
        st.error(f"**Could not start the runs** — {ui.error_message(exc)}", icon=":material/error:")
    else:
        st.rerun()                               # redraw with the settings locked and Cancel enabled


# ----------------------------------------------------------------------------- live view
STATUS_ICON = {"queued": ":material/schedule:", "running": ":material/directions_run:", "completed": ":material/check_circle:",
               "cancelled": ":material/cancel:", "stopped": ":material/warning:", "failed": ":material/error:"}


def _last(rows, *keys):
    for r in reversed(rows):
        for k in keys:
            if r.get(k) is not None:
                return r[k]
    return None


def _live_view(pair: jobs.JobPair) -> None:
    cols = st.columns(len(pair.slots), gap="medium")
    for col, slot in zip(cols, pair.slots.values()):
        cfg = slot.config
        with col:
            color = viz.VANILLA if slot.name == "vanilla" else viz.GRIP
            st.markdown(f"<h3 style='color:{color};margin-bottom:0'>{slot.name}</h3>", unsafe_allow_html=True)
            st.caption(viz.run_display_name(dataclasses.asdict(cfg)) + " · " + cfg.display_name())
            st.progress(slot.fraction, text=slot.phase())
            stab = _last(slot.rows, "retain_stability")
            fem, rem = _last(slot.rows, "forget_em"), _last(slot.rows, "retain_em")
            step = _last(slot.rows, "step") if fem is not None else None
            at = f" · step {step}" if step is not None else ""
            probe = f"step probe: {cfg.eval_examples} forget examples{at}"
            ui.facts([("loss", "—" if not slot.rows else f"{slot.rows[-1].get('loss', float('nan')):.3f}",
                       "the training loss of the last step"),
                      ("stability", viz.pct(stab), f"share of retained (token, layer) top-k sets unchanged, at the "
                                                   f"last step probe{at}"),
                      ("forget EM", viz.pct(fem), f"exact match on the first {cfg.eval_examples} forget examples"
                                                  f"{at} (the final table uses the final probes)"),
                      ("retain EM", viz.pct(rem), f"exact match on {cfg.eval_examples} held-out retain examples{at}")])
            st.caption(f"Cards: {probe}. Updated every {cfg.eval_every} steps.")
            if slot.status in ("failed", "stopped", "cancelled"):
                took = ""
                if slot.status == "cancelled" and pair.cancel_requested and slot.finished:
                    took = f" (stopped {max(0.0, slot.finished - pair.cancel_requested):.1f} s after Cancel)"
                reason = slot.result.reason
                text = reason if reason.startswith(slot.status) else f"{slot.status}: {reason}"
                (st.error if slot.status == "failed" else st.warning)(text + took, icon=STATUS_ICON[slot.status])
    start = [pair.base_row] if pair.base_row else []
    logs = {s.name: start + list(s.rows) for s in pair.slots.values()}
    if any(s.rows for s in pair.slots.values()):
        fig = viz.training_curves(logs, title="Unlearning, live",
                                  colors={"vanilla": viz.VANILLA, "GRIP": viz.GRIP},
                                  total_steps=max(s.config.steps for s in pair.slots.values()))
        ui.figure(fig, key="ul_curves", file_name="training-curves")
    if pair.error:
        st.error(f"**The jobs stopped** — {pair.error}", icon=":material/error:")


if pair is not None:
    st.divider()
    if pair.running:
        @st.fragment(run_every=1.0)
        def _poll():
            if not pair.running:
                st.rerun()                       # full rerun: re-enable the form, show results
            _live_view(pair)
        _poll()
    else:
        _live_view(pair)
        finished = [s for s in pair.slots.values() if s.run_dir is not None and s.summary]
        if finished:
            cfg = finished[0].config
            n = cfg.final_eval_examples
            st.markdown(f"**Final probes** — {f'the first {n} examples of every split' if n else 'every example'} "
                        f"(forget, retain, holdout, paraphrases): the numbers below and in Compare. The live cards "
                        f"above used the step probe ({cfg.eval_examples} forget examples), so they can differ.")
            df = viz.runs_table({s.name: (s.summary, dataclasses.asdict(s.config)) for s in finished})
            ui.table(df, "ul_summary", "unlearning-summary", display=viz.percent_strings(df))
            st.session_state["compare_runs"] = [str(s.run_dir) for s in finished]
            if st.button("Open these runs in Compare", type="primary", icon=":material/compare:", key="ul_open_cmp"):
                st.switch_page("views/compare.py")

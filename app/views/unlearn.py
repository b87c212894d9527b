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
from grip_core.grip.config import GRIPConfig  # noqa: E402
from grip_core.methods import available_methods, method_class  # noqa: E402
from grip_core.runs.config import RunConfig  # noqa: E402
from grip_core.runs.presets import PRESETS  # noqa: E402
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
    preset_name = c2.selectbox("Regime (preset)", list(PRESETS), key="ul_preset", disabled=busy,
                               help="\n\n".join(f"**{p.name}**: {p.about}" for p in PRESETS.values()))
    preset = PRESETS[preset_name]
    methods = available_methods()
    method = c3.selectbox("Method", methods, index=methods.index("graddiff") if "graddiff" in methods else 0,
                          key="ul_method", disabled=busy)
    st.caption(f"**{preset.name}** — {preset.about}  \n**{method}** — "
               f"{METHOD_ABOUT.get(method, 'a registered unlearning loss')}")

    args_cls = method_class(method).args_cls
    hints = typing.get_type_hints(args_cls)
    method_args = {}
    fields = [f for f in dataclasses.fields(args_cls)]
    if fields:
        cols = st.columns(min(len(fields), 5))
        for i, f in enumerate(fields):
            col = cols[i % len(cols)]
            default = preset.method_args.get(f.name, f.default)
            hint = hints.get(f.name)
            wkey = f"ul_arg_{method}_{f.name}"
            if typing.get_origin(hint) is typing.Literal:
                opts = list(typing.get_args(hint))
                method_args[f.name] = col.selectbox(f.name, opts, index=opts.index(default), key=wkey, disabled=busy)
            elif hint is bool:
                method_args[f.name] = col.checkbox(f.name, value=bool(default), key=wkey, disabled=busy)
            elif hint is int:
                method_args[f.name] = int(col.number_input(f.name, value=int(default), step=1, key=wkey, disabled=busy))
            elif hint is float:
                method_args[f.name] = float(col.number_input(f.name, value=float(default), format="%g", key=wkey,
                                                             disabled=busy))
            else:
                method_args[f.name] = col.text_input(f.name, value=str(default), key=wkey, disabled=busy)

with st.container(border=True):
    st.markdown("**Scope and schedule**")
    c1, c2, c3, c4, c5 = st.columns(5)
    scope_kind = c1.selectbox("Trainable scope", list(SCOPE_KINDS) if "layers" not in SCOPE_KINDS else
                              [k for k in SCOPE_KINDS if k != "layers"],
                              index=[k for k in SCOPE_KINDS if k != "layers"].index(preset.scope.kind),
                              key=f"ul_scope_{preset_name}", disabled=busy)
    lr = c2.number_input("Learning rate", value=float(preset.scope.lr), format="%g", key=f"ul_lr_{preset_name}",
                         disabled=busy)
    router_mult = c3.number_input("Router lr ×", value=float(preset.scope.router_lr_mult), min_value=0.0,
                                  key=f"ul_rmult_{preset_name}", disabled=busy,
                                  help="×30 is where the probes found the router shortcut (docs/method.md#what-the-probes-found)")
    steps = int(c4.number_input("Steps", value=60, min_value=1, max_value=2000, step=10, key="ul_steps", disabled=busy))
    seed = int(c5.number_input("Seed", value=0, min_value=0, step=1, key="ul_seed", disabled=busy))

with st.container(border=True):
    st.markdown("**GRIP** (the vanilla run uses the same settings with GRIP off)")
    g1, g2, g3, g4, g5 = st.columns(5)
    mode = g1.selectbox("Mode", ["update", "gradient"], key="ul_grip_mode", disabled=busy,
                        help="update: project ΔΘ after the optimizer step (right for Adam); gradient: project the "
                             "gradient (exact for SGD only), for comparison")
    tkind = g2.selectbox("Null-space threshold", ["relative", "absolute"], key="ul_grip_tkind", disabled=busy,
                         help="absolute σ² > ε acts as a numerical-rank test and can freeze whole router rows; "
                              "relative keeps the directions holding a share of the energy (plastic)")
    if tkind == "absolute":
        eps_null = g3.number_input("ε_null (σ² >)", value=1e-2, format="%g", key="ul_grip_eps", disabled=busy)
        energy = GRIPConfig.energy
    else:
        energy = g3.number_input("energy kept", value=0.999, min_value=0.5, max_value=1.0, format="%g",
                                 key="ul_grip_energy", disabled=busy)
        eps_null = GRIPConfig.eps_null
    margin_method = g4.selectbox("Margin constraint", ["scale", "kaczmarz"], key="ul_grip_margin", disabled=busy,
                                 help="scale: closed-form α per row (fast); kaczmarz: projection (tighter)")
    drift_every = int(g5.number_input("Drift correction every", value=0, min_value=0, step=5, key="ul_grip_drift",
                                      disabled=busy, help="drift-aware GRIP: every N steps re-capture the retained "
                                      "router inputs and steer the routers back (0 = off; docs/method.md#drift-aware-grip)"))

with st.expander("Batch and evaluation"):
    a1, a2, a3, a4 = st.columns(4)
    batch_size = int(a1.number_input("Batch size", value=16, min_value=1, max_value=256, key="ul_bs", disabled=busy))
    eval_every = int(a2.number_input("Evaluate every N steps", value=10, min_value=0, key="ul_eval_every",
                                     disabled=busy))
    eval_examples = int(a3.number_input("Examples per split (step probes)", value=64, min_value=8, max_value=1024,
                                        key="ul_eval_n", disabled=busy))
    final_examples = int(a4.number_input("Examples per split (final probes, 0 = all)", value=0, min_value=0,
                                         key="ul_final_n", disabled=busy))
    a5, a6 = st.columns([1, 1])
    fit_examples = int(a5.number_input("Retain examples for the GRIP fit (0 = the whole retain split)", value=0,
                                       min_value=0, step=64, key="ul_fit_n", disabled=busy,
                                       help="fewer examples fit faster but constrain the routers on fewer inputs"))
    a6.write("")
    save_weights = a6.checkbox("Save the unlearned weights with the run (for Diagnose or later use)", value=False,
                               key="ul_save_weights", disabled=busy)

scope = ScopeConfig(kind=scope_kind, lr=float(lr), router_lr_mult=float(router_mult),
                    expert_lr_mult=preset.scope.expert_lr_mult, other_lr_mult=preset.scope.other_lr_mult)
grip_cfg = GRIPConfig(mode=mode, threshold_kind=tkind, eps_null=float(eps_null), energy=float(energy),
                      margin_method=margin_method, drift_every=drift_every, seed=seed)
scenario = key.split(":", 1)[1] if key.startswith("demo:") else "custom"
common = dict(method=method, method_args=method_args, scope=scope, model=source, scenario=scenario, steps=steps,
              batch_size=batch_size, seed=seed, eval_every=eval_every, eval_examples=eval_examples,
              final_eval_examples=final_examples, grip_fit_examples=fit_examples, save_weights=save_weights)

_others = [p for p in jobs.running_pairs() if p is not pair]
if not busy and len(_others) >= jobs.max_concurrent_jobs():
    st.info(f"The server is busy: {len(_others)} unlearning job pair(s) are running (its limit is "
            f"{jobs.max_concurrent_jobs()}). Start again when one has finished.", icon=":material/hourglass_top:")
b1, b2, b3 = st.columns([2, 1, 4])
start = b1.button("Run vanilla + GRIP", type="primary", key="ul_start", disabled=busy, icon=":material/play_arrow:")
cancel = b2.button("Cancel", key="ul_cancel", disabled=not busy, icon=":material/stop:")
if cancel and pair is not None:
    pair.request_cancel()
    st.toast("Cancelling after the current step …")
if start:
    try:
        configs = {"vanilla": RunConfig(**common, grip=dataclasses.replace(grip_cfg, mode="off")),
                   "GRIP": RunConfig(**common, grip=grip_cfg)}
        data = state.unlearning_data(key, seed, eval_examples)
        pair = jobs.start_pair(state.base_model(source), state.model_lock(source), data, configs, state.runs_dir(),
                               source)
    except Exception as exc:  # noqa: BLE001
        st.error(f"**Could not start the runs** — {ui.error_message(exc)}", icon=":material/error:")
    else:
        st.rerun()                               # redraw with the settings locked and Cancel enabled


# ----------------------------------------------------------------------------- live view
STATUS_ICON = {"queued": ":material/schedule:", "preparing": ":material/hourglass_top:",
               "running": ":material/directions_run:", "completed": ":material/check_circle:",
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
        with col:
            color = viz.VANILLA if slot.name == "vanilla" else viz.GRIP
            st.markdown(f"<h3 style='color:{color};margin-bottom:0'>{slot.name}</h3>", unsafe_allow_html=True)
            st.caption(viz.run_display_name(dataclasses.asdict(slot.config)) + " · " + slot.config.display_name())
            st.progress(slot.fraction, text=f"{slot.status} — {slot.phase()}")
            stab = _last(slot.rows, "retain_stability", "stability", "retained_stability")
            fem, rem = _last(slot.rows, "forget_em"), _last(slot.rows, "retain_em")
            ui.facts([("loss", "—" if not slot.rows else f"{slot.rows[-1].get('loss', float('nan')):.3f}", None),
                      ("stability", viz.pct(stab), "share of retained (token, layer) top-k sets unchanged, "
                                                        "at the last evaluation"),
                      ("forget EM", viz.pct(fem), "exact match on the forget probe subset"),
                      ("retain EM", viz.pct(rem), "exact match on the held-out retain slice")])
            if slot.status in ("failed", "stopped", "cancelled"):
                (st.error if slot.status == "failed" else st.warning)(f"{slot.status}: {slot.reason}",
                                                                      icon=STATUS_ICON[slot.status])
    start = [pair.base_row] if pair.base_row else []
    logs = {s.name: start + list(s.rows) for s in pair.slots.values()}
    if any(logs.values()):
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
        finished = [s for s in pair.slots.values() if s.run_dir is not None]
        if finished:
            df = viz.runs_table({s.name: (s.summary, dataclasses.asdict(s.config)) for s in finished})
            ui.table(df, "ul_summary", "unlearning-summary", display=viz.percent_strings(df))
            st.session_state["compare_runs"] = [str(s.run_dir) for s in finished]
            if st.button("Open these runs in Compare", type="primary", icon=":material/compare:", key="ul_open_cmp"):
                st.switch_page("views/compare.py")

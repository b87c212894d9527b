"""The Model page at real size (plan, refusal, load in bfloat16) and Diagnose from a saved run (AppTest, real files).

The real-width checkpoint is a random one-layer OLMoE at OLMoE-1B-7B's width (tests/conftest.py):
0.42 B parameters, 64 experts, top-8.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from test_app_pages import app, assert_clean, studio  # noqa: F401  (the module-scoped environment fixture)

from app.lib import loading

pytestmark = pytest.mark.timeout(600)

LOCAL = "Local checkpoint directory"


def _texts(at) -> str:
    return " ".join(m.value for m in at.markdown) + " " + " ".join(c.value for c in at.caption)


def _open_path(path: Path):
    at = app()
    at.radio(key="model_kind").set_value(LOCAL).run()
    at.text_input(key="model_path").input(str(path)).run()
    return at


def test_model_page_plans_then_loads_a_real_width_checkpoint_in_bfloat16(studio, real_width_checkpoint):
    from app.lib import state
    from grip_core.moe.memory import plan_load

    at = _open_path(real_width_checkpoint)
    assert_clean(at)
    # the plan, from the safetensors headers only, before anything is loaded
    auto = plan_load(real_width_checkpoint)
    assert auto.dtype == "float32" and "**Memory plan:** olmoe-real-width: 0.42 B parameters, 1.7 GB in float32 on cpu; " \
        in _texts(at) and "(auto: float32 on CPU, it fits)" in _texts(at)
    assert at.session_state["model_source"] == "demo"
    at.selectbox(key="model_dtype").set_value("bfloat16").run()
    plan = plan_load(real_width_checkpoint, dtype="bfloat16")
    assert plan.dtype == "bfloat16" and "0.42 B parameters" in plan.describe()
    assert f"**Memory plan:** {plan.describe().split(';')[0]}; " in _texts(at)
    assert not at.button(key="load_model").disabled

    at.button(key="load_model").click().run()
    assert_clean(at)
    key = f"{real_width_checkpoint}#cpu,bfloat16"
    assert at.session_state["model_source"] == key
    try:
        moe = state.base_model(key)
        assert next(moe.model.parameters()).dtype.__str__() == "torch.bfloat16"
        assert moe.load_plan.dtype == "bfloat16"
        html = " ".join(m.value for m in at.markdown)
        assert ">Experts E</div>" in html and ">64</div>" in html and ">Top-k</div>" in html and ">8</div>" in html
        assert "OlmoeForCausalLM" in " ".join(h.value for h in at.subheader)
        assert f"In use: `{loading.key_label(key)}`" in _texts(at)
    finally:
        state.base_model.clear()                 # 0.84 GB: not kept for the rest of the session


def test_model_page_refuses_a_model_over_the_memory_limit(studio, real_width_checkpoint):
    at = _open_path(real_width_checkpoint)
    at.selectbox(key="model_dtype").set_value("float32")
    at.number_input(key="model_mem_limit").set_value(0.5).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert any("Will not fit, not loaded" in e and "needs 1.7 GB in float32, 848 MB in bfloat16" in e
               and "500 MB free on cpu" in e for e in errors), errors
    assert at.button(key="load_model").disabled
    assert at.session_state["model_source"] == "demo"
    # bfloat16 under the same limit also refuses, and "auto" says what it would have picked
    at.selectbox(key="model_dtype").set_value("auto").run()
    assert any("needs 1.7 GB in float32" in e.value for e in at.error)
    assert "auto: float32 does not fit, bfloat16" in _texts(at)


def test_model_keys_round_trip():
    assert loading.parse_key("demo") == ("demo", {"device": "auto", "dtype": "auto", "device_map": None})
    key = loading.model_key("/m/olmoe#1", "cuda:0", "bfloat16", "auto")
    assert key == "/m/olmoe#1#cuda:0,bfloat16,auto"
    assert loading.parse_key(key) == ("/m/olmoe#1", {"device": "cuda:0", "dtype": "bfloat16", "device_map": "auto"})
    assert loading.model_key("demo", "auto", "auto", "none") == "demo"
    assert loading.is_oom(MemoryError()) and loading.is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not loading.is_oom(RuntimeError("shape mismatch"))


def test_diagnose_page_from_the_run_picker(studio):
    """A short run saved with its weights (a delta) and one without: the picker fills the form; diagnose runs."""
    from app.lib import state
    from grip_core.grip.config import GRIPConfig
    from grip_core.runs import run_unlearning
    from grip_core.runs.config import RunConfig

    source = studio.get("GRIP_STUDIO_MODEL", "demo")
    data = state.unlearning_data("demo:domain", 0, 8)
    moe = state._load(source)
    common = dict(model=source, steps=2, batch_size=4, eval_every=0, eval_examples=8, final_eval_examples=8,
                  grip_fit_examples=64, grip=GRIPConfig(mode="off"), method="graddiff")
    with_w = run_unlearning(moe, RunConfig(**common, save_weights=True, label="with-weights"), data,
                            runs_dir=state.runs_dir())
    without = run_unlearning(moe, RunConfig(**common, label="no-weights"), data, runs_dir=state.runs_dir())
    assert (with_w.run_dir / "model" / "grip_delta.json").is_file() and not (without.run_dir / "model").exists()

    at = app("diagnose")
    assert_clean(at)
    picker = at.selectbox(key="dg_run")
    labels = " | ".join(picker.options)
    assert f"{with_w.run_dir.name} (graddiff · GRIP off · completed) — weights saved" in labels
    assert f"{without.run_dir.name} (graddiff · GRIP off · completed) — no weights" in labels
    picker.set_value(without.run_dir.name).run()
    assert any("saved no weights" in w.value for w in at.warning), [w.value for w in at.warning]
    assert not at.error

    at.selectbox(key="dg_run").set_value(with_w.run_dir.name).run()
    assert not at.warning
    assert at.text_input(key="dg_unlearned").value == str(with_w.run_dir / "model")
    assert at.text_input(key="dg_base").value == source
    at.selectbox(key="dg_dtype").set_value("float32")
    at.number_input(key="dg_n").set_value(8)
    at.button[0].click().run()
    assert_clean(at)
    report = at.session_state["dg_report"]
    assert report["verdict"] in ("rerouted", "erased", "mixed", "not forgotten")
    assert report["checkpoint"]["layout"] == "delta" and report["checkpoint"]["tensors_changed"] > 0
    # the shared base model was not the one changed in place
    shared = state.base_model(source).model.state_dict()
    fresh = state._load(source).model.state_dict()
    import torch

    assert all(torch.equal(shared[k], fresh[k]) for k in fresh)

"""Dashboard settings that must not lie: the Unlearn page's defaults are RunConfig's and GRIPConfig's and
survive leaving the page; the Model page's radio follows the model in use after a failed load (AppTest)."""
from __future__ import annotations

import typing

import pytest

from tests.test_app_pages import app, assert_clean, studio  # noqa: F401 - studio is a fixture

pytestmark = pytest.mark.timeout(600)


def test_unlearn_defaults_are_the_library_defaults_and_survive_navigation(studio):  # noqa: F811
    from grip_core.grip import config as grip_config
    from grip_core.runs.config import RunConfig

    rc, gc = RunConfig(), grip_config.GRIPConfig()
    at = app("unlearn")
    assert_clean(at)
    for key, value in (("ul_steps", rc.steps), ("ul_eval_every", rc.eval_every), ("ul_eval_n", rc.eval_examples),
                       ("ul_final_n", rc.final_eval_examples), ("ul_bs", rc.batch_size), ("ul_fit_n", rc.grip_fit_examples),
                       ("ul_seed", rc.seed), ("ul_grip_drift", gc.drift_every)):
        assert at.number_input(key=key).value == value, key
    assert at.checkbox(key="ul_save_weights").value is rc.save_weights
    assert at.selectbox(key="ul_method").value == rc.method
    assert at.selectbox(key="ul_grip_tkind").value == gc.threshold_kind
    assert at.selectbox(key="ul_grip_margin").value == gc.margin_method
    assert at.selectbox(key="ul_grip_mode").value == gc.mode
    assert at.selectbox(key="ul_grip_mode").options == [m for m in typing.get_args(grip_config.Mode) if m != "off"]
    assert any(f"final probes on {rc.final_eval_examples} examples per split" in c.value for c in at.caption)

    at.number_input(key="ul_steps").set_value(7)
    at.checkbox(key="ul_save_weights").check()
    at.selectbox(key="ul_grip_tkind").set_value("relative")
    at.run()
    at.number_input(key="ul_grip_energy").set_value(0.99).run()
    at.switch_page("views/compare.py").run()
    for k in [k for k in at.session_state if k.startswith("ul_")]:
        del at.session_state[k]       # as a real server drops the state of widgets not drawn (the e2e test sees that)
    at.switch_page("views/unlearn.py").run()
    assert_clean(at)
    assert at.number_input(key="ul_steps").value == 7
    assert at.checkbox(key="ul_save_weights").value is True
    assert at.selectbox(key="ul_grip_tkind").value == "relative"
    assert at.number_input(key="ul_grip_energy").value == 0.99
    assert any("The unlearned weights are saved" in c.value for c in at.caption)


def test_model_radio_follows_the_model_in_use_after_a_failed_load(studio, tmp_path):  # noqa: F811
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "dense")
    at = app()
    in_use = at.radio(key="model_kind").value
    at.radio(key="model_kind").set_value("Local checkpoint directory").run()
    at.text_input(key="model_path").input(str(tmp_path / "dense")).run()
    at.button(key="load_model").click().run()
    assert not at.exception
    assert any("not a Mixture-of-Experts model" in e.value and "still in use" in e.value for e in at.error), \
        [e.value for e in at.error]
    assert at.radio(key="model_kind").value == in_use != "Local checkpoint directory"

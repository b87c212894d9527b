"""Attacks on unlearning and the update ledger: known directions on the demo, selection rules on tiny models.

Runs are short (a dozen steps) so the module stays cheap; what each test can and cannot show at that
length is said next to its assertions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from grip_core.attacks import (ROW_KEYS, AttackConfig, available_attacks, forced_experts, ledger_from_checkpoint,
                               ledger_summary, load_ledger, load_robustness, relearned, robustness, round_trip,
                               update_ledger)
from grip_core.moe import MoEModel
from grip_core.moe.errors import ConfigError
from grip_core.moe.tiny import build_tiny_model
from grip_core.moe.trace import parse_router_output
from grip_core.runs import Baseline, run_unlearning
from grip_core.runs.compare import make_config

SMALL = dict(eval_examples=16, final_eval_examples=8, eval_every=0, batch_size=8, grip_fit_examples=256)
FAST = dict(eval_examples=32, on_base=False)


@pytest.fixture(scope="module")
def baseline(demo, data):
    return Baseline.compute(demo, data, make_config("graddiff", "off", "shortcut", **SMALL))


@pytest.fixture(scope="module")
def vanilla(demo, data, baseline):
    """GradDiff, shortcut preset, GRIP off, 12 steps: forget EM about halves, mostly by rerouting."""
    return run_unlearning(demo, make_config("graddiff", "off", "shortcut", steps=12, **SMALL), data,
                          baseline=baseline, save=False).unlearned


@pytest.fixture(scope="module")
def grip(demo, data, baseline):
    """The same job with GRIP's update mode (fewer steps: its forget routing stays put whatever the length)."""
    return run_unlearning(demo, make_config("graddiff", "update", "shortcut", steps=6, **{**SMALL, "grip_fit_examples": 128}), data,
                          baseline=baseline, save=False).unlearned


@pytest.fixture(scope="module")
def rerouted(demo, data, baseline, tmp_path_factory):
    """GA on the routers only, weights saved as a delta: whatever it forgot, it forgot by rerouting."""
    config = make_config("ga", "off", "routers-only", steps=15, **SMALL, save_weights=True)
    result = run_unlearning(demo, config, data, baseline=baseline, runs_dir=tmp_path_factory.mktemp("runs"))
    return result


def _by(rows):
    return {r["attack"]: r for r in rows}


def _gain(row):
    return row["attacked_em"] - row["unlearned_em"]


def test_restoration_and_forcing_on_vanilla_vs_grip(demo, data, vanilla, grip):
    v = _by(robustness(demo, vanilla, None, data.forget, attacks=["restoration", "expert_forcing"],
                       config=AttackConfig(**{**FAST, "on_base": True})))
    g = _by(robustness(demo, grip, None, data.forget, attacks=["restoration", "expert_forcing"],
                       config=AttackConfig(**FAST)))
    for row in list(v.values()) + list(g.values()):
        assert set(row) == set(ROW_KEYS) and row["n"] == 32
    # vanilla forgot by moving its routers: the base routers bring the answers back; GRIP's routers kept the
    # forget tokens' routing (shift ~0), so putting them back changes nothing
    assert v["restoration"]["unlearned_em"] < v["restoration"]["base_em"] - 0.2
    assert v["restoration"]["recovered"] > 0.8
    assert _gain(v["restoration"]) > _gain(g["restoration"]) + 0.2
    assert g["restoration"]["routing_shift"] < 0.05 < v["restoration"]["routing_shift"]
    # expert forcing moves nearly every slot. On the demo (10 experts, top-2) the answers live in the selected
    # experts: forcing ruins them on the BASE model too, and brings every model to about the forced base's EM
    # (the full-length matrix in docs/study/robustness.md measures the same)
    forced_base = v["expert_forcing"]["base_em"]
    assert forced_base < v["restoration"]["base_em"] - 0.5
    for row in (v["expert_forcing"], g["expert_forcing"]):
        assert row["routing_shift"] > 0.8
        assert abs(row["attacked_em"] - forced_base) <= 0.1


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "gpt_oss", "deepseek_v3", "llama4_text", "qwen2_moe"])
def test_forcing_picks_unselected_experts_by_the_family_rule(family):
    moe = MoEModel(build_tiny_model(family, seed=1))
    layer = moe.layers[0]
    if layer.selection_bias is not None:
        with torch.no_grad():
            layer.selection_bias.copy_(torch.linspace(-0.3, 0.3, layer.num_experts))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(name):
        def hook(module, args, output):
            rows = args[0].reshape(-1, layer.hidden_size).shape[0]
            seen[name] = (output, parse_router_output(layer, output, rows))
        return hook
    h = layer.router.register_forward_hook(grab("plain"))
    with torch.no_grad():
        moe.model(input_ids=ids)
    h.remove()
    with forced_experts(moe), torch.no_grad():
        h = layer.router.register_forward_hook(grab("forced"))     # runs after the forcing hook: sees its output
        moe.model(input_ids=ids)
        h.remove()
    (_, (logits, plain_sel)), (forced_out, (_, forced_sel)) = seen["plain"], seen["forced"]
    # layer 0's inputs do not depend on forcing: the forced set is disjoint from the router's own choice ...
    assert not (torch.zeros(len(plain_sel), layer.num_experts, dtype=torch.bool).scatter_(1, plain_sel, True)
                .gather(1, forced_sel)).any()
    # ... and is the top-k of the family's selection score among the rest (selection bias included)
    score = logits.float().sigmoid() if layer.score_fn == "sigmoid" else logits.float().softmax(-1)
    rank = score + (layer.selection_bias.float() if layer.selection_bias is not None else 0)
    expected = rank.scatter(1, plain_sel, float("-inf")).topk(layer.top_k, -1).indices
    assert torch.equal(expected.sort(-1).values, forced_sel.sort(-1).values)
    # mixing weights: a family that normalises its top-k keeps its row sums
    plain_out = seen["plain"][0]
    if family in ("mixtral", "gpt_oss"):
        torch.testing.assert_close(forced_out[1].float().sum(-1), plain_out[1].float().sum(-1))
    assert all(not h for h in layer.router._forward_hooks.values())     # hooks removed


def test_forcing_refuses_more_experts_than_exist(demo):
    with pytest.raises(ConfigError, match="expert forcing: n=9"):
        with forced_experts(demo, 9):
            pass
    assert not demo.layers[0].router._forward_hooks


def test_relearning_zero_steps_recovers_nothing_and_is_deterministic(demo, data, vanilla):
    rows = robustness(demo, vanilla, None, data.forget, attacks=["relearn_router", "relearn_full"],
                      config=AttackConfig(**FAST, relearn_steps=0))
    for row in rows:
        assert row["attacked_em"] == row["unlearned_em"] and row["recovered"] in (0.0, None)
        assert row["routing_shift"] == 0.0
    kw = dict(routers_only=True, steps=3, lr=1e-2, batch_size=4, max_length=64, seed=5)
    a, b = relearned(vanilla, data.forget[:12], **kw), relearned(vanilla, data.forget[:12], **kw)
    for la, lb, lv in zip(a.layers, b.layers, vanilla.layers):
        assert torch.equal(la.router_weight, lb.router_weight) and not torch.equal(la.router_weight, lv.router_weight)
    # routers only: nothing else moved
    moved = [k for k, v in a.model.state_dict().items() if not torch.equal(v, vanilla.model.state_dict()[k])]
    assert moved and all(".gate." in k for k in moved)


def test_quantization_round_trips(demo, data):
    w = demo.layers[0].experts.gate_up_proj.detach()                 # fused (E, 2I, d)
    err = {f: (round_trip(w, f) - w).abs().mean().item() / w.abs().mean().item() for f in ("int8", "nf4", "int4")}
    assert err["int8"] < 0.01 and err["int8"] < err["nf4"] < 0.2 and err["int8"] < err["int4"] < 0.2
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    rows = robustness(demo, demo, None, data.forget, attacks=["quant_int8", "quant_nf4"], config=AttackConfig(**FAST))
    assert all(torch.equal(before[k], v) for k, v in demo.model.state_dict().items())   # weights restored exactly
    r = _by(rows)
    # what INT8 costs the base model's forget answers, measured: at most one answer of 32 changes
    assert abs(r["quant_int8"]["attacked_em"] - r["quant_int8"]["unlearned_em"]) <= 1 / 32 + 1e-9
    assert r["quant_int8"]["routing_shift"] < 0.02


def test_ledger_shares_and_a_routers_only_run(demo, vanilla, rerouted):
    rows = update_ledger(demo, vanilla)
    assert math.isclose(sum(r["share"] for r in rows), 1.0, rel_tol=1e-9)
    summary = ledger_summary(rows)
    assert summary["attention"] == summary["embedding"] == 0.0          # the shortcut preset trains MoE blocks only
    assert summary["router"] > 0 and summary["routed_expert"] > 0
    experts = [r for r in rows if r["group"] == "routed_expert"]
    assert {r["expert"] for r in experts} <= set(range(demo.layers[0].num_experts))
    routers = ledger_summary(update_ledger(demo, rerouted.unlearned))
    assert routers["router"] > 0.999
    streamed = ledger_from_checkpoint(demo, rerouted.run_dir / "model")   # from the saved delta, base untouched
    in_memory = update_ledger(demo, rerouted.unlearned)
    assert [(r["group"], r["layer"], r["expert"]) for r in streamed] == [(r["group"], r["layer"], r["expert"])
                                                                        for r in in_memory]
    for a, b in zip(streamed, in_memory):
        assert math.isclose(a["norm"], b["norm"], rel_tol=1e-6)
    assert update_ledger(demo, demo) == []                              # nothing changed: no group touched


def test_attack_cli_writes_rows_and_the_dashboard_draws_them(rerouted, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from grip_core.cli import main

    run_dir = rerouted.run_dir
    assert main(["attack", "--base", "demo", "--run", str(run_dir), "--attacks", "restoration,paraphrase",
                 "--eval-examples", "16", "--no-base"]) == 0
    rows = load_robustness(run_dir)
    assert [r["attack"] for r in rows] == ["restoration", "paraphrase"]
    assert rows[0]["recovered"] > 0.9                 # routers-only forgetting: restoring the routers undoes it
    assert ledger_summary(load_ledger(run_dir))["router"] > 0.999
    assert main(["attack", "--run", str(run_dir), "--attacks", "nope"]) == 2
    assert main(["attack", "--run", str(run_dir.parent / "missing")]) == 2
    assert main(["attack", "--run", str(run_dir), "--relearn-fraction", "1.5"]) == 2   # before any model loads
    assert set(available_attacks()) >= {"restoration", "expert_forcing", "relearn_router", "relearn_full",
                                        "relearn_related", "quant_int8", "quant_nf4", "quant_int4", "paraphrase"}

    monkeypatch.setenv("GRIP_STUDIO_RUNS_DIR", str(run_dir.parent))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app" / "main.py"), default_timeout=180).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    figs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    heat = [f for f in figs if "Did it really forget" in (f["layout"].get("title", {}).get("text") or "")]
    assert heat, "no robustness heatmap on Compare"
    z = heat[0]["data"][0]["z"]
    assert z[0][0] == pytest.approx(rows[0]["recovered"])
    assert any("Where did the update land" in (f["layout"].get("title", {}).get("text") or "") for f in figs)

    at.switch_page("views/diagnose.py")
    at.session_state["dg_unlearned"] = str(run_dir / "model")       # what picking the run in the form sets
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    titles = [json.loads(el.proto.spec)["layout"].get("title", {}).get("text") or "" for el in at.get("plotly_chart")]
    assert any("Did it really forget" in t for t in titles), titles

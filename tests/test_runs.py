"""The job runner, the run store and diagnose, on the shipped demo model."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from grip_core import load_model
from grip_core.runs import Baseline, RunConfig, list_runs, load_run, run_unlearning
from grip_core.runs.compare import make_config
from grip_core.runs.diagnose import diagnose, verdict_from

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(eval_examples=16, final_eval_examples=24, eval_every=2, batch_size=8, grip_fit_examples=256)


@pytest.fixture(scope="module")
def baseline(demo, data):
    """The base model's traces and probes, shared by every job here (as `compare` and the study do)."""
    return Baseline.compute(demo, data, make_config("ga", "off", "shortcut", **SMALL))


def _router_weights(moe):
    return [l.router_weight.detach().clone() for l in moe.layers]


def test_job_is_deterministic_and_leaves_base_untouched(demo, data, baseline, tmp_path):
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    config = make_config("graddiff", "update", "shortcut", seed=3, steps=4, **SMALL)
    baseline.grip_fits.clear()
    a = run_unlearning(demo, config, data, baseline=baseline, runs_dir=tmp_path)
    b = run_unlearning(demo, config, data, baseline=baseline, runs_dir=tmp_path)   # reuses a's GRIP fit
    assert a.status == b.status == "completed"
    assert (a.summary["timing"]["grip_fit_cached"], b.summary["timing"]["grip_fit_cached"]) == (False, True)
    assert [r["loss"] for r in a.step_log] == [r["loss"] for r in b.step_log]
    assert a.summary["headline"] == b.summary["headline"]
    for x, y in zip(_router_weights(a.unlearned), _router_weights(b.unlearned)):
        assert torch.equal(x, y)
    after = demo.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # the loaded base model is never mutated
    other = run_unlearning(demo, make_config("graddiff", "update", "shortcut", seed=4, steps=4, **SMALL), data,
                           baseline=baseline, save=False)
    assert [r["loss"] for r in other.step_log] != [r["loss"] for r in a.step_log]


def test_run_record_reloads(demo, data, baseline, tmp_path):
    result = run_unlearning(demo, make_config("npo", "off", "shortcut", seed=0, steps=2, **SMALL), data,
                            baseline=baseline, runs_dir=tmp_path)
    saved = load_run(result.run_dir)
    assert saved.state == "completed"
    assert [s["step"] for s in saved.steps] == [1, 2]
    assert saved.summary["headline"]["forget_em"] == result.summary["headline"]["forget_em"]
    deltas = saved.router_deltas()
    assert len(deltas) == len(demo.layers) and all(torch.isfinite(v).all() for v in deltas.values())
    assert RunConfig.from_dict(saved.config).method == "npo"
    assert [r.run_id for r in list_runs(tmp_path)] == [result.run_dir.name]


def test_cancel_stops_between_steps(demo, data, baseline, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(row):
        seen.append(row["step"])
        if row["step"] == 2:
            cancel.set()
    result = run_unlearning(demo, make_config("ga", "off", "shortcut", steps=50, **SMALL), data,
                            baseline=baseline, progress=progress, cancel=cancel, runs_dir=tmp_path)
    assert result.status == "cancelled" and result.steps_done == 2 and seen == [1, 2]
    saved = load_run(result.run_dir)
    assert saved.state == "cancelled" and len(saved.steps) == 2 and saved.summary is None


def test_nan_loss_stops_with_a_clear_reason(demo, data, baseline, tmp_path):
    config = make_config("graddiff", "update", "shortcut", steps=30, **SMALL)
    config.method_args = {"alpha": float("nan")}   # a broken hyper-parameter: the first loss is NaN
    before = [l.router_weight.detach().clone() for l in demo.layers]
    result = run_unlearning(demo, config, data, baseline=baseline, runs_dir=tmp_path)
    assert result.status == "stopped" and result.steps_done == 0
    assert "non-finite loss (nan) at step 1" in result.reason
    assert load_run(result.run_dir).status["reason"] == result.reason
    assert all(torch.equal(a, l.router_weight) for a, l in zip(before, demo.layers))


def test_killed_run_leaves_a_readable_partial_record(tmp_path):
    cfg = make_config("graddiff", "off", "shortcut", steps=400, **{**SMALL, "eval_every": 0})
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "grip_core", "run", "--config", str(cfg_path),
                             "--runs-dir", str(tmp_path / "runs")], cwd=REPO, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            runs = list((tmp_path / "runs").glob("*/metrics.jsonl"))
            if runs and runs[0].read_text().count("\n") >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the job did not start logging steps")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = load_run(runs[0].parent)
    assert saved.state == "incomplete" and len(saved.steps) >= 3 and saved.summary is None
    assert not list(runs[0].parent.glob(".*.tmp"))   # no half-written file left behind visible as a record


def test_diagnose_known_answers(demo, data, baseline, tmp_path):
    # Unlearned by moving ONLY the routers: whatever it forgot, restoring the routers must undo it.
    config = make_config("ga", "off", "routers-only", steps=15, **{**SMALL, "eval_every": 0}, save_weights=True)
    result = run_unlearning(demo, config, data, baseline=baseline, runs_dir=tmp_path)
    rerouted = load_model(result.run_dir / "model")
    d = diagnose(demo, rerouted, data, eval_examples=16, final_eval_examples=24)
    h = d.report.headline
    assert h.forget_em < h.base_forget_em * 0.5
    assert d.verdict == "rerouted" and h.restoration_recovered > 0.9
    # only routers trained: the first MoE layer's router inputs cannot drift, so its shift is all router-caused
    assert d.report.attribution_retain.layers[0].stability_drift_only == 1.0
    same = diagnose(demo, demo, data, eval_examples=16, final_eval_examples=24)
    assert same.verdict == "not forgotten" and same.report.headline.retain_stability == 1.0


def test_verdict_thresholds_are_applied_to_numbers():
    h = dict(base_forget_em=0.9, forget_em=0.05, base_retain_em=0.9, retain_em=0.9, forget_shift=0.1,
             retain_shift=0.01, retain_stability=0.97, retain_stability_router_only=1.0,
             retain_stability_drift_only=0.97, restored_forget_em=0.06, restoration_recovered=0.01)
    assert verdict_from(h)[0] == "erased"
    assert verdict_from({**h, "restoration_recovered": 0.8})[0] == "rerouted"
    assert verdict_from({**h, "restoration_recovered": 0.3})[0] == "mixed"
    assert verdict_from({**h, "forget_em": 0.8})[0] == "not forgotten"
    assert verdict_from({**h, "forget_em": 0.2})[0] == "partially erased"      # forgot, but not below the target
    assert verdict_from({**h, "base_forget_em": 0.0, "forget_em": 0.0})[0] == "cannot diagnose"
    assert verdict_from({**h, "retain_em": 0.0})[0] == "collapsed"         # (case by case: tests/test_verdict.py)


@pytest.mark.parametrize("argv, message", [
    (["trace", "--model", "/no/such/dir", "--file", "data/world/domain_forget.jsonl"], "does not exist"),
    (["trace", "--model", "demo", "--file", "/no/such/file.jsonl"], "no/such/file.jsonl"),
    (["compare", "--model", "demo", "--forget-file", "f.jsonl"], "--retain-file"),
])
def test_cli_errors_are_clear(argv, message):
    out = subprocess.run([sys.executable, "-m", "grip_core", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_cli_rejects_non_moe_and_malformed_file(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=32)).save_pretrained(tmp_path / "dense")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good, good_r = REPO / "data/world/domain_forget.jsonl", REPO / "data/world/domain_retain.jsonl"
    for argv, message in [(["trace", "--model", str(tmp_path / "dense"), "--file", str(good)], "LlamaForCausalLM"),
                          (["trace", "--model", "demo", "--file", str(bad)], "bad.jsonl:2"),
                          (["trace", "--model", "demo", "--file", str(empty)], "empty"),
                          (["diagnose", "--base", "demo", "--unlearned", str(tmp_path / "dense"),
                            "--forget-file", str(good), "--retain-file", str(good_r)], "LlamaForCausalLM"),
                          (["diagnose", "--base", "demo", "--unlearned", "demo",
                            "--forget-file", str(bad), "--retain-file", str(good_r)], "bad.jsonl:2")]:
        out = subprocess.run([sys.executable, "-m", "grip_core", *argv], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr


def test_compare_in_processes_gives_the_rows_of_compare(demo, data, tmp_path):
    from grip_core.runs.compare import compare, compare_in_processes

    kw = dict(preset="shortcut", seed=0, steps=3, **SMALL)
    events_one, events_two = [], []
    one = compare(demo, data, ["ga", "simnpo"], ["off", "update"], runs_dir=tmp_path / "one",
                  progress=events_one.append, **kw)
    seen = []
    two = compare_in_processes(demo, "demo", data, ["ga", "simnpo"], ["off", "update"], workers=2,
                               runs_dir=tmp_path / "two", on_row=seen.append, progress=events_two.append, **kw)
    assert [(r["method"], r["grip"]) for r in two] == [(r["method"], r["grip"]) for r in one]
    assert sorted(map(id, seen)) == sorted(map(id, two))                      # every row reported once

    def phases(events):    # per job: its phases in order (each once) and the steps its train events report
        out = {}
        for e in events:
            ph, steps = out.setdefault(e.job, ([], []))
            if not ph or ph[-1] != e.phase:
                ph.append(e.phase)
            if e.phase == "train":
                steps.append(e.steps_done)
        return out
    # the workers' progress events come back to this process, named by their cell, as compare()'s do
    assert phases(events_two) == phases(events_one)
    assert phases(events_one)["simnpo/update"] == (["prepare", "fit", "train", "final", "done"], [1, 2, 3])
    timing = {"step_ms", "grip_ms", "run_dir"}
    for a, b in zip(one, two):                                                # one torch thread everywhere here
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_study_runs_a_regime_that_trains_the_same_parameters_once(demo):
    from grip_core import MoEModel
    from grip_core.moe.tiny import build_tiny_model
    from grip_core.runs.study import regime_aliases

    regimes = ("shortcut", "full", "experts+routers")
    assert regime_aliases(demo, regimes) == {"experts+routers": "shortcut"}   # OLMoE: no shared experts
    shared = MoEModel(build_tiny_model("qwen2_moe", seed=0))                    # shared experts: a real difference
    assert regime_aliases(shared, regimes) == {}



"""The run report (grip_core/runs/report.py) on the demo model: written by a job, saved, loaded back the same;
old run folders still open (or say they are too old); max_length reaches every probe and the restoration
attack; the before/after embedding legend covers the experts of both panels."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from grip_core.metrics.probes import answer_nll, run_probes
from grip_core.moe.errors import RunStoreError
from grip_core.runs import UnlearningData, list_runs, load_run, run_unlearning
from grip_core.runs.compare import make_config
from grip_core.runs.diagnose import diagnose
from grip_core.runs.report import SCHEMA_VERSION, GripRanks, Headline, RunReport
from grip_core.runs.store import atomic_write_json

SMALL = dict(eval_examples=8, final_eval_examples=8, eval_every=1, batch_size=8, grip_fit_examples=64)


@pytest.fixture(scope="module")
def data():
    return UnlearningData.from_scenario("domain", seed=0, retain_eval_size=8)


@pytest.fixture(scope="module")
def grip_run(demo, data, tmp_path_factory):
    """A 2-step GRIP job saved to a run folder (so grip_ranks.json and report.grip exist)."""
    result = run_unlearning(demo, make_config("graddiff", "update", "shortcut", steps=2, **SMALL), data,
                            runs_dir=tmp_path_factory.mktemp("runs"))
    assert result.status == "completed"
    return result


@pytest.fixture(scope="module")
def rerouted(demo, data):
    """Only the routers trained (GA, 15 steps): forget tokens must go to other experts to be forgotten."""
    result = run_unlearning(demo, make_config("ga", "off", "routers-only", steps=15, **{**SMALL, "eval_every": 0}),
                            data, save=False)
    assert result.status == "completed"
    return result.unlearned


def same_json(a: RunReport, b: RunReport) -> bool:
    """Equal field by field, NaN == NaN (json.dumps writes NaN the same way)."""
    return json.dumps(a.to_dict(), sort_keys=True) == json.dumps(b.to_dict(), sort_keys=True)


def test_report_round_trips_through_the_run_store(grip_run, tmp_path):
    saved = load_run(grip_run.run_dir)
    report = saved.report
    assert isinstance(report, RunReport) and report.schema_version == SCHEMA_VERSION
    assert isinstance(report.headline, Headline) and isinstance(saved.grip_ranks, GripRanks)
    assert same_json(report, RunReport.from_dict(grip_run.summary))          # what the job returned = what loads
    h = report.headline
    assert h.forget_em == report.probes.splits["forget"].exact_match
    assert h.retain_stability == report.routing_retain.stability and h.collapsed is False
    assert report.grip == saved.grip_ranks and report.grip.mode == "update"
    assert report.timing.steps == report.steps_done == 2
    assert report.verdict() == saved.report.verdict()
    assert report.robustness is None                                       # attacks are run on demand
    assert report.ledger and abs(sum(r["share"] for r in report.ledger) - 1) < 1e-6   # every job records it

    # the two optional blocks (shapes agreed with the attacks) are carried, saved and loaded unchanged
    report.robustness = [{"attack": "restoration", "setting": "original routers", "base_em": 0.97,
                          "unlearned_em": 0.5, "attacked_em": 0.9, "recovered": 0.85, "base_prob": None,
                          "unlearned_prob": 0.2, "attacked_prob": 0.6, "routing_shift": 0.3, "n": 8}]
    report.ledger = [{"group": "router", "layer": 1, "expert": None, "norm": 0.5, "share": 1.0}]
    copy = tmp_path / grip_run.run_dir.name
    shutil.copytree(grip_run.run_dir, copy)
    atomic_write_json(copy / "summary.json", report)
    again = load_run(copy).report
    assert again.robustness == report.robustness and again.ledger == report.ledger and same_json(again, report)


def _old_format(summary: dict) -> dict:
    """summary.json as the code before versioning wrote it: no schema_version, robustness, ledger or checkpoint
    (and "grip" only for GRIP runs)."""
    return {k: v for k, v in summary.items() if k not in ("schema_version", "robustness", "ledger", "checkpoint")}


def test_old_run_folders_open_or_say_they_are_too_old(grip_run, tmp_path):
    old = tmp_path / "20240101-000000-old"
    shutil.copytree(grip_run.run_dir, old)
    legacy = _old_format(grip_run.summary)
    assert "schema_version" not in legacy and set(legacy) >= {"headline", "probes", "routing_retain", "restoration"}
    atomic_write_json(old / "summary.json", legacy)
    now = load_run(grip_run.run_dir).report
    now.ledger = None                                                                  # old folders have none
    assert same_json(load_run(old).report, now)                                        # opens as it was

    older = tmp_path / "20240101-000000-older"
    shutil.copytree(old, older)
    for layer in legacy["attribution_retain"]["layers"]:
        del layer["trace_agreement_base"]                # a field this version needs that an older one lacked
    atomic_write_json(older / "summary.json", legacy)
    with pytest.raises(RunStoreError) as err:
        load_run(older)
    msg = str(err.value)
    assert msg.startswith(f"run folder {older} is too old (schema 0); re-run it") and "\n" not in msg
    assert "trace_agreement_base" in msg and str(older / "summary.json") in msg
    listed = {r.run_id: r for r in list_runs(tmp_path)}
    assert listed[older.name].state == "unreadable" and listed[older.name].error == msg
    assert listed[old.name].report is not None

    newer = {**grip_run.summary, "schema_version": SCHEMA_VERSION + 1}
    atomic_write_json(older / "summary.json", newer)
    with pytest.raises(RunStoreError, match="written by a newer GRIP Studio"):
        load_run(older)
    typo = {**grip_run.summary, "headline": {**grip_run.summary["headline"], "forget_eem": 0.1}}
    atomic_write_json(older / "summary.json", typo)
    with pytest.raises(RunStoreError, match=r"report\.headline: unknown field\(s\) \['forget_eem'\]"):
        load_run(older)


def test_max_length_reaches_the_probes_and_the_restoration_attack(demo, data):
    """diagnose(max_length=L) -> RunConfig -> Baseline and evaluate_final: every answer NLL is cut at L tokens."""
    short = 18                                             # the demo's questions are 14-17 tokens: answers get cut
    small = UnlearningData(data.forget[:8], data.retain_train[:8], data.retain_eval[:8], data.holdout[:8],
                           name="domain")
    d = diagnose(demo, demo, small, eval_examples=8, final_eval_examples=8, max_length=short)
    forget = small.forget
    at = lambda n: run_probes(demo, {"forget": forget}, generate=False, max_length=n).splits["forget"].mean_nll
    assert d.report.probes.splits["forget"].mean_nll == pytest.approx(at(short), rel=1e-6)
    assert d.report.base_probes.splits["forget"].mean_nll == pytest.approx(at(short), rel=1e-6)
    assert not math.isclose(at(short), at(128), rel_tol=1e-3)          # the cut changes the number
    nll = answer_nll(demo, forget, max_length=short)
    assert d.report.restoration.nll_unlearned == pytest.approx(nll[~torch.isnan(nll)].mean().item(), rel=1e-6)


def test_embedding_legend_lists_experts_seen_only_after_unlearning(demo, data, rerouted):
    from grip_core import viz
    from grip_core.viz.summaries import embedding_points

    from grip_core.data import encode_qa

    batch = encode_qa(demo.tokenizer, data.forget[:32], max_length=64)
    before_trace = demo.trace([batch], keep_inputs=True).answers_only()
    after_trace = rerouted.trace([batch], keep_inputs=True).answers_only()
    for layer in range(len(demo.layers)):
        before = embedding_points(before_trace, layer, demo.tokenizer)
        after = embedding_points(after_trace, layer, demo.tokenizer)
        only_after = set(after["top1"]) - set(before["top1"])
        if only_after:
            break
    assert only_after, "routers-only unlearning sent the forget answers to no new expert at any layer"
    proj, xy = viz.fit_projection(before["X"], "pca")
    fig = viz.embedding_pair(xy, proj.transform(after["X"]), before["top1"], after["top1"])
    legend = [tr.name for tr in fig.data if tr.showlegend is not False]
    assert sorted(legend) == sorted(f"expert {e}" for e in set(before["top1"]) | set(after["top1"]))
    assert {f"expert {e}" for e in only_after} <= set(legend)
    assert len(legend) == len(set(legend))                     # one entry per expert, shared by both panels

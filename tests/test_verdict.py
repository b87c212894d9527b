"""The one verdict (grip_core.runs.verdict), case by case, on hand-made headline numbers.

Pure Python and fast: no model is loaded. Every case of docs/method.md ("Verdicts") has a test,
each threshold is tested on both sides, and the callers (Compare's sentence, the restoration
table, the runs table, Diagnose's verdict_from, the study report) are checked to give the
SAME kind for the same numbers.
"""
from __future__ import annotations

import math

import pytest

from grip_core.fmt import pct
from grip_core.runs import verdict as V
from grip_core.runs.verdict import Verdict, base_knowledge_warning, verdict
from report_data import make_report

# A clean GRIP run: forgot, nothing comes back with the original routers, retained routing kept.
ERASED = dict(base_forget_em=0.97, forget_em=0.055, base_retain_em=0.977, retain_em=0.989, retain_stability=0.962,
              retain_stability_router_only=1.0, retain_stability_drift_only=0.962, forget_shift=0.21,
              retain_shift=0.02, restoration_recovered=0.0, restored_forget_em=0.055)


def kind(**changes) -> str:
    return verdict({**ERASED, **changes}).kind


def test_erased_names_the_trade_off_with_table_rounding():
    v = verdict(ERASED)
    assert isinstance(v, Verdict) and v.kind == "erased" and v.title == "ERASED"
    # the four trade-off numbers, formatted exactly as the tables (grip_core.fmt.pct, one decimal)
    for x in ("97.0 % → 5.5 %", "97.7 % → 98.9 %", "96.2 %", "0.0 % of the forgotten answers", "10.0 % target"):
        assert x in v.sentence, (x, v.sentence)
    assert "meets the 95.0 % bar" in v.sentence
    assert v.numbers["forget_em"] == 0.055 and v.numbers["restoration_recovered"] == 0.0
    assert v.sentence in v.paragraph and "100.0 % with only the new routers" in v.paragraph


def test_base_never_knew_the_forget_set_cannot_be_diagnosed():
    # issue K (1): base forget EM 0 % must not read "NOT FORGOTTEN … the model still answers most of the forget set"
    v = verdict({**ERASED, "base_forget_em": 0.0, "forget_em": 0.0, "restoration_recovered": 0.0})
    assert v.kind == "cannot diagnose"
    assert "still answers" not in v.sentence and "0.0 % of the forget set" in v.sentence
    assert kind(base_forget_em=V.BASE_KNOWS_MIN - 1e-9, forget_em=0.0) == "cannot diagnose"
    assert kind(base_forget_em=V.BASE_KNOWS_MIN, forget_em=0.0) == "erased"
    assert kind(forget_em=None) == "cannot diagnose"


def test_upload_warning_for_an_unknown_forget_set():
    msg = base_knowledge_warning(0.0, 64)
    assert msg and "0.0 %" in msg and "64 questions" in msg and pct(V.BASE_KNOWS_MIN) in msg
    assert base_knowledge_warning(V.BASE_KNOWS_MIN) is None and base_knowledge_warning(0.97) is None
    assert base_knowledge_warning(None) is None and base_knowledge_warning(float("nan")) is None


def test_partially_erased_when_forget_em_is_still_above_the_target():
    # issue K (2): a GRIP run at 14.1 % forget EM with nothing recovered is partial, not "erased"
    v = verdict({**ERASED, "forget_em": 0.141})
    assert v.kind == "partially erased" and "14.1 %" in v.sentence and "10.0 % target" in v.sentence
    assert kind(forget_em=V.FORGET_TARGET) == "partially erased"              # the target must be passed: <
    assert kind(forget_em=V.FORGET_TARGET - 1e-9) == "erased"
    # the caller's target
    assert verdict({**ERASED, "forget_em": 0.141}, forget_target=0.2).kind == "erased"
    assert verdict(ERASED, forget_target=0.05).kind == "partially erased"


def test_rerouted_mixed_erased_on_the_recovery_thresholds():
    assert kind(restoration_recovered=V.REROUTED_RECOVERY) == "rerouted"
    assert kind(restoration_recovered=V.REROUTED_RECOVERY - 1e-9) == "mixed"
    assert kind(restoration_recovered=V.ERASED_RECOVERY + 1e-9) == "mixed"
    assert kind(restoration_recovered=V.ERASED_RECOVERY) == "erased"
    # issue K (3): 0.12 reads the same on every page: mixed
    assert kind(restoration_recovered=0.12) == "mixed"
    v = verdict({**ERASED, "forget_em": 0.0, "restoration_recovered": 0.996, "retain_em": 0.64})
    assert v.kind == "rerouted" and "99.6 %" in v.sentence and "97.7 % → 64.0 %" in v.sentence
    assert "21.0 % of forget-set routing slots" in v.sentence
    # rerouted but forget EM still above the target: still rerouted, and it says so
    v = verdict({**ERASED, "forget_em": 0.3, "restoration_recovered": 0.8})
    assert v.kind == "rerouted" and "still at or above the 10.0 % target" in v.sentence
    # mixed names the trade-off too
    v = verdict({**ERASED, "restoration_recovered": 0.3})
    assert v.kind == "mixed" and "30.0 %" in v.sentence and "98.9 %" in v.sentence and "96.2 %" in v.sentence


def test_not_forgotten_needs_half_the_base_or_the_target():
    drop = V.FORGOT_EM_DROP
    assert kind(forget_em=0.97 * (1 - drop) + 1e-6) == "not forgotten"
    assert kind(forget_em=0.97 * (1 - drop)) == "partially erased"         # fell by exactly half: forgot, not < target
    v = verdict({**ERASED, "forget_em": 0.9, "restoration_recovered": 0.9})  # recovery means nothing here
    assert v.kind == "not forgotten" and "97.0 % → 90.0 %" in v.sentence and "98.9 %" in v.sentence
    # below the target counts as forgotten even when the base knew little
    assert kind(base_forget_em=0.2, forget_em=0.11) == "not forgotten"
    assert kind(base_forget_em=0.2, forget_em=0.09) == "erased"


def test_collapsed_model_is_flagged():
    # learning rate 1e8: retain EM 0.0, forget EM 0.0, nothing comes back with the original routers
    v = verdict({**ERASED, "forget_em": 0.0, "retain_em": 0.0, "retain_stability": 0.1, "restoration_recovered": 0.0})
    assert v.kind == "collapsed" and v.retain_collapsed and "97.7 % → 0.0 %" in v.sentence
    assert "destroyed" in v.sentence
    assert kind(retain_em=V.RETAIN_COLLAPSE * 0.977 - 1e-9) == "collapsed"
    assert kind(retain_em=V.RETAIN_COLLAPSE * 0.977) == "erased"
    # a collapse that did not even forget is still a collapse
    assert kind(forget_em=0.9, retain_em=0.0) == "collapsed"
    # mixed recovery under a collapse: collapsed
    assert kind(retain_em=0.0, restoration_recovered=0.3) == "collapsed"
    # routers-only GA: rerouted everything, retained answers too -> rerouted, flagged as not selective
    v = verdict({**ERASED, "forget_em": 0.03, "retain_em": 0.03, "restoration_recovered": 1.0})
    assert v.kind == "rerouted" and v.retain_collapsed and "Not selective" in v.sentence
    # no base retain EM: the collapse rule cannot apply
    assert kind(base_retain_em=None, retain_em=0.0) == "erased"


def test_missing_numbers_are_said_not_guessed():
    v = verdict({"base_forget_em": 0.9, "forget_em": 0.05, "restoration_recovered": None})
    assert v.kind == "cannot diagnose" and "no router-restoration attack" in v.sentence and "n/a" in v.sentence
    # NaN is missing too
    assert kind(restoration_recovered=math.nan) == "cannot diagnose"
    # no base forget EM (old summaries): forgetting is shown only by reaching the target
    assert kind(base_forget_em=None) == "erased" and kind(base_forget_em=None, forget_em=0.3) == "not forgotten"
    assert "without the base's forget EM" in verdict({**ERASED, "base_forget_em": None, "forget_em": 0.3}).sentence
    v = verdict({})
    assert v.kind == "cannot diagnose" and v.numbers["forget_em"] is None


def test_every_kind_is_reachable_and_stability_is_named():
    cases = {"cannot diagnose": dict(base_forget_em=0.0), "collapsed": dict(retain_em=0.0),
             "not forgotten": dict(forget_em=0.9), "rerouted": dict(restoration_recovered=0.9),
             "mixed": dict(restoration_recovered=0.3), "partially erased": dict(forget_em=0.2), "erased": {}}
    assert set(cases) == set(V.KINDS)
    for k, changes in cases.items():
        v = verdict({**ERASED, "retain_stability": 0.57, **changes})
        assert v.kind == k, (k, v.sentence)
        assert "57.0 %" in v.sentence and "below the 95.0 % bar" in v.sentence, (k, v.sentence)
        assert v.to_dict()["title"] == k.upper()


def test_every_caller_uses_the_same_verdict():
    """Diagnose (verdict_from), Compare (sentence, runs table, restoration table), the study: one kind."""
    from grip_core import viz
    from grip_core.runs.diagnose import verdict_from
    from grip_core.runs.study import QUICK, study_report

    for changes in ({}, {"forget_em": 0.141}, {"restoration_recovered": 0.12}, {"restoration_recovered": 0.9},
                    {"retain_em": 0.0, "forget_em": 0.0}, {"base_forget_em": 0.0, "forget_em": 0.0}):
        h = {**ERASED, **changes}
        want = verdict(h)
        assert verdict_from(h) == (want.kind, want.paragraph)
        summary = make_report(**h)
        assert viz.run_verdict(summary) == want == viz.run_verdict(summary.to_dict()) == summary.verdict()
        assert viz.restoration_table({"r": summary})["verdict"].item() == want.kind
        assert viz.runs_table({"r": (summary, {"method": "ga"})})["verdict"].item() == want.kind
        assert want.sentence in viz.compare_sentence({"r": (summary, None)})
        cell = {**h, "scenario": "domain", "regime": "full", "method": "ga", "grip": "update", "seed": 0, "lr": 1e-3}
        report = study_report([cell], QUICK, quick=True)
        assert f"| {want.title} |" in report


def test_study_claim_and_shortcut_follow_the_verdict():
    from grip_core.runs.study import QUICK, study_report

    base = {"scenario": "domain", "regime": "full", "method": "ga", "seed": 0, "lr": 1e-3}
    grip = {**base, **ERASED, "grip": "update"}
    assert "| HOLDS |" in study_report([grip], QUICK, quick=True)
    low = study_report([{**grip, "retain_stability": 0.9}], QUICK, quick=True)
    assert "| no (stability below 0.95) |" in low and "holds in 0 of 1 GRIP rows" in low
    partial = study_report([{**grip, "forget_em": 0.141}], QUICK, quick=True)
    assert "PARTIALLY ERASED" in partial and "forget EM not below 0.1" in partial
    vanilla = {**base, **ERASED, "grip": "off", "forget_em": 0.05, "restoration_recovered": 0.9}
    assert "1 of 1 vanilla (method, scenario, regime) rows are REROUTED" in study_report([vanilla], QUICK, quick=True)
    assert "0 of 1 vanilla" in study_report([{**vanilla, "restoration_recovered": 0.3}], QUICK, quick=True)


def test_compare_sentence_is_the_verdicts_with_their_trade_off():
    """Issue K (4): each run's verdict sentence names its trade-off (forget EM, retain EM, stability, restoration)
    with the table's rounding (99.6 %, not 100 %); no separate list of numbers."""
    from grip_core import viz

    vanilla = make_report(**{**ERASED, "forget_em": 0.0, "retain_em": 0.64, "retain_stability": 0.57,
                             "restoration_recovered": 0.996, "restored_forget_em": None})
    grip = make_report(**{**ERASED, "forget_em": 0.144, "retain_stability": 0.996})
    s = viz.compare_sentence({"vanilla GradDiff": (vanilla, None), "GRIP GradDiff": (grip, None)})
    assert s == f"vanilla GradDiff — {vanilla.verdict().sentence} GRIP GradDiff — {grip.verdict().sentence}"
    assert s.startswith("vanilla GradDiff — Rerouted") and "GRIP GradDiff — Partially erased" in s
    assert "99.6 %" in s and "100 %" not in s and "Trade-off" not in s
    for part in ("forget EM 97.0 % → 0.0 %", "retain EM 97.7 % → 64.0 %", "retained routing stability 57.0 %",
                 "brings back 99.6 %", "forget EM 97.0 % → 14.4 %", "retained routing stability 99.6 %"):
        assert part in s
    table = viz.percent_strings(viz.runs_table({"vanilla GradDiff": (vanilla, None)}))
    assert table["restoration recovers"].item() == "99.6 %" and table["verdict"].item() == "rerouted"


@pytest.mark.parametrize("x, want", [(0.9961, "99.6 %"), (0.0, "0.0 %"), (1.0, "100.0 %"), (None, "n/a"),
                                     (float("nan"), "n/a"), (float("inf"), "n/a"), ("x", "n/a")])
def test_one_percentage_format(x, want):
    from grip_core import viz

    assert pct(x) == want and viz.pct(x) == want

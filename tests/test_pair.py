"""run_jobs / run_pair (grip_core/runs/pair.py): one Baseline, one model copy per job, progress and cancel
in every phase. Real runs of the shipped demo model with few steps and small probe slices."""
import gc
import threading

import pytest
import torch

from grip_core.runs import RunConfig, load_run, run_unlearning
from grip_core.runs.compare import make_config
from grip_core.runs.job import PHASES
from grip_core.runs.pair import run_pair

SMALL = dict(eval_examples=16, final_eval_examples=16, eval_every=2, batch_size=8, grip_fit_examples=128)


def _config(steps: int = 3) -> RunConfig:
    return make_config("graddiff", "update", "shortcut", steps=steps, **SMALL)


def _live_models(cls) -> int:
    """Model objects of class `cls` alive now (the base, copies, references)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


@pytest.fixture(scope="module")
def pair_run(demo, data, tmp_path_factory):
    """A 3-step pair, with every progress event and the live model count at four points."""
    cls, events, counts = type(demo.model), [], []
    before = _live_models(cls)            # the base (and whatever other tests in this process still hold)

    def progress(p):
        first_of_phase = not events or events[-1][:2] != (p.job, p.phase)
        events.append((p.job, p.phase, p.fraction))
        # both copies exist from the GRIP job's prepare on: count at its end, at the first step, at each final
        if (p.job, p.phase, p.fraction) == ("GRIP", "prepare", 1.0) or (p.job, p.phase, p.steps_done) == \
                ("GRIP", "train", 1) or (p.phase == "final" and first_of_phase):
            counts.append(_live_models(cls))
    results = run_pair(demo, _config(), data, progress=progress, runs_dir=tmp_path_factory.mktemp("runs"))
    return results, events, before, counts


def test_pair_runs_both_jobs_on_one_baseline_with_at_most_three_models(demo, pair_run):
    results, events, before, counts = pair_run
    assert [(n, r.status, r.steps_done, r.phase) for n, r in results.items()] == \
        [("vanilla", "completed", 3, "done"), ("GRIP", "completed", 3, "done")]
    assert results["vanilla"].config.grip.mode == "off" and results["GRIP"].config.grip.mode == "update"
    assert max(counts) - before == 2 and len(counts) == 4, (before, counts)   # one copy per job, never more
    # every job reports every phase in order, and its fractions within a phase never go back
    for name in ("vanilla", "GRIP"):
        mine = [(ph, f) for n, ph, f in events if n == name]
        order = [ph for ph, _ in mine]
        assert [ph for i, ph in enumerate(order) if i == 0 or order[i - 1] != ph] == list(PHASES) + ["done"]
        for phase in PHASES:
            fr = [f for ph, f in mine if ph == phase]
            assert fr == sorted(fr), (name, phase, fr)
    # the base model was measured once (by the first job), and the GRIP job used that Baseline
    base = [e for e in events if e[1] == "prepare" and e[0] == "GRIP"]
    assert all(f in (0.0, 1.0) for _, _, f in base), base
    assert results["vanilla"].summary["headline"]["base_forget_em"] == results["GRIP"].summary["headline"]["base_forget_em"]
    # the steps of the two jobs interleave, so the live curves grow together
    steps = [n for n, ph, _ in events if ph == "train"]
    assert steps[:4] == ["vanilla", "GRIP", "vanilla", "GRIP"]
    assert all(torch.isfinite(l.router_weight).all() for l in demo.layers)


def test_a_job_of_the_pair_gives_the_numbers_it_gives_alone(demo, data, pair_run):
    paired = pair_run[0]["GRIP"]
    alone = run_unlearning(demo, paired.config, data, save=False)
    assert [r["loss"] for r in paired.step_log] == [r["loss"] for r in alone.step_log]
    assert paired.summary["headline"] == alone.summary["headline"]


@pytest.mark.parametrize("where", ["prepare", "fit", "final"])
def test_cancel_acts_in_every_phase(demo, data, tmp_path, where):
    """Cancel from inside the progress callback at the first event of a phase: no event of a later phase
    follows, at most one more forward pass runs, and both runs say in which phase they were cancelled."""
    cancel, after = threading.Event(), []

    def progress(p):
        if cancel.is_set():
            after.append((p.job, p.phase))
        elif p.phase == where and (where != "prepare" or "probes" in p.text) and (where != "fit" or p.job == "GRIP"):
            cancel.set()              # prepare: inside the base model's probes; fit: between the fit's batches
    results = run_pair(demo, _config(steps=2), data, progress=progress, cancel=cancel, runs_dir=tmp_path)
    assert [r.status for r in results.values()] == ["cancelled", "cancelled"], [r.reason for r in results.values()]
    assert all(ph == where for _, ph in after) and len(after) <= 1, after
    first = results["GRIP"] if where == "fit" else results["vanilla"]
    assert first.phase == where and f"cancelled during {where}" in first.reason
    assert first.steps_done == (2 if where == "final" else 0)
    if where != "final":
        assert all(r.steps_done == 0 and r.unlearned is None for r in results.values())
    for r in results.values():
        saved = load_run(r.run_dir)
        assert saved.state == "cancelled" and saved.status["reason"] == r.reason and saved.summary is None

"""The study engine: content-hashed cells, launchers (in-process, submitit local, Slurm dry run), manifests,
reproduce, and the committed study's cells."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grip_core.runs.launch import LaunchConfig, SlurmSettings, sbatch_script, slurm_executor
from grip_core.runs.study import (FULL, StudyGrid, cell_id, cell_index, cell_spec, read_study, run_study)

REPO = Path(__file__).resolve().parent.parent
TINY = StudyGrid(("domain",), ("shortcut", "experts+routers"), ("ga",), ("off", "update"), (0,),
                 eval_examples=4, final_eval_examples=6, max_steps=3, lr_ladder=(1e-4,), eval_every=3)
TIMING = {"seconds", "run_dir", "step_ms", "grip_ms", "manifest"}


def numbers(cell: dict) -> dict:
    return {k: v for k, v in cell.items() if k not in TIMING}


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """The tiny grid run in this process (pool launcher, one worker): 2 cells + a calibration record."""
    out = tmp_path_factory.mktemp("study")
    report = run_study(out_dir=out, grid=TINY)
    return out, report


def test_cells_are_named_by_a_hash_of_what_decides_their_numbers(tiny_study):
    out, report = tiny_study
    index = cell_index(out / "cells")
    assert len(index) == 2
    spec = cell_spec(TINY, "domain", "shortcut", "ga", "update", 0, 1e-4, "demo", {"dtype": "float32"})
    assert cell_id(spec) in index
    cell = json.loads(index[cell_id(spec)].read_text())
    assert cell["name"] == "domain__shortcut__ga__update__s0__lr0.0001" and cell["spec"] == {**spec, "load": cell["spec"]["load"]}
    assert cell["key"]["config"]["grip"]["mode"] == "update" and cell["key"]["config"]["eval_examples"] == 4
    for change in ({"eval_examples": 5}, {"final_eval_examples": 7}, {"max_steps": 4}, {"lr": 3e-4}, {"seed": 1},
                   {"grip": "drift"}, {"load": {"dtype": "bfloat16"}}):
        assert cell_id({**spec, **change}) != cell_id(spec), change
    # the cell and its run folder carry a manifest: code, versions, device, machine, wall time
    m = cell["manifest"]
    assert len(m["git_commit"]) == 40 and isinstance(m["git_dirty"], bool)
    assert m["device"] == "cpu" and m["dtype"] == "float32" and m["world_size"] == 1 and m["effective_batch"] == 16
    assert m["versions"]["torch"] and m["machine"]["cores"] >= 1 and m["wall_seconds"] > 0
    run = json.loads((out / cell["run_dir"] / "manifest.json").read_text())
    assert run["status"] == "completed" and run["dtype"] == "float32" and run["wall_seconds"] > 0
    assert json.loads((out / "manifest.json").read_text())["cells_present"] == 2
    assert "4 of 4 cells (2 of them aliased" in report


def test_a_changed_setting_makes_new_cells_and_resume_skips_existing_ones(tiny_study, tmp_path):
    out, _ = tiny_study
    shutil.copytree(out / "cells", tmp_path / "cells")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()}
    run_study(out_dir=tmp_path, grid=TINY)                                  # resume: nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cells").iterdir()} == before
    run_study(out_dir=tmp_path, grid=dataclasses.replace(TINY, grip_modes=("off",), final_eval_examples=5))
    assert len(cell_index(tmp_path / "cells")) == 3                         # a new vanilla cell, never a mix
    assert len(read_study(tmp_path, grid=TINY)["cells"]) == 4


def test_submitit_local_executor_makes_the_same_cells(tiny_study, tmp_path):
    out, _ = tiny_study
    (tmp_path / "cells").mkdir()
    for p in (out / "cells").glob("lr__*.json"):         # the calibrated rate: both cells run as one wave of jobs
        shutil.copy(p, tmp_path / "cells")
    run_study(out_dir=tmp_path, grid=TINY, launch=LaunchConfig(launcher="local", workers=2))
    here, there = cell_index(out / "cells"), cell_index(tmp_path / "cells")
    assert set(here) == set(there)
    for cid in here:
        assert numbers(json.loads(there[cid].read_text())) == numbers(json.loads(here[cid].read_text()))
    assert list((tmp_path / "submitit").glob("*_result.pkl"))                 # made by submitit's jobs


def test_reproduce_a_saved_cell_and_run_gives_a_zero_diff(tiny_study):
    from grip_core.runs.reproduce import diff, reproduce, reproduce_run

    out, _ = tiny_study
    (cell,) = [p for p in cell_index(out / "cells").values() if "update" in p.name]
    assert reproduce(cell) == [(cell.name, [])]
    run_dir = out / json.loads(cell.read_text())["run_dir"]
    saved, now = reproduce_run(run_dir)
    assert saved["summary"]["headline"]["forget_em"] is not None and diff(saved, now) == []
    changed = {**saved, "summary": {**saved["summary"], "headline": {**saved["summary"]["headline"], "forget_em": -1}}}
    assert [d[0] for d in diff(changed, now)] == ["summary.headline.forget_em"]


def test_slurm_dry_run_is_submitits_own_sbatch_script(tmp_path):
    settings = SlurmSettings(partition="gpu", gpus_per_task=1, cpus_per_task=4, mem_gb=16, time_min=30,
                             array_parallelism=8, setup=("source .venv/bin/activate",))
    text = sbatch_script(slurm_executor(tmp_path / "logs", settings), 155)
    for line in ("#SBATCH --array=0-154%8", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16GB", "#SBATCH --time=30", "#SBATCH --job-name=grip-study",
                 "source .venv/bin/activate", "-m submitit.core._submit"):
        assert line in text, line
    from grip_core.moe.errors import ConfigError

    for bad, flag in (({"time_min": 0}, "--slurm-time 0"), ({"mem_gb": -1}, "--slurm-mem-gb -1"),
                      ({"array_parallelism": 0}, "--slurm-array-parallelism 0")):
        with pytest.raises(ConfigError, match=flag):
            SlurmSettings(**bad)


def _cli(argv, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "grip_core", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_slurm_dry_run_shows_the_arrays_it_would_submit(tmp_path):
    """On the committed study: every learning rate is calibrated, so it is one array of the missing cells."""
    out = _cli(["study", "--out-dir", "docs/study", "--write-committed-report", "--launcher", "slurm", "--dry-run",
                "--slurm-partition", "gpu", "--slurm-gpus-per-task", "1", "--slurm-time", "20",
                "--slurm-array-parallelism", "32", "--submitit-folder", str(tmp_path / "slurm")], REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    study = read_study(REPO / "docs" / "study")
    run_missing = FULL.size * 2 // 3 - sum(1 for c in study["cells"] if not c.get("same_as"))   # aliased: not run
    if run_missing:
        assert f"a job array of {run_missing} tasks" in out.stdout and "#SBATCH --gpus-per-task=1" in out.stdout
        assert f"#SBATCH --array=0-{run_missing - 1}%{min(32, run_missing)}" in out.stdout
    else:
        assert "#SBATCH" not in out.stdout
    assert not (tmp_path / "slurm").exists() or not any((tmp_path / "slurm").iterdir())


def test_quick_study_leaves_git_status_clean_and_docs_need_a_flag():
    def status():
        return subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout

    refused = _cli(["study", "--out-dir", "docs/study", "--report-only"], REPO, timeout=120)
    assert refused.returncode == 2 and "--write-committed-report" in refused.stderr
    before = status()
    quick = REPO / "runs" / "study-quick"
    aside = quick.with_name("study-quick.test-aside")
    if quick.exists():
        quick.rename(aside)                      # a real quick study of the developer's stays untouched
    try:
        out = _cli(["study", "--quick", "--steps", "2", "--eval-examples", "4", "--final-eval-examples", "4",
                    "--methods", "ga", "--regimes", "full", "--grip-modes", "off", "--workers", "1"], REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        assert (quick / "findings.md").is_file() and "wrote" in out.stdout and "study-quick" in out.stdout
        assert status() == before
    finally:
        shutil.rmtree(quick, ignore_errors=True)
        if aside.exists():
            aside.rename(quick)


def test_committed_cells_have_current_ids_and_full_records():
    """Every committed cell's id is the hash of its stored spec under this code (a config field added
    elsewhere changes ids: then re-key, see grip_core.runs.study Footguns)."""
    cells = REPO / "docs" / "study" / "cells"
    index = cell_index(cells)
    assert len(index) >= 155
    for cid, path in index.items():
        cell = json.loads(path.read_text())
        assert cell["id"] == cid == cell_id(cell["spec"]), path.name
        assert path.name == f"{cell['name']}--{cid}.json"
        assert cell["base_forget_em"] is not None and cell["manifest"]
    study = read_study(REPO / "docs" / "study")
    text = (REPO / "docs" / "study" / "findings.md").read_text()
    from grip_core.runs.study import coverage

    cov = coverage(study["cells"], study["grid"])
    assert f"{cov['present']} of {cov['total']} cells" in text
    readme = (REPO / "README.md").read_text()
    assert f"{cov['present']} of {cov['total']} cells" in readme


def test_legacy_cells_migrate_to_ids_without_rerunning_and_rekey(tiny_study, tmp_path):
    from grip_core.runs.study import LEGACY_SETTINGS, migrate_legacy_cells, rekey_cells

    out, _ = tiny_study
    (update,) = [p for p in cell_index(out / "cells").values() if "update" in p.name]
    old = {k: v for k, v in json.loads(update.read_text()).items() if k not in ("id", "name", "spec", "key", "manifest")}
    cells = tmp_path / "cells"
    cells.mkdir()
    (cells / "domain__shortcut__ga__update__0.json").write_text(json.dumps(old))
    (cells / "domain__experts+routers__ga__update__0.json").write_text(json.dumps({**old, "regime": "experts+routers"}))
    (cells / "domain__shortcut__ga__lr.json").write_text(json.dumps({"lr": 1e-4}))
    assert migrate_legacy_cells(cells) == {"cells": 1, "lr": 1, "alias": 1}
    (path,) = cell_index(cells).values()
    cell = json.loads(path.read_text())
    assert cell["spec"]["eval_examples"] == LEGACY_SETTINGS["eval_examples"] and cell["id"] == cell_id(cell["spec"])
    assert cell["forget_em"] == old["forget_em"] and "not read from the cell" in cell["migrated"]["note"]
    assert cell["manifest"]["git_commit"] is None and len(list(cells.glob("lr__*.json"))) == 1
    assert (cells / "alias__domain__experts+routers__ga__update__0.json").is_file()
    stale = path.with_name(f"{cell['name']}--0000000000000000.json")       # an id from an older config layout
    path.rename(stale)
    stale.write_text(json.dumps({**cell, "id": "0000000000000000"}))
    assert rekey_cells(cells) == 1 and cell_index(cells) == {cell["id"]: path}


def test_attacked_cells_repeat_their_plain_run_and_reuse_its_learning_rate(tiny_study, tmp_path):
    """A grid with attacks: the same unlearning run as the plain cell (numbers equal to the last digit), its
    own id, the plain study's learning-rate record adopted instead of a new calibration, a robustness section."""
    from grip_core.runs.study import _without_attacks, attacked_vs_plain

    out, _ = tiny_study
    grid = dataclasses.replace(TINY, regimes=("shortcut",), grip_modes=("off",),
                               attacks=("restoration", "quant_int8"), attack_eval_examples=6)
    report = run_study(out_dir=tmp_path, grid=grid, lrs_from=out)
    lr = [json.loads(p.read_text()) for p in (tmp_path / "cells").glob("lr__*.json")]
    assert len(lr) == 1 and lr[0]["copied_from"].startswith("cells/lr__")
    (path,) = [p for p in (tmp_path / "cells").glob("*--*.json") if not p.name.startswith("lr__")]
    cell = json.loads(path.read_text())
    assert cell["name"].endswith("__attacked") and [r["attack"] for r in cell["robustness"]] == ["restoration", "quant_int8"]
    assert all(r["n"] == 6 for r in cell["robustness"]) and cell["ledger"]["router"] > 0
    plain_id = cell_id(_without_attacks(cell["spec"]))
    assert plain_id != cell["id"] and plain_id in cell_index(out / "cells")
    plain = json.loads(cell_index(out / "cells")[plain_id].read_text())
    assert {k: cell[k] for k in ("steps", "forget_em", "retain_stability")} == \
        {k: plain[k] for k in ("steps", "forget_em", "retain_stability")}
    assert "1 of 1 attacked cells repeat" in attacked_vs_plain([cell], out)[2]
    assert "## Robustness: did it really forget?" in report and "| restore routers | INT8 |" in report


def test_a_seed_subset_keeps_the_grids_calibration_seed(tmp_path):
    """Machines splitting the seeds (--seeds 1,2 here, 0 there) must calibrate on the same seed."""
    grid = dataclasses.replace(TINY, seeds=(0, 1))
    run_study(out_dir=tmp_path, grid=grid, seeds=[1], report_only=True)
    saved = json.loads((tmp_path / "manifest.json").read_text())["grid"]
    assert saved["seeds"] == [1] and saved["calibration_seed"] == 0


def test_committed_robustness_and_demo_fine_studies_match_their_reports_and_the_readme():
    from grip_core.runs.study import coverage

    readme = (REPO / "README.md").read_text()
    for sub, model in (("robustness", "demo"), ("demo_fine", "demo-fine")):
        folder = REPO / "docs" / "study" / sub
        for cid, path in cell_index(folder / "cells").items():
            cell = json.loads(path.read_text())
            assert cell["id"] == cid == cell_id(cell["spec"]) and cell["spec"]["model"] == model, path.name
        study = read_study(folder)
        cov = coverage(study["cells"], study["grid"])
        assert cov["present"] >= study["grid"].size // 2
        assert f"{cov['present']} of {cov['total']} cells" in (folder / "findings.md").read_text()
        if sub == "robustness":
            assert all(len(c["robustness"]) == 9 for c in study["cells"])
    assert "| **demo-fine · domain · shortcut** |" in readme and "| relearning (all) recovers |" in readme


def test_a_gpu_made_cell_reruns_on_the_cpu_where_there_is_no_gpu():
    import torch

    from grip_core.runs.reproduce import where_to_run

    spec = {"load": {"device": "cuda", "dtype": "float32"}}
    assert where_to_run(spec, "cpu") == {"device": "cpu", "dtype": "float32"}
    assert where_to_run({"load": {"dtype": "float32"}}) == {"dtype": "float32"}
    if not torch.cuda.is_available():
        assert where_to_run(spec) == {"device": "cpu", "dtype": "float32"}

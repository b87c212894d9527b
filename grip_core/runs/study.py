"""The study: where does the router shortcut appear on the demo, and what does GRIP do about it?

Grid: scenario x regime (scope + learning rates) x method x GRIP mode x seed. Each cell is
one `run_unlearning` job; its headline numbers are saved as `cells/<key>.json`, so an
interrupted study resumes where it stopped. The learning rate of each (scenario, regime,
method) is chosen by a fixed rule, never by looking at GRIP: the smallest rate of
`LR_LADDER` at which VANILLA unlearning (seed 0) brings forget EM below `FORGET_TARGET`
within `MAX_STEPS`; GRIP runs then use the same rate. The report is built from the cells.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..moe import load_model
from .compare import make_config, result_row
from .data import UnlearningData
from .evaluate import Baseline
from .job import run_unlearning
from .store import atomic_write_json

FORGET_TARGET = 0.10
MAX_STEPS = 200
LR_LADDER = (1e-4, 3e-4, 1e-3)
CLAIM_STABILITY = 0.95      # the paper's bar
SHORTCUT_RECOVERY = 0.5     # restoration brings back >= half of the forgotten answers


@dataclass(frozen=True)
class StudyGrid:
    scenarios: tuple[str, ...]
    regimes: tuple[str, ...]        # preset names (grip_core.runs.presets)
    methods: tuple[str, ...]
    grip_modes: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_examples: int = 64
    final_eval_examples: int = 200


FULL = StudyGrid(("domain", "entities"), ("shortcut", "full", "experts+routers"),
                 ("ga", "graddiff", "npo", "simnpo", "rmu"), ("off", "update", "drift"), (0, 1, 2))
QUICK = StudyGrid(("domain",), ("shortcut", "full"), ("graddiff",), ("off", "update", "drift"), (0,),
                  eval_examples=48, final_eval_examples=120)


def _key(*parts) -> str:
    return "__".join(str(p).replace("/", "-") for p in parts)


def _run_cell(moe, data, baseline, grid, scenario, regime, method, mode, seed, lr, runs_dir) -> dict:
    config = make_config(method, mode, regime, seed, MAX_STEPS, scenario=scenario, eval_every=10,
                         stop_at_forget_em=FORGET_TARGET, eval_examples=grid.eval_examples,
                         final_eval_examples=grid.final_eval_examples)
    config.scope = dataclasses.replace(config.scope, lr=lr)
    t0 = time.perf_counter()
    result = run_unlearning(moe, config, data, baseline=baseline, runs_dir=runs_dir)
    row = result_row(method, mode, result)
    reached = next((r["step"] for r in result.step_log if r.get("forget_em", 1.0) < FORGET_TARGET), None)
    return {**row, "scenario": scenario, "regime": regime, "seed": seed, "lr": lr,
            "steps_to_forget": reached, "seconds": time.perf_counter() - t0}


def _run_group(task: tuple) -> int:
    """Every cell of one (scenario, regime, method): lr calibration first, then modes x seeds. Resumable."""
    grid, scenario, regime, method, cells_dir, runs_dir, model, threads = task
    if threads:
        torch.set_num_threads(threads)
    moe = _load_cached(model)
    lr_file = cells_dir / f"{_key(scenario, regime, method)}__lr.json"
    lr = json.loads(lr_file.read_text())["lr"] if lr_file.exists() else None
    done = 0
    for seed in grid.seeds:
        data, baseline = None, None
        for mode in grid.grip_modes:
            path = cells_dir / f"{_key(scenario, regime, method, mode, seed)}.json"
            if path.exists():
                continue
            if baseline is None:
                data = UnlearningData.from_scenario(scenario, seed=seed, retain_eval_size=grid.eval_examples)
                baseline = Baseline.compute(moe, data, make_config(
                    method, "off", regime, seed, MAX_STEPS, eval_examples=grid.eval_examples,
                    final_eval_examples=grid.final_eval_examples))
            if lr is None:   # the fixed rule: calibrate on vanilla, on the first seed
                for candidate in LR_LADDER:
                    cell = _run_cell(moe, data, baseline, grid, scenario, regime, method, "off", seed, candidate,
                                     runs_dir)
                    lr = candidate
                    if cell["steps_to_forget"] is not None:
                        break
                atomic_write_json(lr_file, {"lr": lr, "rule": f"smallest of {LR_LADDER} reaching forget EM < "
                                                        f"{FORGET_TARGET} in {MAX_STEPS} steps (vanilla)"})
                if mode == "off":
                    atomic_write_json(path, cell)
                    done += 1
                    continue
            atomic_write_json(path, _run_cell(moe, data, baseline, grid, scenario, regime, method, mode, seed, lr,
                                              runs_dir))
            done += 1
    return done


_MODELS: dict = {}


def _load_cached(model: str):
    if model not in _MODELS:
        _MODELS[model] = load_model(model)
    return _MODELS[model]


def run_study(quick: bool = False, out_dir: Path = Path("docs/study"), seeds: list[int] | None = None,
              model: str = "demo", workers: int = 1, report_only: bool = False) -> str:
    """Run (or resume) the grid; return the markdown report.

    `report_only` builds the report from the cells already on disk (e.g. copied from a bigger machine).
    `workers` > 1 runs (scenario, regime, method) groups in parallel processes, one torch thread
    each (0 = one per core): every cell is seeded, so the numbers do not depend on the schedule.
    """
    grid = QUICK if quick else FULL
    if seeds:
        grid = dataclasses.replace(grid, seeds=tuple(seeds))
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    tasks = [(grid, sc, rg, m, cells_dir, runs_dir, model, 1)
             for sc in grid.scenarios for rg in grid.regimes for m in grid.methods]
    if workers <= 0:   # auto: one process per core, never more than there are groups
        workers = min(os.cpu_count() or 1, len(tasks))
    per_group = len(grid.grip_modes) * len(grid.seeds)
    bar = tqdm(total=len(tasks) * per_group, desc="study", unit="cell", file=sys.stderr)
    bar.update(sum(1 for p in cells_dir.glob("*.json") if not p.name.endswith("__lr.json")))
    if report_only:
        tasks = []
    if workers > 1 and tasks:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for n in pool.imap_unordered(_run_group, tasks):
                bar.update(n)
    else:
        for task in tasks:
            bar.update(_run_group(task))
    bar.close()
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json")) if not p.name.endswith("__lr.json")]
    return study_report(cells, grid, quick)


# ----------------------------------------------------------------------------------- the report

_METRICS = [("forget_em", "forget EM"), ("retain_em", "retain EM"), ("holdout_em", "holdout EM"),
            ("membership_auc", "MIA AUC"), ("retain_stability", "retained stability"),
            ("retain_stability_router_only", "router-only stab."), ("retain_stability_drift_only", "drift-only stab."),
            ("forget_shift", "forget shift"), ("restoration_recovered", "restoration recovers"),
            ("steps_to_forget", "steps to forget"), ("seconds", "s / run")]


def _agg(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    m = statistics.fmean(vals)
    s = statistics.pstdev(vals) if len(vals) > 1 else None
    fmt = (lambda x: f"{x:.0f}") if m > 5 or all(isinstance(v, int) for v in vals) else (lambda x: f"{x:.3f}")
    return fmt(m) + (f" ± {fmt(s)}" if s else "") + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)})")


def _group(cells: list[dict], *keys) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for c in cells:
        out.setdefault(tuple(c.get(k) for k in keys), []).append(c)
    return out


def _mean(cells: list[dict], key: str) -> float | None:
    vals = [c.get(key) for c in cells if c.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def study_report(cells: list[dict], grid: StudyGrid, quick: bool) -> str:
    """Markdown: one table per (scenario, regime), then the findings stated from the numbers."""
    lines = [f"# GRIP Studio study{' (quick)' if quick else ''}", "",
             f"Made by `python -m grip_core study{' --quick' if quick else ''}` on the demo model. "
             f"{len(cells)} of {_grid_size(grid)} runs present (a partial study says so here). Grid: scenarios {list(grid.scenarios)}, regimes {list(grid.regimes)}, methods "
             f"{list(grid.methods)}, GRIP modes {list(grid.grip_modes)}, seeds {list(grid.seeds)}. Learning rate "
             f"per (scenario, regime, method): the smallest of {list(LR_LADDER)} at which vanilla unlearning "
             f"reaches forget EM < {FORGET_TARGET} within {MAX_STEPS} steps (else the largest); every run stops "
             f"once forget EM < {FORGET_TARGET} (checked every 10 steps) or at {MAX_STEPS} steps. Mean ± sd over "
             "seeds. Stability is measured on retained questions held out of training and of GRIP's fit.", ""]
    findings = []
    for (scenario, regime), group in sorted(_group(cells, "scenario", "regime").items()):
        lines += [f"## {scenario} scenario · {regime} regime", "",
                  "| method | GRIP | lr | " + " | ".join(n for _, n in _METRICS) + " |",
                  "|---|---|---|" + "---|" * len(_METRICS)]
        for (method, mode), cs in sorted(_group(group, "method", "grip").items(),
                                         key=lambda kv: (kv[0][0], grid.grip_modes.index(kv[0][1]))):
            lines.append(f"| {method} | {mode} | {cs[0]['lr']:g} | " +
                         " | ".join(_agg([c.get(k) for c in cs]) for k, _ in _METRICS) + " |")
            if mode == "off":
                rec, fem = _mean(cs, "restoration_recovered"), _mean(cs, "forget_em")
                if rec is not None and fem is not None and rec >= SHORTCUT_RECOVERY and fem < FORGET_TARGET * 2:
                    findings.append(f"- **Shortcut** ({scenario}/{regime}/{method}): vanilla reached forget EM "
                                    f"{fem:.3f} and restoring the original routers recovered {rec:.0%} of it; retain "
                                    f"EM {_mean(cs, 'retain_em'):.3f}.")
            else:
                stab, rec = _mean(cs, "retain_stability"), _mean(cs, "restoration_recovered")
                ro, fem = _mean(cs, "retain_stability_router_only"), _mean(cs, "forget_em")
                holds = stab is not None and stab >= CLAIM_STABILITY and (rec or 0) <= 0.05 and \
                    fem is not None and fem < FORGET_TARGET
                findings.append(f"- GRIP {mode} ({scenario}/{regime}/{method}): retained stability {stab:.3f} "
                                f"(router-only {ro:.3f}), restoration recovers {rec:.0%}, forget EM {fem:.3f} → "
                                f"paper's claim {'HOLDS' if holds else 'does NOT hold'} here"
                                + ("" if holds else _why_not(stab, rec, fem)) + ".")
        lines.append("")
    lines += ["## Findings (computed from the table rows above)", ""] + (findings or ["- no cells yet"])
    return "\n".join(lines) + "\n"


def _grid_size(grid: StudyGrid) -> int:
    return len(grid.scenarios) * len(grid.regimes) * len(grid.methods) * len(grid.grip_modes) * len(grid.seeds)


def _why_not(stab, rec, fem) -> str:
    reasons = []
    if stab is not None and stab < CLAIM_STABILITY:
        reasons.append(f"stability below {CLAIM_STABILITY}")
    if rec is not None and rec > 0.05:
        reasons.append("restoration still recovers answers")
    if fem is None or fem >= FORGET_TARGET:
        reasons.append(f"forget EM not below {FORGET_TARGET} within {MAX_STEPS} steps")
    return " (" + "; ".join(reasons) + ")" if reasons else ""

"""The study: where does the router shortcut appear on the demo, and what does GRIP do about it?

Grid: scenario x regime (scope + learning rates) x method x GRIP mode x seed. Each cell is
one `run_unlearning` job; its headline numbers are saved as `cells/<key>.json`, so an
interrupted study resumes where it stopped; cells run seed-major, so a study stopped early
covers the grid with fewer seeds. The learning rate of each (scenario, regime, method) is
chosen by a fixed rule, never by looking at GRIP: the smallest rate of the grid's `lr_ladder`
at which VANILLA unlearning (first seed) brings forget EM below `FORGET_TARGET` within
`max_steps`; GRIP runs then use the same rate. A regime that trains the same parameters as
an earlier one on this model is run once and reported under both names (`regime_aliases`).
The report is built from the cells; each (method, GRIP mode) row gets the one verdict
(grip_core.runs.verdict, docs/method.md "Verdicts") of its mean over seeds.
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

from ..fmt import pct
from ..moe import load_model
from ..scope import classify_parameters, scope_parameter_names
from .compare import make_config, result_row
from .data import UnlearningData
from .evaluate import Baseline
from .job import run_unlearning
from .presets import get_preset
from .store import atomic_write_json
from .verdict import FORGET_TARGET, STABLE_RETAIN, verdict

MAX_STEPS = 200
LR_LADDER = (1e-4, 3e-4, 1e-3)
CLAIM_STABILITY = STABLE_RETAIN   # the paper's bar (the verdict's, grip_core.runs.verdict)


@dataclass(frozen=True)
class StudyGrid:
    scenarios: tuple[str, ...]
    regimes: tuple[str, ...]        # preset names (grip_core.runs.presets)
    methods: tuple[str, ...]
    grip_modes: tuple[str, ...]
    seeds: tuple[int, ...]
    eval_examples: int = 64
    final_eval_examples: int = 200
    max_steps: int = MAX_STEPS
    lr_ladder: tuple[float, ...] = LR_LADDER
    eval_every: int = 10                  # forget EM is checked (and a run may stop) every N steps


FULL = StudyGrid(("domain", "entities"), ("shortcut", "full", "experts+routers"),
                 ("ga", "graddiff", "npo", "simnpo", "rmu"), ("off", "update", "drift"), (0, 1, 2))
QUICK = StudyGrid(("domain",), ("shortcut", "full"), ("graddiff",), ("off", "update", "drift"), (0,),
                  eval_examples=48, final_eval_examples=120)


def _key(*parts) -> str:
    return "__".join(str(p).replace("/", "-") for p in parts)


def _run_cell(moe, data, baseline, grid, scenario, regime, method, mode, seed, lr, runs_dir) -> dict:
    config = make_config(method, mode, regime, seed, grid.max_steps, scenario=scenario, eval_every=grid.eval_every,
                         stop_at_forget_em=FORGET_TARGET, eval_examples=grid.eval_examples,
                         final_eval_examples=grid.final_eval_examples)
    config.scope = dataclasses.replace(config.scope, lr=lr)
    t0 = time.perf_counter()
    result = run_unlearning(moe, config, data, baseline=baseline, runs_dir=runs_dir)
    row = result_row(method, mode, result)
    reached = next((r["step"] for r in result.step_log if r.get("forget_em", 1.0) < FORGET_TARGET), None)
    return {**row, "scenario": scenario, "regime": regime, "seed": seed, "lr": lr,
            "steps_to_forget": reached, "seconds": time.perf_counter() - t0}


def _setup(moe, grid: StudyGrid, scenario: str, regime: str, method: str, seed: int):
    data = UnlearningData.from_scenario(scenario, seed=seed, retain_eval_size=grid.eval_examples)
    baseline = Baseline.compute(moe, data, make_config(method, "off", regime, seed, grid.max_steps,
                                                       eval_examples=grid.eval_examples,
                                                       final_eval_examples=grid.final_eval_examples))
    return data, baseline


def _calibrated_lr(moe, grid: StudyGrid, scenario: str, regime: str, method: str, cells_dir: Path, runs_dir,
                   setup: dict) -> float:
    """The fixed rule, run once per (scenario, regime, method): vanilla unlearning on the grid's FIRST seed at
    each rate of LR_LADDER until forget EM < FORGET_TARGET; the last vanilla run is that seed's "off" cell."""
    lr_file = cells_dir / f"{_key(scenario, regime, method)}__lr.json"
    if lr_file.exists():
        return json.loads(lr_file.read_text())["lr"]
    seed = grid.seeds[0]
    if seed not in setup:
        setup[seed] = _setup(moe, grid, scenario, regime, method, seed)
    for lr in grid.lr_ladder:
        cell = _run_cell(moe, *setup[seed], grid, scenario, regime, method, "off", seed, lr, runs_dir)
        if cell["steps_to_forget"] is not None:
            break
    atomic_write_json(cells_dir / f"{_key(scenario, regime, method, 'off', seed)}.json", cell)
    atomic_write_json(lr_file, {"lr": lr, "rule": f"smallest of {grid.lr_ladder} reaching forget EM < "
                                                  f"{FORGET_TARGET} in {grid.max_steps} steps (vanilla)"})
    return lr


def _run_group(task: tuple) -> int:
    """The cells of one (seed, scenario, regime, method), GRIP modes in order. Resumable.

    Tasks are seed-major (every group's first seed before any second seed), so a study stopped early
    covers the whole grid with fewer seeds. A task that finds its group uncalibrated calibrates first,
    always on the grid's first seed, so the learning rate never depends on which task ran first.
    """
    grid, seed, scenario, regime, method, cells_dir, runs_dir, model, threads = task
    if threads:
        torch.set_num_threads(threads)
    todo = [m for m in grid.grip_modes if not (cells_dir / f"{_key(scenario, regime, method, m, seed)}.json").exists()]
    if not todo:
        return 0
    moe = _load_cached(model)
    setup: dict = {}
    lr = _calibrated_lr(moe, grid, scenario, regime, method, cells_dir, runs_dir, setup)
    for mode in todo:
        path = cells_dir / f"{_key(scenario, regime, method, mode, seed)}.json"
        if path.exists():                                                    # the calibration's own cell
            continue
        if seed not in setup:
            setup[seed] = _setup(moe, grid, scenario, regime, method, seed)
        atomic_write_json(path, _run_cell(moe, *setup[seed], grid, scenario, regime, method, mode, seed, lr, runs_dir))
    return len(todo)


def regime_aliases(moe, regimes: tuple[str, ...]) -> dict[str, str]:
    """{regime: an earlier regime that trains the SAME parameters at the same relative learning rates}.

    Such a regime would repeat the earlier one's runs to the last digit (the same seeded jobs), so
    the study runs it once and reports it under both names. On OLMoE (no shared experts)
    `experts+routers` and `shortcut` (`moe` scope, routers x30) are the same parameter set.
    """
    kinds = classify_parameters(moe.model, moe.layers)
    group = {"router": "routers", "expert": "experts", "shared": "experts", "other": "other"}
    seen: dict[tuple, str] = {}
    aliases = {}
    for name in regimes:
        preset = get_preset(name)
        scope = dataclasses.replace(preset.scope, lr=1.0)
        signature = (tuple((n, scope.group_lr(group[kinds[n]])) for n in scope_parameter_names(moe.model, moe, scope)),
                     tuple(sorted(preset.method_args.items())))
        if signature in seen:
            aliases[name] = seen[signature]
        else:
            seen[signature] = name
    return aliases


_MODELS: dict = {}


def _load_cached(model: str | tuple):
    """One model per process. `model`: a load_model source, or (source, sorted load_model kwargs items)."""
    if model not in _MODELS:
        name, kwargs = (model, ()) if isinstance(model, str) else model
        _MODELS[model] = load_model(name, **dict(kwargs))
    return _MODELS[model]


def run_study(quick: bool = False, out_dir: Path = Path("docs/study"), seeds: list[int] | None = None,
              model: str = "demo", workers: int = 1, report_only: bool = False, grid: StudyGrid | None = None,
              load: dict | None = None) -> str:
    """Run (or resume) the grid; return the markdown report.

    `report_only` builds the report from the cells already on disk (e.g. copied from a bigger machine).
    `workers` > 1 runs (seed, scenario, regime, method) tasks in parallel processes, one torch thread
    each (0 = one per core): every cell is seeded, so the numbers do not depend on the schedule.
    `grid` replaces the FULL / QUICK grid (e.g. a smaller one in tests).
    `load`: load_model keyword arguments (device, dtype, device_map) for every process's model.
    """
    model = (model, tuple(sorted((load or {}).items()))) if load else model
    grid = grid or (QUICK if quick else FULL)
    if seeds:
        grid = dataclasses.replace(grid, seeds=tuple(seeds))
    cells_dir = out_dir / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    aliases = regime_aliases(_load_cached(model), grid.regimes)
    tasks = [(grid, seed, sc, rg, m, cells_dir, runs_dir, model, 1) for seed in grid.seeds
             for sc in grid.scenarios for rg in grid.regimes if rg not in aliases for m in grid.methods]
    if workers <= 0:   # auto: one process per core, never more than there are tasks
        workers = min(os.cpu_count() or 1, len(tasks))
    bar = tqdm(total=len(tasks) * len(grid.grip_modes), desc="study", unit="cell", file=sys.stderr)
    bar.update(len(_in_grid(_read_cells(cells_dir), grid, aliases)))
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
    on_disk = _read_cells(cells_dir)
    cells = _in_grid(on_disk, grid, aliases)
    return study_report(cells + _aliased(cells, aliases), grid, quick, aliases, _alias_check(on_disk, cells, aliases))


def _read_cells(cells_dir: Path) -> list[dict]:
    """Every cell saved under cells_dir (the __lr.json calibration records are not cells)."""
    return [json.loads(p.read_text()) for p in sorted(cells_dir.glob("*.json")) if not p.name.endswith("__lr.json")]


def _in_grid(cells: list[dict], grid: StudyGrid, aliases: dict[str, str]) -> list[dict]:
    """The grid's cells (cells of aliased regimes, from before aliasing existed, are left out)."""
    return [c for c in cells if c["scenario"] in grid.scenarios and c["regime"] in grid.regimes
            and c["regime"] not in aliases and c["method"] in grid.methods and c["grip"] in grid.grip_modes
            and c["seed"] in grid.seeds]


def _alias_check(on_disk: list[dict], cells: list[dict], aliases: dict[str, str]) -> dict[str, tuple[int, int]]:
    """{alias: (identical, compared)}: cells of an aliased regime that were RUN (before aliasing) vs its source's."""
    timing = {"seconds", "regime", "run_dir", "step_ms", "grip_ms"}
    source = {(c["scenario"], c["regime"], c["method"], c["grip"], c["seed"]): c for c in cells}
    out: dict[str, list[int]] = {}
    for c in on_disk:
        if c.get("regime") not in aliases:
            continue
        ref = source.get((c["scenario"], aliases[c["regime"]], c["method"], c["grip"], c["seed"]))
        if ref is not None:
            n = out.setdefault(c["regime"], [0, 0])
            n[0] += all(c.get(k) == ref.get(k) for k in c if k not in timing)
            n[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _aliased(cells: list[dict], aliases: dict[str, str]) -> list[dict]:
    return [{**c, "regime": alias, "same_as": source} for alias, source in aliases.items()
            for c in cells if c["regime"] == source]


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


def study_report(cells: list[dict], grid: StudyGrid, quick: bool, aliases: dict[str, str] | None = None,
                 alias_check: dict[str, tuple[int, int]] | None = None) -> str:
    """Markdown: one table per (scenario, regime), then the findings stated from the numbers."""
    aliases = aliases or {}
    n_aliased = sum(1 for c in cells if c.get("same_as"))
    aliased_note = f" ({n_aliased} of them aliased, see below)" if n_aliased else ""
    lines = [f"# GRIP Studio study{' (quick)' if quick else ''}", "",
             f"Made by `python -m grip_core study{' --quick' if quick else ''}` on the demo model. "
             f"{len(cells)} of {_grid_size(grid)} cells present{aliased_note} (a partial study says so here). Grid: scenarios {list(grid.scenarios)}, regimes {list(grid.regimes)}, methods "
             f"{list(grid.methods)}, GRIP modes {list(grid.grip_modes)}, seeds {list(grid.seeds)}. Learning rate "
             f"per (scenario, regime, method): the smallest of {list(grid.lr_ladder)} at which vanilla unlearning "
             f"reaches forget EM < {FORGET_TARGET} within {grid.max_steps} steps (else the largest); every run stops "
             f"once forget EM < {FORGET_TARGET} (checked every {grid.eval_every} steps) or at {grid.max_steps} steps. Mean ± sd over "
             "seeds. Stability is measured on retained questions held out of training and of GRIP's fit. Each "
             "finding carries the verdict (docs/method.md#verdicts) of its row's mean.", ""]
    no_base = sum(1 for c in cells if c.get("base_forget_em") is None)
    if no_base:
        lines += [f"{no_base} cells were saved without the base model's exact match (made before it was kept): "
                  f"their verdicts can only see forgetting that reached forget EM < {FORGET_TARGET}, so a row "
                  "above the target reads NOT FORGOTTEN however far it fell. Re-run those cells for full verdicts.",
                  ""]
    findings = []
    for (scenario, regime), group in sorted(_group(cells, "scenario", "regime").items()):
        lines += [f"## {scenario} scenario · {regime} regime", ""]
        if regime in aliases:
            lines += [f"On this model `{regime}` trains exactly the parameters of `{aliases[regime]}`, at the same "
                      f"relative learning rates (no shared experts), so its runs would repeat `{aliases[regime]}`'s to "
                      f"the last digit: the rows below are `{aliases[regime]}`'s, not run twice."
                      + (" Checked: {} of {} `{}` runs made before this rule gave numbers identical to `{}`'s."
                         .format(*alias_check[regime], regime, aliases[regime]) if regime in (alias_check or {}) else ""),
                      ""]
        lines += ["| method | GRIP | lr | " + " | ".join(n for _, n in _METRICS) + " |",
                  "|---|---|---|" + "---|" * len(_METRICS)]
        for (method, mode), cs in sorted(_group(group, "method", "grip").items(),
                                         key=lambda kv: (kv[0][0], grid.grip_modes.index(kv[0][1]))):
            lines.append(f"| {method} | {mode} | {cs[0]['lr']:g} | " +
                         " | ".join(_agg([c.get(k) for c in cs]) for k, _ in _METRICS) + " |")
            if regime in aliases:
                continue
            mean = {k: _mean(cs, k) for k in _VERDICT_KEYS}
            v = verdict(mean)
            rec, fem, rem = mean["restoration_recovered"], mean["forget_em"], mean["retain_em"]
            where = f"({scenario}/{regime}/{method})"
            if mode == "off":
                if v.kind in ("rerouted", "collapsed"):
                    findings.append(f"- **{'Shortcut' if v.kind == 'rerouted' else 'Collapsed'}** {where}: verdict "
                                    f"{v.title} — vanilla reached forget EM {_f3(fem)}, restoring the original "
                                    f"routers recovered {pct(rec)} of it; retain EM {_f3(rem)}.")
            else:
                stab, ro = mean["retain_stability"], mean["retain_stability_router_only"]
                holds = v.kind == "erased" and stab is not None and stab >= CLAIM_STABILITY
                findings.append(f"- GRIP {mode} {where}: retained stability {_f3(stab)} (router-only {_f3(ro)}), "
                                f"restoration recovers {pct(rec)}, forget EM {_f3(fem)}, retain EM {_f3(rem)} → "
                                f"verdict {v.title}; paper's claim {'HOLDS' if holds else 'does NOT hold'} here"
                                + ("" if holds else _why_not(v, stab, grid.max_steps)) + ".")
        lines.append("")
    lines += ["## Findings (computed from the table rows above)", ""] + (findings or ["- no cells yet"])
    return "\n".join(lines) + "\n"


def _grid_size(grid: StudyGrid) -> int:
    return len(grid.scenarios) * len(grid.regimes) * len(grid.methods) * len(grid.grip_modes) * len(grid.seeds)


_VERDICT_KEYS = ("base_forget_em", "forget_em", "base_retain_em", "retain_em", "retain_stability",
                 "retain_stability_router_only", "retain_stability_drift_only", "forget_shift", "restoration_recovered")


def _f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _why_not(v, stab, max_steps: int) -> str:
    """Why a GRIP row does not support the paper's claim (verdict "erased" AND stability >= the bar)."""
    reasons = []
    if stab is not None and stab < CLAIM_STABILITY:
        reasons.append(f"stability below {CLAIM_STABILITY}")
    if v.kind in ("rerouted", "mixed"):
        reasons.append("restoration still recovers answers")
    fem = v.numbers.get("forget_em")
    if fem is None or fem >= v.forget_target:
        reasons.append(f"forget EM not below {v.forget_target} within {max_steps} steps")
    if v.kind in ("collapsed", "not forgotten", "cannot diagnose"):
        reasons.append(f"verdict {v.kind}")
    return " (" + "; ".join(reasons) + ")" if reasons else ""

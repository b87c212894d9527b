"""Cells of the GRIP-beyond-the-paper study (docs/study/grip_beyond.md), run with the study's settings.

Each cell is one `run_unlearning` job with the study grid's settings (as in docs/study/findings.md: eval every
10 steps on 64 examples, final probes on 200, stop once forget EM < 0.1, at most 200 steps), at an explicit
learning rate, so GRIP modes can be calibrated by the study's rule (the smallest rate of the ladder that
reaches forget EM < 0.1 within 200 steps) for the GRIP mode itself, not only for vanilla.

    PYTHONPATH=. python docs/study/gripx/make_cells.py --methods graddiff --modes update --lrs 3e-4 --seeds 0

Writes docs/study/gripx/cells/<scenario>__<regime>__<method>__<mode>__lr<lr>__<seed>.json (skipped if present).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from grip_core.moe import load_model
from grip_core.runs.compare import make_config, result_row
from grip_core.runs.data import UnlearningData
from grip_core.runs.evaluate import Baseline
from grip_core.runs.job import run_unlearning
from grip_core.runs.verdict import FORGET_TARGET

CELLS = Path(__file__).resolve().parent / "cells"
EVAL_EVERY, EVAL_EXAMPLES, FINAL_EVAL_EXAMPLES, MAX_STEPS = 10, 64, 200, 200    # the study grid's settings
STUDY_CELLS = Path(__file__).resolve().parents[1] / "cells"      # the main study's cells (reference rows)
COLUMNS = [("lr", "lr"), ("steps_to_forget", "steps to forget"), ("forget_em", "forget EM"),
           ("retain_em", "retain EM"), ("retain_stability", "retained stability"),
           ("retain_stability_router_only", "router-only stab."), ("retain_stability_drift_only", "drift-only stab."),
           ("restoration_recovered", "restoration recovers"), ("seconds", "s / run")]


def cell_path(scenario, regime, method, mode, lr, seed) -> Path:
    return CELLS / f"{scenario}__{regime}__{method}__{mode}__lr{lr:g}__{seed}.json"


def _fmt(values: list) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    mean = sum(vals) / len(vals)
    txt = f"{mean:.3g}" if mean < 1e-3 and mean > 0 else (f"{mean:.0f}" if mean >= 10 else f"{mean:.3f}")
    if len(vals) > 1:
        sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
        txt += f" ± {sd:.0f}" if mean >= 10 else f" ± {sd:.3f}"
    missing = len(values) - len(vals)
    return txt + (f" ({len(vals)}/{len(values)})" if missing else "")


def report(scenario: str = "domain", regime: str = "shortcut") -> str:
    """Markdown table: the main study's off / update / drift rows (its lr) beside this directory's cells."""
    rows: dict[tuple, list[dict]] = {}
    for path in sorted(STUDY_CELLS.glob(f"{scenario}__{regime}__*.json")):
        cell = json.loads(path.read_text())
        if "grip" in cell and cell.get("method") in ("ga", "graddiff", "npo", "simnpo"):
            rows.setdefault((cell["method"], cell["grip"] + " (study)", cell["lr"]), []).append(cell)
    for path in sorted(CELLS.glob(f"{scenario}__{regime}__*.json")):
        cell = json.loads(path.read_text())
        rows.setdefault((cell["method"], cell["grip"], cell["lr"]), []).append(cell)
    mine = {k[0] for k in rows if not k[1].endswith("(study)")}
    head = "| method | GRIP | seeds | " + " | ".join(t for _, t in COLUMNS) + " |"
    out = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for (method, mode, lr), cells in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
        if method not in mine:
            continue
        vals = []
        for key, _ in COLUMNS:
            if key == "steps_to_forget":
                got = [c.get(key) for c in cells]
                vals.append(_fmt(got) if all(g is not None for g in got) else
                            f"{_fmt([g for g in got if g is not None])} ({sum(g is not None for g in got)}/{len(got)} reach)")
            elif key == "lr":
                vals.append(f"{lr:g}")
            else:
                vals.append(_fmt([c.get(key) for c in cells]))
        out.append(f"| {method} | {mode} | {len(cells)} | " + " | ".join(vals) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="domain")
    p.add_argument("--regime", default="shortcut")
    p.add_argument("--methods", default="graddiff")
    p.add_argument("--modes", default="update")
    p.add_argument("--lrs", default="1e-4")
    p.add_argument("--seeds", default="0")
    p.add_argument("--report", action="store_true", help="print the markdown table of the cells and stop")
    p.add_argument("--ladder", action="store_true", help="per (method, mode): stop at the first lr that forgets")
    p.add_argument("--runs-dir", default="/tmp/gripx_runs")
    p.add_argument("--grip", default="", help="GRIPConfig overrides KEY=VALUE,... (the cell's mode name gets them as a "
                                               "suffix, e.g. update+margin=False)")
    a = p.parse_args(argv)
    if a.report:
        print(report(a.scenario, a.regime))
        return
    torch.set_num_threads(1)
    overrides = {k: json.loads(v) if v not in ("True", "False") else v == "True"
                 for k, v in (kv.split("=", 1) for kv in a.grip.split(",") if kv)}
    moe = load_model("demo")
    CELLS.mkdir(parents=True, exist_ok=True)
    for seed in [int(s) for s in a.seeds.split(",")]:
        data = UnlearningData.from_scenario(a.scenario, seed=seed, retain_eval_size=EVAL_EXAMPLES)
        baseline = None
        for method in a.methods.split(","):
            for mode in a.modes.split(","):
                for lr in [float(x) for x in a.lrs.split(",")]:
                    label = mode + (f"+{a.grip}" if a.grip else "")
                    path = cell_path(a.scenario, a.regime, method, label, lr, seed)
                    if path.exists():
                        cell = json.loads(path.read_text())
                    else:
                        if baseline is None:
                            baseline = Baseline.compute(moe, data, make_config(
                                method, "off", a.regime, seed, MAX_STEPS, eval_examples=EVAL_EXAMPLES,
                                final_eval_examples=FINAL_EVAL_EXAMPLES))
                        config = make_config(method, mode, a.regime, seed, MAX_STEPS, scenario=a.scenario,
                                             eval_every=EVAL_EVERY, stop_at_forget_em=FORGET_TARGET,
                                             eval_examples=EVAL_EXAMPLES, final_eval_examples=FINAL_EVAL_EXAMPLES)
                        config.scope = dataclasses.replace(config.scope, lr=lr)
                        config.grip = dataclasses.replace(config.grip, **overrides)
                        t0 = time.perf_counter()
                        result = run_unlearning(moe, config, data, baseline=baseline, runs_dir=a.runs_dir)
                        reached = next((r["step"] for r in result.step_log
                                        if r.get("forget_em", 1.0) < FORGET_TARGET), None)
                        drift_ms = sum(r.get("grip_drift_ms", 0.0) or 0.0 for r in result.step_log)
                        cell = {**result_row(method, label, result), "grip_overrides": overrides, "scenario": a.scenario, "regime": a.regime,
                                "seed": seed, "lr": lr, "steps_to_forget": reached,
                                "seconds": time.perf_counter() - t0,
                                "fit_seconds": result.summary.get("timing", {}).get("grip_fit_seconds"),
                                "train_seconds": sum(r.get("step_ms", 0.0) for r in result.step_log) / 1e3,
                                "drift_seconds": drift_ms / 1e3}
                        path.write_text(json.dumps(cell, indent=1))
                    print(f"{path.name}: forget {cell['forget_em']} retain {cell['retain_em']} "
                          f"stab {cell['retain_stability']} router {cell['retain_stability_router_only']} "
                          f"steps {cell['steps_to_forget']} s {cell['seconds']:.0f}", flush=True)
                    if a.ladder and cell["steps_to_forget"] is not None:
                        break


if __name__ == "__main__":
    main()

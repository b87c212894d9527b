"""The robustness matrix across runs: method x GRIP mode rows, attack columns.

`measure_matrix` unlearns each (method, mode) cell with the study's stopping rule (forget EM below
grip_core.runs.verdict.FORGET_TARGET, checked every `eval_every` steps, at most `max_steps`), then
runs every attack (`robustness`) and the update ledger on it. `matrix_cells(run_dirs)` reads the
same cells back from saved runs that carry a robustness.json (the dashboard's source).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..moe import MoEModel
from .base import AttackConfig
from .ledger import ledger_summary, load_ledger, update_ledger
from .robustness import load_robustness, robustness


def cell_label(method: str, mode: str) -> str:
    """The matrix row label of a (method, GRIP mode) cell: "graddiff · vanilla", "graddiff · GRIP update"."""
    return f"{method} · {'vanilla' if mode in ('off', 'vanilla') else 'GRIP ' + mode}"


def measure_matrix(moe: MoEModel, data, methods: list[str], modes: list[str], *, preset: str = "shortcut",
                   seed: int = 0, lr: float | None = None, max_steps: int = 200, eval_every: int = 10,
                   attacks: list[str] | None = None, attack_config: AttackConfig | None = None,
                   final_eval_examples: int = 120, log=print) -> list[dict]:
    """One cell per (method, mode): its unlearning headline, robustness rows and ledger summary."""
    from ..runs import Baseline, run_unlearning
    from ..runs.compare import make_config
    from ..runs.verdict import FORGET_TARGET

    cells, baseline = [], None
    for method in methods:
        for mode in modes:
            config = make_config(method, mode, preset, seed, max_steps, scenario=data.name, eval_every=eval_every,
                                 stop_at_forget_em=FORGET_TARGET, final_eval_examples=final_eval_examples)
            if lr is not None:
                config.scope = dataclasses.replace(config.scope, lr=lr)
            baseline = baseline or Baseline.compute(moe, data, config)
            t0 = time.perf_counter()
            result = run_unlearning(moe, config, data, baseline=baseline, save=False)
            h = result.summary.get("headline", {})
            log(f"{cell_label(method, mode)}: {result.steps_done} steps, forget EM {h.get('forget_em')}, "
                f"{time.perf_counter() - t0:.0f} s")
            t0 = time.perf_counter()
            rows = robustness(moe, result.unlearned, None, data.forget, related=data.holdout, attacks=attacks,
                              config=attack_config, progress=lambda n: log(f"  {n}"))
            ledger = update_ledger(moe, result.unlearned)
            log(f"  attacks + ledger: {time.perf_counter() - t0:.0f} s")
            cells.append({"method": method, "grip": mode, "label": cell_label(method, mode), "preset": preset,
                          "seed": seed, "lr": config.scope.lr, "steps": result.steps_done,
                          "forget_em": h.get("forget_em"), "retain_em": h.get("retain_em"),
                          "base_forget_em": h.get("base_forget_em"), "retain_stability": h.get("retain_stability"),
                          "robustness": rows or [], "ledger": ledger_summary(ledger), "ledger_rows": ledger})
    return cells


def matrix_cells(run_dirs) -> list[dict]:
    """Cells ({"label", "method", "grip", "robustness", "ledger", "ledger_rows"}) of the saved runs that have a
    robustness.json or an update ledger (every job's report has one); "robustness" is [] without attacks."""
    import json

    cells = []
    for d in run_dirs:
        d = Path(d)
        rows = load_robustness(d)
        ledger = load_ledger(d)
        if rows is None and ledger is None:
            continue
        try:
            config = json.loads((d / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
        method = str(config.get("method", "?"))
        mode = str((config.get("grip") or {}).get("mode", "?"))
        cells.append({"label": config.get("label") or cell_label(method, mode), "method": method, "grip": mode,
                      "robustness": rows or [], "ledger": None if ledger is None else ledger_summary(ledger),
                      "ledger_rows": ledger})
    return cells


def matrix_markdown(cells: list[dict]) -> str:
    """The matrix as a markdown table: one row per (cell, attack), EM as base under attack / unlearned / attacked."""
    from ..fmt import pct

    p = lambda x: pct(x, missing="—")
    lines = ["| run | attack | setting | base EM under attack | unlearned EM | attacked EM | recovered | "
             "answer prob. unlearned → attacked | routing shift |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        for r in c["robustness"]:
            lines.append(f"| {c['label']} | {r['attack']} | {r['setting']} | {p(r['base_em'])} | {p(r['unlearned_em'])} "
                         f"| {p(r['attacked_em'])} | **{p(r['recovered'])}** | {p(r['unlearned_prob'])} → "
                         f"{p(r['attacked_prob'])} | {p(r['routing_shift'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m grip_core.attacks.matrix --modes off,update --out FILE.json`: the matrix on the demo."""
    import argparse
    import dataclasses as dc
    import json

    import torch

    from ..moe import load_model
    from ..runs import UnlearningData

    p = argparse.ArgumentParser(prog="python -m grip_core.attacks.matrix", description=measure_matrix.__doc__)
    p.add_argument("--methods", default="graddiff")
    p.add_argument("--modes", default="off,update")
    p.add_argument("--preset", default="shortcut")
    p.add_argument("--scenario", default="domain", choices=["domain", "entities"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4, help="the study's calibrated rate for GradDiff / shortcut / domain")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    data = UnlearningData.from_scenario(args.scenario, seed=args.seed)
    config = AttackConfig(seed=args.seed)
    cells = measure_matrix(load_model("demo"), data, args.methods.split(","), args.modes.split(","),
                           preset=args.preset, seed=args.seed, lr=args.lr, attack_config=config,
                           log=lambda m: print(f"[{time.perf_counter() - t0:6.0f} s] {m}", flush=True))
    Path(args.out).write_text(json.dumps({"scenario": args.scenario, "preset": args.preset, "seed": args.seed,
                                          "lr": args.lr, "attack_config": dc.asdict(config), "cells": cells},
                                         indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Whole-run wall time of GRIP arms against vanilla, side by side in ONE process (docs/study/grip_beyond.md).

The arms run one after the other on one shared Baseline, with the study's settings (make_cells.py: evaluate
every 10 steps on 64 examples, stop once forget EM < 0.1, at most 200 steps, final probes on 200 examples).
Vanilla (GRIP "off" at its calibrated lr) runs first, between the GRIP arms and last (V A V B V ...), so the
machine's drift over the minutes is visible; each ratio is against the mean of all vanilla runs. One more
vanilla run before them all warms the process up (one-time costs; in a first timing without it the process's
first run took 1.6x the later vanilla runs' time) and is left out of the rows. Every GRIP arm pays its own fit (the
Baseline's fit cache is cleared before each arm), as a lone run does.

    PYTHONPATH=. python docs/study/gripx/time_runs.py --method graddiff --seed 0 \\
        --arms "update@3e-4" "update+input_anchor=1000@1e-3"

An arm is MODE[+KEY=VALUE,...]@LR (MODE a name of grip_core.grip.config.MODES, the overrides GRIPConfig fields).
Writes docs/study/gripx/timing__<method>__<seed>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from grip_core.moe import load_model
from grip_core.runs.compare import make_config
from grip_core.runs.data import UnlearningData
from grip_core.runs.evaluate import Baseline
from grip_core.runs.job import run_unlearning
from grip_core.runs.verdict import FORGET_TARGET

HERE = Path(__file__).resolve().parent
EVAL_EVERY, EVAL_EXAMPLES, FINAL_EVAL_EXAMPLES, MAX_STEPS = 10, 64, 200, 200    # as make_cells.py


def parse_arm(arm: str) -> tuple[str, dict, float]:
    """'update+input_anchor=1000@1e-3' -> ("update", {"input_anchor": 1000.0}, 1e-3)."""
    head, lr = arm.rsplit("@", 1)
    mode, _, rest = head.partition("+")
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in rest.split(",") if kv)}
    return mode, {k: float(v) if k == "input_anchor" else v for k, v in overrides.items()}, float(lr)


def one_run(moe, data, baseline, method: str, seed: int, arm: str) -> dict:
    mode, overrides, lr = parse_arm(arm)
    config = make_config(method, mode, "shortcut", seed, MAX_STEPS, scenario="domain", eval_every=EVAL_EVERY,
                         stop_at_forget_em=FORGET_TARGET, eval_examples=EVAL_EXAMPLES,
                         final_eval_examples=FINAL_EVAL_EXAMPLES)
    config.scope = dataclasses.replace(config.scope, lr=lr)
    config.grip = dataclasses.replace(config.grip, **overrides)
    baseline.grip_fits.clear()                       # every GRIP arm pays its own fit, as a lone run does
    t0 = time.perf_counter()
    result = run_unlearning(moe, config, data, baseline=baseline, save=False)
    wall = time.perf_counter() - t0
    h, t = result.summary.get("headline", {}), result.summary.get("timing", {})
    return {"arm": arm, "steps": result.steps_done, "wall_s": wall, "fit_s": t.get("grip_fit_seconds") or 0.0,
            "steps_s": sum(r["step_ms"] for r in result.step_log) / 1e3, "step_ms_median": t.get("step_ms_median"),
            "forget_em": h.get("forget_em"), "retain_em": h.get("retain_em"),
            "retain_stability": h.get("retain_stability")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="graddiff")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vanilla-lr", default="1e-4", help="vanilla's calibrated lr (the study's rule)")
    p.add_argument("--arms", nargs="+", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    moe = load_model("demo")
    data = UnlearningData.from_scenario("domain", seed=a.seed, retain_eval_size=EVAL_EXAMPLES)
    baseline = Baseline.compute(moe, data, make_config(a.method, "off", "shortcut", a.seed, MAX_STEPS,
                                                       eval_examples=EVAL_EXAMPLES,
                                                       final_eval_examples=FINAL_EVAL_EXAMPLES))
    vanilla = f"off@{a.vanilla_lr}"
    one_run(moe, data, baseline, a.method, a.seed, vanilla)                  # warm-up, not counted
    order = [vanilla] + [x for arm in a.arms for x in (arm, vanilla)]
    rows = [one_run(moe, data, baseline, a.method, a.seed, arm) for arm in order]
    ref = [r for r in rows if r["arm"] == vanilla]
    ref_wall, ref_steps_s = (sum(r[k] for r in ref) / len(ref) for k in ("wall_s", "steps_s"))
    for r in rows:
        r["wall_ratio"] = r["wall_s"] / ref_wall
        r["train_ratio"] = (r["fit_s"] + r["steps_s"]) / ref_steps_s
        print(f"{r['arm']:40s} steps {r['steps']:3d} wall {r['wall_s']:6.1f} s ({r['wall_ratio']:.2f}x) "
              f"fit {r['fit_s']:5.1f} s steps {r['steps_s']:5.1f} s step {r['step_ms_median']:.0f} ms "
              f"stab {r['retain_stability']:.3f}", flush=True)
    out = HERE / f"timing__{a.method}__{a.seed}.json"
    out.write_text(json.dumps({"method": a.method, "seed": a.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

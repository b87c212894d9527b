"""Run every benchmark and print one summary table (ratios first); writes benchmarks/results/summary.json.

    python benchmarks/run_all.py --quick            # all of them, ≤ 5 min on 2 shared cores
    python benchmarks/run_all.py                    # the full configurations (tens of minutes)
    python benchmarks/run_all.py --quick --skip-app --only step_overhead,fit_scaling

Each benchmark also writes its own JSON (see benchmarks/README.md). A benchmark that fails is reported in
the table and in summary.json (`error`), and the others still run.
"""
from __future__ import annotations

import gc
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

ORDER = ["step_overhead", "fit_scaling", "real_shapes", "fit_real_width", "real_width", "capture_and_app",
         "demo_load"]
TARGETS = {"step_ratio": "≤ 1.03", "whole_run_ratio": "≤ 1.3", "whole_run_train_ratio": "≤ 1.3", "fit_s_layer[auto]": "≤ 30", "fit_max_principal_angle": "≈ 0", "olmoe_state_within_2gb": "True", "state_gb[olmoe]": "≤ 2", "fit_r2": "≈ 1 (linear)", "load_s[demo-fine]": "< 10"}
# a tiny configuration for the smoke test: the tiny random OLMoE, a handful of steps, narrow routers
TINY = {
    "step_overhead": dict(steps=2, warmup=1, batch_size=4, fit_examples=32, whole_run_arms=["off@1e-4", "update@1e-4"],
                          whole_run_max_steps=2, whole_run_eval_examples=4),
    "fit_scaling": dict(sizes=[150, 300], repeats=1),
    "real_shapes": dict(d_override=128, fit_experts=2, tokens_per_expert=96, layers=1, step_reps=1, r_sig=32),
    "fit_real_width": dict(d_override=128, experts=1, tokens=2048),
    "real_width": dict(hidden=256, layers=1, examples=8, repeats=1),
    "capture_and_app": dict(skip_app=True, batches=1, repeats=1),
    "demo_load": dict(repeats=1),
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"benchmarks.bench_{name}")


def _rank(figure: str) -> tuple:
    """Ratios first, then the other figures in benchmark order."""
    return (0 if "ratio" in figure else 1,)


def run_all(quick: bool = True, only: list[str] | None = None, skip_app: bool = False, out_dir=None,
            model: str = "auto", world: str | None = None, threads: int = 1, tiny: bool = False) -> dict:
    names = [n for n in ORDER if not only or n in only]
    t_all = time.perf_counter()
    docs, rows = {}, []
    for name in names:
        kwargs = dict(quick=quick, out_dir=out_dir, threads=threads)
        if name not in ("real_shapes", "fit_real_width", "real_width", "demo_load"):
            kwargs.update(model=model, world=world)
        if name == "capture_and_app":
            kwargs["skip_app"] = skip_app
        if tiny:
            kwargs.update(TINY[name])
        print(f"\n=== {name} {'(quick)' if quick else ''} ===", flush=True)
        t0 = time.perf_counter()
        try:
            payload = _module(name).run(**kwargs)
            docs[name] = {"elapsed_s": time.perf_counter() - t0, "summary": payload["summary"],
                          "json": str(Path(out_dir or C.RESULTS_DIR) / f"{name}.json")}
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not hide the others
            traceback.print_exc()
            docs[name] = {"elapsed_s": time.perf_counter() - t0, "summary": {},
                          "error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
        for fig, val in docs[name]["summary"].items():
            target = next((t for k, t in TARGETS.items() if fig.startswith(k)), "")
            rows.append({"benchmark": name, "figure": fig, "value": val, "target": target})
    rows.sort(key=lambda r: _rank(r["figure"]))
    elapsed = time.perf_counter() - t_all
    payload = {"quick": quick, "tiny": tiny, "machine": C.machine_info(), "config": {"benchmarks": names,
               "skip_app": skip_app, "threads": threads, "model": model},
               "results": {"benchmarks": docs, "figures": rows}, "elapsed_s": elapsed,
               "summary": {r["benchmark"] + ":" + r["figure"]: r["value"] for r in rows}}
    path = C.write_result("summary", payload, out_dir)
    print(f"\n=== summary ({elapsed:.0f} s; torch threads {threads}; load avg "
          f"{payload['machine'].get('loadavg_1_5_15')} on {payload['machine'].get('cpu_count')} CPUs) ===")
    print(C.fmt_table(rows, ["benchmark", "figure", "value", "target"]))
    for name, d in docs.items():
        if "error" in d:
            print(f"FAILED {name}: {d['error']}")
    print(f"wrote {path}")
    return payload


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated subset of: " + ",".join(ORDER))
    p.add_argument("--skip-app", action="store_true")
    p.add_argument("--model", default="auto")
    p.add_argument("--world", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(C.RESULTS_DIR))
    p.add_argument("--tiny", action="store_true", help="the smoke-test configuration (tiny model, seconds)")
    a = p.parse_args(argv)
    payload = run_all(a.quick, a.only.split(",") if a.only else None, a.skip_app, a.out_dir, a.model, a.world,
                      a.threads, a.tiny)
    sys.exit(1 if any("error" in d for d in payload["results"]["benchmarks"].values()) else 0)


if __name__ == "__main__":
    main()

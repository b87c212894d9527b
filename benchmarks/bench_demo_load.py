"""Load time of the two shipped demos: `load_model("demo")` (OLMoE, 10 experts) and `load_model("demo-fine")`
(Qwen2-MoE, 32 fine-grained experts + a shared expert), interleaved in one process.

    .venv/bin/python benchmarks/bench_demo_load.py [--repeats 5]

Each repeat loads both (alternating which goes first) after one warm-up load each (the one-off
imports); wall and CPU seconds per load, medians, and the ratio fine / demo. Writes
benchmarks/results/demo_load.json. The issue's target: demo-fine loads in under 10 s.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import base_parser, machine_info, median, setup_threads, write_result  # noqa: E402

NAMES = ("demo", "demo-fine")


def run(quick: bool = False, repeats: int = 5, threads: int = 1, out_dir=None) -> dict:
    """Both demos' load times (run_all.py's entry; the demos are the shipped ones whatever --model says)."""
    setup_threads(threads)
    from grip_core.moe import load_model

    for name in NAMES:
        load_model(name)                                    # warm-up: imports, file cache
    wall = {n: [] for n in NAMES}
    cpu = {n: [] for n in NAMES}
    for r in range(1 if quick else repeats):
        for name in (NAMES if r % 2 == 0 else NAMES[::-1]):
            t, c = time.perf_counter(), time.process_time()
            moe = load_model(name)
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
            del moe
    summary = {f"load_s[{n}]": round(median(wall[n]), 3) for n in NAMES}
    summary.update({f"load_cpu_s[{n}]": round(median(cpu[n]), 3) for n in NAMES})
    summary["load_ratio_fine_vs_demo"] = round(median(wall["demo-fine"]) / median(wall["demo"]), 3)
    doc = {"quick": quick, "machine": machine_info(), "config": {"repeats": repeats, "models": NAMES},
           "results": {"wall_s": wall, "cpu_s": cpu}, "summary": summary}
    path = write_result("demo_load", doc, out_dir)
    for k, v in summary.items():
        print(f"{k:32s} {v}")
    print(f"wrote {path}")
    return doc


def main(argv=None) -> dict:
    p = base_parser(__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    return run(args.quick, args.repeats, args.threads, args.out_dir)


if __name__ == "__main__":
    main()

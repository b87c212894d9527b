"""benchmarks/: every piece of run_all.py runs in a tiny configuration and writes well-formed JSON.

Timing VALUES are never asserted (they depend on the machine); only the shape of what is written.
The tiny random OLMoE and a generated quick world keep this independent of data/demo_model; the app
part of bench_capture_and_app is skipped here (tests/test_e2e_browser.py drives the real server).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(180)


def _strict_load(path: Path) -> dict:
    def no_constant(name):
        raise ValueError(f"{path.name}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=no_constant)


def _scalar(v) -> bool:
    return v is None or isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    from benchmarks.run_all import ORDER, run_all
    from grip_core.demo.world import WorldConfig, generate_world, write_world

    world = tmp_path_factory.mktemp("world")
    write_world(generate_world(WorldConfig.quick()), world)
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        payload = run_all(quick=True, out_dir=out, model="tiny", world=str(world), tiny=True, skip_app=True)
    finally:
        torch.set_num_threads(threads)
    return out, payload, ORDER


def test_every_benchmark_writes_wellformed_json(tiny_run):
    out, payload, order = tiny_run
    assert not [n for n, d in payload["results"]["benchmarks"].items() if "error" in d], payload["results"]["benchmarks"]
    for name in order:
        doc = _strict_load(out / f"{name}.json")
        assert doc["name"] == name
        assert {"quick", "machine", "config", "results", "summary"} <= set(doc)
        assert doc["machine"]["torch_threads"] >= 1 and doc["machine"]["cpu_count"] >= 1
        assert doc["summary"] and all(_scalar(v) for v in doc["summary"].values()), doc["summary"]


def test_summary_json_collects_every_figure_ratios_first(tiny_run):
    out, payload, order = tiny_run
    doc = _strict_load(out / "summary.json")
    assert set(doc["results"]["benchmarks"]) == set(order)
    figures = doc["results"]["figures"]
    assert figures and all({"benchmark", "figure", "value", "target"} <= set(f) for f in figures)
    is_ratio = [("ratio" in f["figure"]) for f in figures]
    assert is_ratio == sorted(is_ratio, reverse=True)                       # every ratio before any other figure
    assert all(_scalar(v) for v in doc["summary"].values())


def test_step_overhead_structure(tiny_run):
    out, _, _ = tiny_run
    doc = _strict_load(out / "step_overhead.json")
    variants = {r["variant"]: r for r in doc["results"]["variants"]}
    from benchmarks.bench_step_overhead import VARIANTS

    assert set(variants) == set(VARIANTS)
    assert variants["plain"]["ratio_median"] == 1.0
    for name, overrides in VARIANTS.items():
        row = variants[name]
        assert row["step_ms_median"] > 0
        if overrides is not None:                                            # GRIP arms report where time goes
            assert {"project_ms_median", "margin_ms_median", "grip_hooks_ms_median", "drift_ms_amortised"} <= set(row)
    steps = doc["config"]["steps"] + doc["config"]["warmup"]
    assert all(len(v) == steps for v in doc["results"]["per_step_ms"].values())
    whole = doc["results"]["whole_run"]                                      # complete vanilla vs GRIP runs
    assert [r["arm"] for r in whole] == ["off@1e-4", "update@1e-4"] and whole[0]["wall_ratio"] == 1.0
    assert all(r["steps"] == 2 and r["wall_s"] >= r["steps_s"] > 0 for r in whole)
    assert whole[1]["fit_s"] > whole[0]["fit_s"] >= 0                         # vanilla fits nothing
    assert doc["summary"]["whole_run_ratio[update@1e-4]"] == whole[1]["wall_ratio"]


def test_fit_scaling_and_real_shapes_structure(tiny_run):
    out, _, _ = tiny_run
    fit = _strict_load(out / "fit_scaling.json")
    sizes = fit["results"]["sizes"]
    assert [s["target_tokens"] for s in sizes] == fit["config"]["sizes"]
    assert all(s["tokens"] >= s["target_tokens"] for s in sizes)
    assert {"slope", "intercept", "r2"} <= set(fit["results"]["fit_line"])
    shapes = _strict_load(out / "real_shapes.json")
    assert set(shapes["results"]) == {"olmoe", "qwen3"}
    for r in shapes["results"].values():
        assert r["ranks"]["basis_dtype"].startswith("float16")                # the chosen storage
        assert r["step"]["basis_dtype_timed"] == "torch.float16"
        assert 0 <= r["step"]["retained_leak_float32"] < r["step"]["retained_leak_float16"] < 1e-2
        assert r["extrapolated"]["fit_gram_accumulators_gb_layer_at_a_time"] * r["shape"]["L"] == \
            pytest.approx(r["extrapolated"]["fit_gram_accumulators_gb_all_layers_at_once"])
        assert r["extrapolated"]["state_gb_total"] > 0 and r["step"]["after_step_ms_all_layers"] > 0
        assert r["fit"]["experts_fitted"] <= r["shape"]["E"]
    cap = _strict_load(out / "capture_and_app.json")
    assert cap["results"]["app"] == {"skipped": "--skip-app"}
    assert cap["results"]["capture"]["trace_tokens_per_s"] > 0

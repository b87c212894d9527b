"""Re-run a saved study cell or run folder from what it recorded, and diff the numbers.

`python -m grip_core reproduce <cell.json | run folder | study folder>`: a cell re-runs from its spec
(grip_core.runs.study), a run folder from its config.json (with its manifest's dtype), a study
folder cell by cell. On CPU, with the same code, the numbers are bit-identical (each cell runs
with one torch thread); anything else shows up as a non-empty diff.

Footguns:
- Timing (seconds, step_ms, grip_ms), paths and manifests always differ: they are not numbers of the
  experiment and are left out of the diff.
- A cell made by older code (its manifest's git commit, or "migrated") may differ legitimately: the
  diff says by how much, nothing is overwritten.
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from ..moe.errors import ConfigError

_NOT_COMPARED = {"seconds", "step_ms", "grip_ms", "step_ms_median", "grip_ms_median", "grip_fit_seconds",
                 "grip_fit_cached", "run_dir", "manifest", "migrated", "base_em_source", "reason", "time"}


def numbers(obj, prefix: str = "") -> dict:
    """{dotted key: value} of every number / string / bool leaf of a JSON object, timing and paths left out."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k not in _NOT_COMPARED:
                out.update(numbers(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.update(numbers(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = obj
    return out


def diff(saved: dict, now: dict, tolerance: float = 0.0) -> list[tuple[str, object, object]]:
    """[(key, saved, now)] where the two differ (numbers by more than `tolerance`; NaN equals NaN)."""
    a, b = numbers(saved), numbers(now)
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            if abs(x - y) <= tolerance:
                continue
        elif x == y:
            continue
        out.append((k, x, y))
    return out


def where_to_run(spec: dict, device: str | None = None) -> dict:
    """The spec's load settings with the device to re-run on: `device` if given, else the cell's own, except
    that a cell made on CUDA re-runs on the CPU where no GPU is available (same dtype: the numbers then
    differ by rounding only, which the diff shows)."""
    import torch

    load = dict(spec.get("load") or {})
    if device is not None:
        load["device"] = device
    elif str(load.get("device", "")).startswith("cuda") and not torch.cuda.is_available():
        load["device"] = "cpu"
    return load


def reproduce_cell(path: Path, runs_dir: Path | None = None, device: str | None = None) -> tuple[dict, dict]:
    """(saved cell, the cell re-run from its spec; on `device` if given, see where_to_run)."""
    from .study import run_cell

    saved = json.loads(Path(path).read_text())
    if "spec" not in saved:
        raise ConfigError(f"{path}: not a study cell with a spec (made before cell ids? migrate it first)")
    spec = {**saved["spec"], "load": where_to_run(saved["spec"], device)}
    with tempfile.TemporaryDirectory() as tmp:
        now = run_cell(spec, runs_dir or tmp)
    return {k: v for k, v in saved.items() if k != "key"}, {k: v for k, v in now.items() if k != "key"}


def reproduce_run(path: Path, runs_dir: Path | None = None) -> tuple[dict, dict]:
    """({"summary", "steps"} saved, the same re-run from config.json), the model loaded in the manifest's dtype."""
    import torch

    from ..moe import load_model
    from .config import RunConfig
    from .data import UnlearningData
    from .job import run_unlearning
    from .store import _json_default, load_run

    run = load_run(path)
    config = RunConfig.from_dict(run.config)
    manifest = json.loads((Path(path) / "manifest.json").read_text()) if (Path(path) / "manifest.json").exists() else {}
    torch.set_num_threads(int(manifest.get("torch_threads") or torch.get_num_threads()))
    dtype = manifest.get("dtype") or "auto"
    moe = load_model(config.model, dtype=dtype, device="cpu" if "cuda" not in str(manifest.get("device")) else "auto")
    with tempfile.TemporaryDirectory() as tmp:
        result = run_unlearning(moe, config, UnlearningData.for_config(config), runs_dir=runs_dir or tmp)
    as_json = lambda summary, steps: json.loads(json.dumps({"summary": summary, "steps": steps}, default=_json_default))
    return as_json(run.summary, run.steps), as_json(result.summary, result.step_log)   # both as JSON (tuples -> lists)


def _label(path: Path, device: str | None) -> str:
    spec = json.loads(Path(path).read_text()).get("spec") or {}
    made, now = (spec.get("load") or {}).get("device"), where_to_run(spec, device).get("device")
    return path.name + (f" (made on {made}, re-run on {now})" if made and now != made else "")


def reproduce(path: Path, tolerance: float = 0.0, device: str | None = None) -> list[tuple[str, list]]:
    """[(what, diff)] for a cell file, a run folder, or every cell of a study folder (cells re-run on
    `device` if given, else where they ran, or on the CPU if that was a GPU this machine lacks)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return [(_label(path, device), diff(*reproduce_cell(path, device=device), tolerance))]
    if (path / "config.json").is_file():
        return [(path.name, diff(*reproduce_run(path), tolerance))]
    cells = sorted(p for p in (path / "cells").glob("*--*.json") if not p.name.startswith("lr__"))
    if not cells:
        raise ConfigError(f"{path}: not a study cell, a run folder (config.json) or a study folder (cells/)")
    return [(_label(p, device), diff(*reproduce_cell(p, device=device), tolerance)) for p in cells]


def format_diff(name: str, d: list) -> str:
    if not d:
        return f"{name}: identical (0 numbers differ)"
    lines = [f"{name}: {len(d)} numbers differ", f"  {'key':<44} {'saved':>22} {'now':>22}"]
    lines += [f"  {k:<44} {str(x):>22} {str(y):>22}" for k, x, y in d]
    return "\n".join(lines)

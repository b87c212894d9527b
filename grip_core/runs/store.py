"""The run store: one folder per run under runs/<id>/, every write atomic.

Layout of a run folder (all readable without GRIP Studio):
    config.json          the RunConfig, as given
    status.json          {"status": running|completed|cancelled|failed|stopped, "reason", "step", ...}
    metrics.jsonl        one JSON object per logged step, appended and flushed line by line
    summary.json         final metrics (absent while running, or when the run died)
    router_deltas.safetensors   Theta_unlearned - Theta_base per router (small: E x d per layer)
    grip_ranks.json      null-space rank per layer x expert (GRIP runs)
    model/               the unlearned weights (only if asked)

A run killed mid-way leaves config + status "running" + the metrics lines written so far:
`load_run` reports it as "incomplete" and still returns everything readable. A torn last
line of metrics.jsonl (kill during a write) is skipped, never an error.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._paths import DEFAULT_RUNS_DIR  # <repo>/runs in a checkout, ./runs when pip-installed


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def new_run_id(label: str = "run") -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[:40]
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{safe}-{os.urandom(2).hex()}"


class RunWriter:
    """Writes one run folder as the job goes; every file is valid at every moment."""

    def __init__(self, root: Path | str | None, run_id: str):
        self.dir = Path(root or DEFAULT_RUNS_DIR) / run_id
        self.dir.mkdir(parents=True, exist_ok=False)
        self._metrics = open(self.dir / "metrics.jsonl", "a")

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.dir / "config.json", config)

    def set_status(self, status: str, **extra) -> None:
        atomic_write_json(self.dir / "status.json", {"status": status, "time": time.time(), **extra})

    def log_step(self, row: dict) -> None:
        self._metrics.write(json.dumps(row, default=_json_default) + "\n")
        self._metrics.flush()

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.dir / name, obj)

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.dir / name)

    def save_model(self, model, tokenizer=None, delta_of=None) -> None:
        """model/ in the run folder: a weight delta against `delta_of` (the base MoEModel), else a full checkpoint.

        Both are written in the model's native layout (grip_core/moe/delta.py), which Diagnose streams
        into the base model slice by slice.
        """
        from ..moe.delta import save_delta, save_native

        tmp = self.dir / ".model.tmp"
        if delta_of is not None:
            save_delta(model, delta_of.model.state_dict(), tmp, base=delta_of.name, tokenizer=tokenizer)
        else:
            save_native(model, tmp, tokenizer)
        os.replace(tmp, self.dir / "model")

    def close(self) -> None:
        self._metrics.close()


@dataclass
class SavedRun:
    """A run read back from disk (this machine's or a cluster's)."""

    path: Path
    config: dict
    status: dict
    steps: list[dict] = field(default_factory=list)
    summary: dict | None = None
    grip_ranks: dict | None = None

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        """completed / cancelled / failed / stopped, or "incomplete" for a run that died while running."""
        s = self.status.get("status", "unknown")
        return "incomplete" if s == "running" else s

    @property
    def label(self) -> str:
        return self.config.get("label") or self.run_id

    def router_deltas(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = self.path / "router_deltas.safetensors"
        return load_file(str(f)) if f.exists() else {}


def _read_json(path: Path, default=None):
    if not path.exists():
        return default
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def load_run(path: Path | str) -> SavedRun:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a GRIP Studio run folder (no config.json)")
    steps = []
    metrics = path / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                steps.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line from a killed process
    return SavedRun(path, _read_json(path / "config.json"), _read_json(path / "status.json", {"status": "running"}),
                    steps, _read_json(path / "summary.json"), _read_json(path / "grip_ranks.json"))


def list_runs(root: Path | str | None = None) -> list[SavedRun]:
    """Every readable run under `root`, newest first; unreadable folders are skipped."""
    root = Path(root or DEFAULT_RUNS_DIR)
    runs = []
    for d in sorted(root.glob("*/"), reverse=True) if root.exists() else []:
        try:
            runs.append(load_run(d))
        except (FileNotFoundError, ValueError):
            continue
    return runs

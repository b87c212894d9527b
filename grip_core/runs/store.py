"""The run store: one folder per run under runs/<id>/, every write atomic.

Layout of a run folder (all readable without GRIP Studio):
    config.json          the RunConfig, as given
    status.json          {"status": running|completed|cancelled|failed|stopped, "reason", "step", ...}
    metrics.jsonl        one JSON object per logged step, appended and flushed line by line
    summary.json         the RunReport (grip_core/runs/report.py), versioned (absent while running, or
                         when the run died)
    router_deltas.safetensors   Theta_unlearned - Theta_base per router (small: E x d per layer)
    grip_ranks.json      null-space rank per layer x expert (GRIP runs)
    model/               the unlearned weights (only if asked)

A run killed mid-way leaves config + status "running" + the metrics lines written so far:
`load_run` reports it as "incomplete" and still returns everything readable. A torn last
line of metrics.jsonl (kill during a write) is skipped, never an error. A summary.json that is not
a RunReport (too old, or edited by hand) makes the folder unreadable with a one-line reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._paths import DEFAULT_RUNS_DIR  # <repo>/runs in a checkout, ./runs when pip-installed
from ..moe.errors import RunStoreError
from .report import GripRanks, RunReport, parse
from .manifest import write_manifest


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    The file gets the permissions a plain open() would give it (0666 less the umask), like
    metrics.jsonl, not mkstemp's 0600. A failure is a RunStoreError naming `path`, never the temp file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise RunStoreError(f"cannot write {path}: {exc.strerror or type(exc).__name__}") from exc
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
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
        write_manifest(self.dir, status)        # manifest.json: code, versions, machine, wall time (runs/manifest.py)

    def log_step(self, row: dict) -> None:
        self._metrics.write(json.dumps(row, default=_json_default) + "\n")
        self._metrics.flush()

    def write_json(self, name: str, obj) -> None:
        atomic_write_json(self.dir / name, obj)

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        tmp = self.dir / f".{name}.tmp"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
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
    report: RunReport | None = None    # summary.json, parsed (None while running, or when the run died)
    grip_ranks: GripRanks | None = None
    error: str | None = None           # set (by list_runs) when the folder could not be read: "<file>: <reason>"

    @property
    def summary(self) -> dict | None:
        """The report as plain JSON data (summary.json as this version writes it), or None."""
        return None if self.report is None else self.report.to_dict()

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def state(self) -> str:
        """completed / cancelled / failed / stopped, or "incomplete" for a run that died while running."""
        if self.error:
            return "unreadable"
        s = self.status.get("status", "unknown")
        return "incomplete" if s == "running" else s

    @property
    def label(self) -> str:
        return self.config.get("label") or self.run_id

    def router_deltas(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        f = self.path / "router_deltas.safetensors"
        return load_file(str(f)) if f.exists() else {}


MAX_RUN_FILE_BYTES = 256 * 2**20        # a run's JSON files are KBs; anything this big is not one of ours


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_RUN_FILE_BYTES:
            raise RunStoreError(f"{path}: {path.stat().st_size / 2**20:.0f} MB, too large for a run file")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise RunStoreError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise RunStoreError(f"{path}: cannot read ({exc.strerror or type(exc).__name__})") from None


def _parse(path: Path, text: str, line: int | None = None):
    where = f"{path}:{line}" if line is not None else str(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        at = f"line {exc.lineno}, column {exc.colno}" if line is None else f"column {exc.colno}"
        raise RunStoreError(f"{where}: not valid JSON ({exc.msg} at {at})") from None
    except RecursionError:
        raise RunStoreError(f"{where}: JSON nested too deeply") from None


def _read_json(path: Path, default=None, kind: type | tuple = dict):
    """The JSON object in `path` (`default` if absent); RunStoreError naming the file if it is not one."""
    if not path.exists():
        return default
    obj = _parse(path, _read_text(path))
    if not isinstance(obj, kind):
        raise RunStoreError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_metrics(path: Path) -> list[dict]:
    """The step rows of metrics.jsonl. Only an unterminated last line (a write torn by a kill) is skipped."""
    if not path.exists():
        return []
    text = _read_text(path)
    lines = text.split("\n")
    steps = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        torn = n == len(lines) and not text.endswith("\n")
        try:
            row = _parse(path, line, n)
        except RunStoreError:
            if torn:
                continue
            raise
        if not isinstance(row, dict):
            raise RunStoreError(f"{path}:{n}: expected a JSON object per line, got {type(row).__name__}")
        step = row.get("step")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise RunStoreError(f"{path}:{n}: 'step' must be an integer, got {step!r:.40}")
        steps.append(row)
    return steps


def _check_config(path: Path, config: dict) -> None:
    for key, kind in (("grip", dict), ("scope", dict), ("method_args", dict), ("label", str), ("method", str),
                      ("model", str), ("scenario", str)):
        if key in config and config[key] is not None and not isinstance(config[key], kind):
            raise RunStoreError(f"{path}: field {key!r} must be a {kind.__name__}, got {type(config[key]).__name__}")


def _check_status(path: Path, status: dict) -> None:
    if not isinstance(status.get("status"), str):
        raise RunStoreError(f"{path}: 'status' must be a string, got {status.get('status')!r:.40}")


def load_run(path: Path | str) -> SavedRun:
    """Every readable part of a run folder; RunStoreError naming the file (and line) that is not readable."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RunStoreError(f"{path} is not a GRIP Studio run folder (no config.json)")
    config = _read_json(path / "config.json")
    _check_config(path / "config.json", config)
    status = _read_json(path / "status.json", {"status": "running"})
    _check_status(path / "status.json", status)
    steps = _read_metrics(path / "metrics.jsonl")
    summary = _read_json(path / "summary.json")
    report = None if summary is None else RunReport.from_dict(summary, source=f"run folder {path}",
                                                               file=str(path / "summary.json"))
    ranks = _read_json(path / "grip_ranks.json")
    grip_ranks = None if ranks is None else parse(GripRanks, ranks, str(path / "grip_ranks.json"))
    return SavedRun(path, config, status, steps, report, grip_ranks)


def list_runs(root: Path | str | None = None) -> list[SavedRun]:
    """Every run folder under `root`, newest first. A folder with a config.json that cannot be read is
    still listed, as state "unreadable" with `error` "<file>: <reason>" (never silently dropped)."""
    root = Path(root or DEFAULT_RUNS_DIR)
    runs = []
    try:
        folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), reverse=True) \
            if root.is_dir() else []
    except OSError as exc:
        raise RunStoreError(f"{root}: cannot list the run store ({exc.strerror or type(exc).__name__})") from None
    for d in folders:
        if not (d / "config.json").exists():
            continue            # not a run folder (e.g. a study's cells/)
        try:
            runs.append(load_run(d))
        except RunStoreError as exc:
            runs.append(SavedRun(d, {}, {"status": "unreadable", "reason": str(exc)}, error=str(exc)))
    return runs

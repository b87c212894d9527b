"""manifest.json: what made a run — code state, library versions, device, machine and wall time.

Every run folder gets one (written by the run store, `RunWriter.set_status`), and so does every
study cell (inside its JSON) and every study folder. It answers "which code, settings and machine
made these numbers?" without reading any log; `python -m grip_core reproduce` re-runs from it.

Footguns:
- `git_dirty` only looks at tracked files (untracked files, e.g. new study cells, do not count), and
  both git fields are read once per process: a commit made while a long study runs is not seen.
- `device` of a one-process run is where the caller loaded the model, which the run store does not
  see: it says "cpu" when no accelerator exists, and "as loaded" otherwise; the study overwrites it
  with the model's real device and dtype (`update_manifest`).
- In a data-parallel launch the global batch is split over the processes, so `effective_batch` is
  `batch_size` (forget and retain examples per optimizer step), not batch_size x world size.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from .._paths import REPO_ROOT

MANIFEST_FILE = "manifest.json"


@functools.lru_cache(maxsize=1)
def git_state() -> dict:
    """{"git_commit", "git_dirty"} of the checkout grip_core runs from (None / None outside a git checkout)."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"git_commit": None, "git_dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"git_commit": head.stdout.strip(), "git_dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def machine() -> dict:
    """{"cpu", "cores", "host", "os", "gpu"}: the machine's CPU model and core count, and its first GPU's name."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu or platform.machine(), "cores": os.cpu_count(), "host": platform.node(),
            "os": f"{platform.system()} {platform.release()}", "gpu": gpu}


def environment(device: str | None = None, dtype: str | None = None) -> dict:
    """Code, libraries, machine and process settings of THIS process (device/dtype: the model's, if known)."""
    import torch

    from .. import __version__

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if device is None:
        if world > 1 and torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        else:
            device = "cpu" if not torch.cuda.is_available() else "as loaded (a CUDA device is present)"
    return {**git_state(), "versions": {"grip_core": __version__, "torch": torch.__version__,
                                        "transformers": _version("transformers"), "python": sys.version.split()[0]},
            "device": device, "dtype": dtype, "world_size": world, "torch_threads": torch.get_num_threads(),
            "machine": machine()}


def run_manifest(run_dir: Path, status: str) -> dict:
    """The manifest of a run folder at `status` (reads its config.json; keeps what an earlier call wrote)."""
    run_dir = Path(run_dir)
    old = _read(run_dir / MANIFEST_FILE)
    config = _read(run_dir / "config.json")
    now = time.time()
    out = {**environment(), **old} if old else environment()
    out.update({"status": status, "seed": config.get("seed"), "grip_seed": (config.get("grip") or {}).get("seed"),
                "effective_batch": config.get("batch_size"), "started": out.get("started", now)})
    if status != "running":
        out.update({"finished": now, "wall_seconds": now - out["started"]})
        dtype = _tensor_dtype(run_dir / "router_deltas.safetensors")
        if dtype and not out.get("dtype"):
            out["dtype"] = dtype
    return out


def write_manifest(run_dir: Path, status: str, **_ignored) -> None:
    """(Re)write `run_dir`/manifest.json for `status`: the start on "running", wall time on the final status."""
    from .store import atomic_write_json

    atomic_write_json(Path(run_dir) / MANIFEST_FILE, run_manifest(run_dir, status))


def update_manifest(run_dir: Path, **fields) -> None:
    """Add fields a caller knows better than the run store (the model's device and dtype)."""
    from .store import atomic_write_json

    path = Path(run_dir) / MANIFEST_FILE
    atomic_write_json(path, {**_read(path), **fields})


def _read(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _tensor_dtype(path: Path) -> str | None:
    """The dtype of the first tensor in a safetensors file (its JSON header only), e.g. "float32"."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    for key, info in header.items():
        if key != "__metadata__" and isinstance(info, dict):
            return names.get(info.get("dtype"), info.get("dtype"))
    return None

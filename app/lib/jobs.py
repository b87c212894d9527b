"""Background unlearning jobs of one browser session: vanilla and GRIP on the same settings, side by side.

A JobPair runs in worker threads (never calling Streamlit), writes its progress into plain
lists the page polls, and stops between steps when its cancel Event is set. Each job trains
its own deep copy of the base model, taken under the base model's lock, so neither another
session nor this one ever sees a model change under it. Runs are saved to the run store.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from grip_core import MoEModel
from grip_core.moe.errors import JobsBusyError

# Job pairs that may run at once on one dashboard server, across every browser session
# (GRIP_STUDIO_MAX_JOBS overrides it). Each pair trains two deep copies of the model.
DEFAULT_MAX_CONCURRENT_JOBS = 2


def max_concurrent_jobs() -> int:
    raw = os.environ.get("GRIP_STUDIO_MAX_JOBS", "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_CONCURRENT_JOBS
    except ValueError:
        return DEFAULT_MAX_CONCURRENT_JOBS


@st.cache_resource(show_spinner=False)
def _server_jobs() -> dict:
    """Every JobPair started on this server (all sessions), and the lock guarding the count."""
    return {"lock": threading.Lock(), "pairs": []}


def running_pairs() -> list:
    reg = _server_jobs()
    with reg["lock"]:
        reg["pairs"][:] = [p for p in reg["pairs"] if not p.done]
        return list(reg["pairs"])


@dataclass
class JobSlot:
    name: str                          # "vanilla" | "GRIP"
    config: object                     # grip_core.runs.RunConfig
    rows: list = field(default_factory=list)
    status: str = "queued"             # queued | preparing | running | evaluating | completed | cancelled | stopped | failed
    reason: str = ""
    run_dir: Path | None = None
    unlearned: MoEModel | None = None  # kept in memory for the Embeddings page (this session only)
    summary: dict = field(default_factory=dict)
    started: float | None = None
    finished: float | None = None

    @property
    def done(self) -> bool:
        return self.status in ("completed", "cancelled", "stopped", "failed")

    @property
    def steps_done(self) -> int:
        return len(self.rows)

    @property
    def fraction(self) -> float:
        total = max(int(getattr(self.config, "steps", 0) or 0), 1)
        return min(1.0, self.steps_done / total)

    def phase(self) -> str:
        if self.status == "running" and self.steps_done >= getattr(self.config, "steps", 0):
            return "final evaluation (probes, attribution, restoration attack)"
        if self.status == "running" and self.steps_done == 0:
            return "preparing (deep copy, baseline, GRIP fit)"
        if self.done:
            took = f" in {self.finished - self.started:.0f} s" if self.finished and self.started else ""
            return f"{self.steps_done} steps{took}" + (f" — {self.reason}" if self.reason else "")
        return {"queued": "queued", "preparing": "preparing (deep copy, baseline probes)",
                "running": f"step {self.steps_done} / {getattr(self.config, 'steps', '?')}"}.get(self.status, self.status)


class JobPair:
    """Two jobs (or one) on the same model, data and settings, run concurrently in threads."""

    def __init__(self, base: MoEModel, lock: threading.RLock, data, configs: dict, runs_dir: Path,
                 source: str = "demo"):
        self.id = f"{time.strftime('%H%M%S')}-{id(self) % 10000:04d}"
        self.base, self.lock, self.data, self.runs_dir, self.source = base, lock, data, Path(runs_dir), source
        self.cancel = threading.Event()
        self.slots = {name: JobSlot(name, cfg) for name, cfg in configs.items()}
        self.error: str | None = None
        self.base_row: dict | None = None   # step 0 of the live curves: the base model's probe numbers
        self.started = time.time()
        self._thread = threading.Thread(target=self._main, name=f"grip-jobs-{self.id}", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "JobPair":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def done(self) -> bool:
        return not self.running and all(s.done for s in self.slots.values())

    def request_cancel(self) -> None:
        self.cancel.set()

    def progress_text(self) -> str:
        return " · ".join(f"{s.name} {s.phase()}" for s in self.slots.values())

    def run_dirs(self) -> list[Path]:
        return [s.run_dir for s in self.slots.values() if s.run_dir is not None]

    # ---- workers -----------------------------------------------------------------------------
    def _private_copy(self) -> MoEModel:
        with self.lock:
            tok = copy.deepcopy(self.base.tokenizer) if self.base.tokenizer is not None else None
            return MoEModel(copy.deepcopy(self.base.model), tok, name=self.base.name)

    def _main(self) -> None:
        try:
            for s in self.slots.values():
                s.status = "preparing"
            first = next(iter(self.slots.values()))
            baseline = None
            try:
                from grip_core.runs.evaluate import Baseline

                baseline = Baseline.compute(self._private_copy(), self.data, first.config)
                self.base_row = {"step": 0, "retain_stability": 1.0, "forget_shift": 0.0, **baseline.step_em}
            except ImportError:
                baseline = None
            workers = [threading.Thread(target=self._run_one, args=(s, baseline), daemon=True,
                                        name=f"grip-job-{s.name}") for s in self.slots.values()]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        except BaseException as exc:  # noqa: BLE001 - reported on the page
            self.error = f"{type(exc).__name__}: {exc}"
            for s in self.slots.values():
                if not s.done:
                    s.status, s.reason = "failed", self.error

    def _run_one(self, slot: JobSlot, baseline) -> None:
        from grip_core.runs import run_unlearning

        slot.started = time.time()
        if self.cancel.is_set():
            slot.status, slot.reason, slot.finished = "cancelled", "cancelled before the job started", time.time()
            return
        slot.status = "running"
        try:
            moe = self._private_copy()
            kwargs = dict(progress=slot.rows.append, cancel=self.cancel, runs_dir=self.runs_dir)
            if baseline is not None:
                kwargs["baseline"] = baseline
            result = run_unlearning(moe, slot.config, self.data, **kwargs)
            slot.run_dir = result.run_dir
            slot.summary = result.summary or {}
            slot.unlearned = result.unlearned
            slot.status, slot.reason = result.status, result.reason
        except BaseException as exc:  # noqa: BLE001
            slot.status = "failed"
            slot.reason = f"{type(exc).__name__}: {exc}"
            slot.summary = {"traceback": traceback.format_exc()[-3000:]}
        finally:
            slot.finished = time.time()


def current_pair() -> JobPair | None:
    return st.session_state.get("job_pair")


def session_pairs() -> list[JobPair]:
    return st.session_state.setdefault("job_pairs", [])


def start_pair(base: MoEModel, lock, data, configs: dict, runs_dir: Path, source: str) -> JobPair:
    """Start a JobPair, or JobsBusyError when the server already runs max_concurrent_jobs() of them."""
    reg, limit = _server_jobs(), max_concurrent_jobs()
    with reg["lock"]:
        reg["pairs"][:] = [p for p in reg["pairs"] if not p.done]
        if len(reg["pairs"]) >= limit:
            raise JobsBusyError(f"the server is already running {len(reg['pairs'])} unlearning job pair(s), its "
                                f"limit (GRIP_STUDIO_MAX_JOBS={limit}); start again when one has finished")
        pair = JobPair(base, lock, data, configs, runs_dir, source).start()
        reg["pairs"].append(pair)
    st.session_state["job_pair"] = pair
    session_pairs().append(pair)
    return pair


def in_memory_models() -> dict[str, MoEModel]:
    """Unlearned models of this session's finished jobs, by run id (for before/after embeddings)."""
    out = {}
    for pair in session_pairs():
        for s in pair.slots.values():
            if s.unlearned is not None and s.run_dir is not None:
                out[Path(s.run_dir).name] = s.unlearned
    return out


def config_with(config, **changes):
    """A copy of a dataclass config with fields replaced (nested dataclasses copied too)."""
    return dataclasses.replace(copy.deepcopy(config), **changes)

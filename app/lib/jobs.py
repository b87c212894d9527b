"""Background unlearning jobs of one browser session: the page's handle on grip_core.runs.pair.run_jobs.

A JobPair runs `run_jobs` (vanilla and GRIP on the same settings, stepped together) in one worker
thread that never calls Streamlit: it keeps the latest JobProgress event and the step rows of each
job in plain objects the page polls, and passes the pair's cancel Event down, so a cancel acts
within one forward pass in every phase. The base model is shared by every session and read only
under its lock; each job trains its own single copy. Runs are saved to the run store.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from grip_core import MoEModel
from grip_core.moe.errors import JobsBusyError

# Torch intra-op threads of a pair's worker thread (a per-thread setting: the server's other threads keep
# theirs; GRIP_STUDIO_JOB_THREADS overrides it). One, because on this project's 2-core machine, busy with
# other work, the default pair's base probes took 930 s with two threads per op and 45 s with one.
DEFAULT_JOB_THREADS = 1

# Job pairs that may run at once on one dashboard server, across every browser session
# (GRIP_STUDIO_MAX_JOBS overrides it). Each pair holds one copy of the model per job.
DEFAULT_MAX_CONCURRENT_JOBS = 2


def job_threads() -> int:
    raw = os.environ.get("GRIP_STUDIO_JOB_THREADS", "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_JOB_THREADS
    except ValueError:
        return DEFAULT_JOB_THREADS


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
    """One job of a pair as the page sees it: its latest progress event, its step rows, its result."""

    name: str                          # "vanilla" | "GRIP"
    config: object                     # grip_core.runs.RunConfig
    rows: list = field(default_factory=list)
    progress: object | None = None     # the latest grip_core.runs.job.JobProgress
    result: object | None = None       # grip_core.runs.job.RunResult once the job ended
    finished: float | None = None      # time.time() when it ended

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def status(self) -> str:
        if self.result is not None:
            return self.result.status
        return "queued" if self.progress is None else "running"

    @property
    def fraction(self) -> float:
        return 1.0 if self.done else (self.progress.overall if self.progress is not None else 0.0)

    @property
    def run_dir(self) -> Path | None:
        return self.result.run_dir if self.result is not None else None

    @property
    def summary(self) -> dict:
        return (self.result.summary or {}) if self.result is not None else {}

    @property
    def unlearned(self) -> MoEModel | None:
        return self.result.unlearned if self.result is not None else None

    def phase(self) -> str:
        """What the job is doing (or how it ended), in words."""
        if self.result is not None:
            r = self.result
            took = f"{r.steps_done} steps, {r.seconds:.0f} s"
            if r.status == "completed":
                return f"completed — {took}" + (f" ({r.reason})" if r.reason else "")
            return r.reason if r.reason.startswith(r.status) else f"{r.status} — {r.reason}"
        if self.progress is None:
            return "queued: waits for the base model probes"
        return f"{self.progress.phase} — {self.progress.text}"


class JobPair:
    """Two jobs (or one) on the same model, data and settings, run by run_jobs in a worker thread."""

    def __init__(self, base: MoEModel, lock: threading.RLock, data, configs: dict, runs_dir: Path,
                 source: str = "demo"):
        self.id = f"{time.strftime('%H%M%S')}-{id(self) % 10000:04d}"
        self.base, self.lock, self.data, self.runs_dir, self.source = base, lock, data, Path(runs_dir), source
        self.cancel = threading.Event()
        self.cancel_requested: float | None = None
        self.slots = {name: JobSlot(name, cfg) for name, cfg in configs.items()}
        self.error: str | None = None
        self.started = time.time()
        self._step_em: dict | None = None          # the base model's step-probe EM, once measured
        self._thread = threading.Thread(target=self._main, name=f"grip-jobs-{self.id}", daemon=True)

    @property
    def base_row(self) -> dict | None:
        """Step 0 of the live curves: the base model's step-probe numbers (once the base is measured)."""
        em = self._step_em
        return {"step": 0, "retain_stability": 1.0, "forget_shift": 0.0, **em} if em else None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "JobPair":
        self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    @property
    def done(self) -> bool:
        return not self.running

    def request_cancel(self) -> None:
        self.cancel_requested = self.cancel_requested or time.time()
        self.cancel.set()

    def progress_text(self) -> str:
        return " · ".join(f"{s.name} {s.phase()}" for s in self.slots.values())

    def run_dirs(self) -> list[Path]:
        return [s.run_dir for s in self.slots.values() if s.run_dir is not None]

    # ---- the worker --------------------------------------------------------------------------
    def _on_progress(self, event) -> None:
        slot = self.slots[event.job]
        slot.progress = event
        if event.row is not None:
            slot.rows.append(event.row)

    def _on_result(self, name: str, result) -> None:
        self.slots[name].result, self.slots[name].finished = result, time.time()

    def _main(self) -> None:
        import torch

        from grip_core.runs.pair import run_jobs

        torch.set_num_threads(job_threads())             # this thread only (see DEFAULT_JOB_THREADS)
        try:
            run_jobs(self.base, {n: s.config for n, s in self.slots.items()}, self.data, at_once=len(self.slots),
                     progress=self._on_progress, cancel=self.cancel, runs_dir=self.runs_dir, base_lock=self.lock,
                     on_result=self._on_result, on_baseline=lambda b: setattr(self, "_step_em", dict(b.step_em)))
        except BaseException as exc:  # noqa: BLE001 - reported on the page
            self.error = f"{type(exc).__name__}: {exc}"


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

"""compare: methods x GRIP modes on one model + data, sharing one Baseline; one table row per run."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Callable

from ..grip import GRIPConfig
from ..grip.config import MODES
from ..moe import MoEModel
from .config import RunConfig
from .data import UnlearningData
from .evaluate import Baseline
from .job import JobProgress, RunResult, run_unlearning
from .pair import run_jobs
from .presets import DEFAULT_PRESET, get_preset
from .verdict import verdict

# CLI/UI names of GRIP modes -> GRIPConfig overrides (the registry: grip_core.grip.config.MODES)
GRIP_MODES: dict[str, dict] = {name: dict(m.overrides) for name, m in MODES.items()}

TABLE_COLUMNS = ["method", "grip", "status", "steps", "forget_em", "retain_em", "holdout_em", "membership_auc",
                 "retain_stability", "retain_stability_router_only", "retain_stability_drift_only", "forget_shift",
                 "restoration_recovered", "verdict", "step_ms", "grip_ms", "run_dir"]


def grip_config(mode_name: str, seed: int = 0, **overrides) -> GRIPConfig:
    if mode_name not in GRIP_MODES:
        raise ValueError(f"unknown GRIP mode {mode_name!r}; choose from {sorted(GRIP_MODES)}")
    return GRIPConfig(**{**GRIP_MODES[mode_name], "seed": seed, **overrides})


def make_config(method: str, grip_mode: str, preset: str = DEFAULT_PRESET, seed: int = RunConfig.seed,
                steps: int = RunConfig.steps, **overrides) -> RunConfig:
    """A RunConfig for one (method, GRIP mode) cell of a preset regime."""
    p = get_preset(preset)
    return RunConfig(method=method, method_args=dict(p.method_args), scope=dataclasses.replace(p.scope),
                     grip=grip_config(grip_mode, seed), seed=seed, steps=steps, preset=preset,
                     label=f"{method}-{grip_mode}-{preset}-s{seed}", **overrides)


def result_row(method: str, grip_mode: str, result: RunResult) -> dict:
    """One table row from a finished job (NaN-free: missing numbers are None)."""
    h = result.summary.get("headline", {})
    t = result.summary.get("timing", {})
    row = {"method": method, "grip": grip_mode, "status": result.status, "steps": result.steps_done,
           **{k: h.get(k) for k in TABLE_COLUMNS if k in h},
           "base_forget_em": h.get("base_forget_em"), "base_retain_em": h.get("base_retain_em"),
           "verdict": verdict(h).kind if h else None,          # grip_core.runs.verdict (docs/method.md, Verdicts)
           "step_ms": t.get("step_ms_median"), "grip_ms": t.get("grip_ms_median"),
           "run_dir": str(result.run_dir) if result.run_dir else None, "reason": result.reason}
    return row


def compare(moe: MoEModel, data: UnlearningData, methods: list[str], grip_modes: list[str],
            preset: str = DEFAULT_PRESET, seed: int = RunConfig.seed, steps: int = RunConfig.steps, runs_dir=None,
            on_row: Callable[[dict], None] | None = None, progress: Callable[[JobProgress], None] | None = None,
            cancel=None, **config_overrides) -> list[dict]:
    """Every (method, mode) pair on the same data and seed, one after the other (grip_core.runs.pair.run_jobs:
    the base model is measured once, one model copy at a time); `progress` gets every JobProgress event."""
    cells = {f"{m}/{g}": (m, g) for m in methods for g in grip_modes}

    def row_of(name: str, result: RunResult) -> None:
        rows.append(result_row(*cells[name], result))
        if on_row:
            on_row(rows[-1])
    rows: list[dict] = []
    configs = {name: make_config(m, g, preset, seed, steps, **config_overrides) for name, (m, g) in cells.items()}
    run_jobs(moe, configs, data, at_once=1, progress=progress,
             cancel=cancel, runs_dir=runs_dir, keep_models=False, on_result=row_of)
    return rows


def compare_in_processes(moe: MoEModel, model: str, data: UnlearningData, methods: list[str],
                         grip_modes: list[str], workers: int, preset: str = DEFAULT_PRESET,
                         seed: int = RunConfig.seed, steps: int = RunConfig.steps, runs_dir=None, on_row: Callable[[dict], None] | None = None,
                         progress: Callable[[JobProgress], None] | None = None, **config_overrides) -> list[dict]:
    """compare() with the runs spread over `workers` spawned processes, one torch thread each.

    `moe` is `model` (a grip_core.moe.load_model source) loaded here: the Baseline is measured on
    it once, while the workers start and load their own copy, and sent to every run (each worker
    keeps the first copy it gets, so its GRIP runs share one fit); rows come back in compare()'s order.
    `progress` gets the workers' JobProgress events (job = "method/mode"), sent back through a queue and
    called from a thread of this process.
    Footgun: one thread per process instead of torch's default can change float sums in the last
    bits, so a row may differ from a one-process compare() by rounding, never by more.
    """
    import multiprocessing as mp

    configs = [(m, g, make_config(m, g, preset, seed, steps, model=str(model), **config_overrides))
               for m in methods for g in grip_modes]
    # the longest runs first (GRIP fits, reference-model methods), so no worker idles at the end
    cost = lambda c: (c[1] != "off", c[0] in ("npo", "graddiff"), c[1] == "drift")
    order = sorted(range(len(configs)), key=lambda i: cost(configs[i]), reverse=True)
    rows: list[dict | None] = [None] * len(configs)
    ctx = mp.get_context("spawn")
    events = ctx.Queue() if progress else None
    relay = threading.Thread(target=_relay, args=(events, progress), daemon=True) if progress else None
    if relay:
        relay.start()
    with ctx.Pool(max(1, min(workers, len(configs))), _worker_init, (model, moe.load_kwargs(), events)) as pool:
        baseline = Baseline.compute(moe, data, configs[0][2])           # meanwhile the workers load the model
        token = f"{os.getpid()}-{time.time_ns()}"                        # this compare's Baseline, in the workers
        tasks = [(data, baseline, token, *configs[i], runs_dir) for i in order]
        for i, row in zip(order, pool.imap(_compare_task, tasks)):
            rows[i] = row
            if on_row:
                on_row(row)
        pool.close()        # let the workers exit cleanly (a terminate() leaks their semaphores)
        pool.join()         # a worker exits only once its queued events are sent
    if relay:                                     # (on an error the daemon relay is left waiting: harmless)
        events.put(None)    # after the workers' last event
        relay.join()
    return rows


def _relay(events, progress: Callable[[JobProgress], None]) -> None:
    """Call `progress` with each event the workers queue, until None."""
    for event in iter(events.get, None):
        progress(event)


_WORKER_MODEL: list[MoEModel] = []
_WORKER_BASELINES: dict[str, Baseline] = {}
_WORKER_EVENTS: list = []            # the parent's progress queue, when it wants the events


def _worker_init(model: str, load: dict | None = None, events=None) -> None:
    import torch

    from ..moe import load_model

    torch.set_num_threads(1)
    _WORKER_MODEL.append(load_model(model, **(load or {})))
    if events is not None:
        _WORKER_EVENTS.append(events)


def _compare_task(task: tuple) -> dict:
    """One (method, mode) run in a worker process, on the model its initializer loaded."""
    data, baseline, token, method, mode, config, runs_dir = task
    baseline = _WORKER_BASELINES.setdefault(token, baseline)                  # keeps the GRIP fits it collects
    on_phase = None
    if _WORKER_EVENTS:
        on_phase = lambda p: _WORKER_EVENTS[0].put(dataclasses.replace(p, job=f"{method}/{mode}"))
    result = run_unlearning(_WORKER_MODEL[0], config, data, baseline=baseline, runs_dir=runs_dir, on_phase=on_phase)
    return result_row(method, mode, result)


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A fixed-width text table (percentages for fractions)."""
    columns = columns or [c for c in TABLE_COLUMNS if c != "run_dir"]

    def fmt(c, v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if c.endswith("_ms") else f"{v:.3f}"
        return str(v)
    cells = [[fmt(c, r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(x) for x in cells])

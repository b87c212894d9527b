"""run_jobs / run_pair: several unlearning jobs on one base model and data, measured against one Baseline.

The dashboard's Unlearn page (vanilla + GRIP, live) and the CLI's `compare` (methods x GRIP modes)
both run their jobs here. What it guarantees:

- One base measurement: the first job measures the base model on its own fresh copy (that copy is
  still the base model until it trains), and every later job reuses that `Baseline` and, for the
  same GRIP settings, the same GRIP fit.
- Memory: the base model plus one copy per job running at once (`at_once`; 2 for a pair, so a
  vanilla + GRIP pair holds at most 3 models), plus one frozen reference copy shared by the jobs
  whose method needs one (NPO, GradDiff with a KL retain loss, RMU). No job copies the model twice.
- Jobs running at once are stepped in turn in the calling thread (A step 1, B step 1, A step 2, ...),
  so live curves grow together; each job keeps its own random streams (job.py, `Job.own_rng`), so
  a job gives the numbers it gives alone.
- `progress(JobProgress)` gets every event of every job (phase, fraction, the step rows, the job's
  name); `cancel` (an Event or a callable) stops every job within one forward pass, in any phase,
  each with a reason naming the phase and the steps done.

Footguns:
- `base_lock` is held while a job copies the base model (no job runs the base model itself); pass the
  lock others hold around their use of that model (hooks).
- A job that fails (an exception) is marked "failed" with its reason and the others go on; Ctrl-C
  propagates.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from typing import Callable

from ..methods import get_method
from ..moe import MoEModel
from .config import RunConfig
from .data import UnlearningData
from .evaluate import Baseline
from .job import Job, JobProgress, RunResult

PAIR_NAMES = ("vanilla", "GRIP")


def pair_configs(config: RunConfig) -> dict[str, RunConfig]:
    """{"vanilla": config with GRIP off, "GRIP": config}: the same settings without and with GRIP."""
    if config.grip.mode == "off":
        raise ValueError("the GRIP config of a pair needs a GRIP mode other than 'off'")
    vanilla = copy.deepcopy(config)
    vanilla.grip = dataclasses.replace(config.grip, mode="off", input_anchor=0.0)    # GRIP's loss term goes too
    return {"vanilla": vanilla, "GRIP": copy.deepcopy(config)}


def run_pair(moe: MoEModel, config: RunConfig, data: UnlearningData | None = None, **kwargs) -> dict[str, RunResult]:
    """The same `config` run without ("vanilla") and with GRIP, stepped together: {name: RunResult}.

    kwargs: those of `run_jobs` (progress, cancel, runs_dir, save, base_lock, keep_models, baseline).
    """
    return run_jobs(moe, pair_configs(config), data, at_once=2, **kwargs)


def run_jobs(moe: MoEModel, configs: dict[str, RunConfig], data: UnlearningData | None = None, *,
             at_once: int = 1, progress: Callable[[JobProgress], None] | None = None,
             cancel: threading.Event | Callable[[], bool] | None = None, runs_dir=None, save: bool = True,
             base_lock=None, keep_models: bool = True, baseline: Baseline | None = None,
             on_result: Callable[[str, RunResult], None] | None = None,
             on_baseline: Callable[[Baseline], None] | None = None) -> dict[str, RunResult]:
    """Every config on `moe` and `data`, `at_once` jobs at a time, one Baseline: {name: RunResult} in order.

    keep_models: keep each finished job's unlearned model in its RunResult (else dropped when it ends).
    on_result(name, result): as each job ends; on_baseline(baseline): once the base model is measured.
    """
    if not configs:
        return {}
    first = next(iter(configs.values()))
    data = data or UnlearningData.for_config(first)
    lock = base_lock or contextlib.nullcontext()
    reference = _shared_reference(moe, configs.values(), lock)
    shared = {"baseline": baseline}
    if baseline is not None and on_baseline:
        on_baseline(baseline)
    results: dict[str, RunResult] = {}
    names = list(configs)
    for i in range(0, len(names), max(1, at_once)):
        jobs = [Job(moe, configs[n], data, baseline=shared["baseline"], on_phase=progress, cancel=cancel,
                    runs_dir=runs_dir, save=save, reference=reference, base_lock=base_lock, name=n)
                for n in names[i:i + max(1, at_once)]]
        _run_group(jobs, shared, on_baseline)
        for job in jobs:
            results[job.name] = job.result()
            if not keep_models:
                results[job.name].unlearned = None
            if on_result:
                on_result(job.name, results[job.name])
    return results


def _shared_reference(moe: MoEModel, configs, lock):
    """One frozen copy of the base for every job whose method needs a reference model (None if none does)."""
    if not any(get_method(c.method, **c.method_args).needs_reference for c in configs):
        return None
    with lock:
        return copy.deepcopy(moe.model).eval().requires_grad_(False)


def _run_group(jobs: list[Job], shared: dict, on_baseline=None) -> None:
    """prepare (the first measures the base), fit, steps in turn, finish; each job's errors stay its own."""
    live = lambda: [j for j in jobs if j.status == "running"]
    for job in jobs:
        job.baseline = job.baseline or shared["baseline"]
        with job.guard(reraise=False):
            job.prepare()
        if shared["baseline"] is None and job.baseline is not None:
            shared["baseline"] = job.baseline
            if on_baseline:
                on_baseline(job.baseline)
    for job in live():
        with job.guard(reraise=False):
            job.fit()
    training = live()
    while training:
        for job in training:
            with job.guard(reraise=False):
                job.step()
        training = [j for j in live() if not j.trained]
    for job in live():
        with job.guard(reraise=False):
            job.finish()
    for job in jobs:
        job.close()

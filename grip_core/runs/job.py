"""The one job loop (CLI, dashboard, study and Trainer callback all use it), as four phases.

`Job` runs one unlearning job in four phases, each its own method: `prepare` (the job's own copy
of the model, the base model's probes unless a shared `Baseline` is given, the optimizer), `fit`
(GRIP's retained statistics; nothing for a vanilla run), `step` (one training step; call it until
it returns False) and `finish` (the final probes and the saved report). Every phase reports
`JobProgress` events (phase name + fraction) and polls the cancel flag: between steps, between
the GRIP fit's retain batches, and inside the probes at every forward pass of the model (a
forward pre-hook), so a cancel acts within one forward pass, one training step or one fit batch
(the model copy and the fit's per-expert eigendecompositions run to their end). `run_unlearning` runs
the four phases in a row; grip_core/runs/pair.py interleaves two jobs (vanilla + GRIP) step by step.

The loaded base model is never mutated: the job trains a deep copy (or, with `owned=True`, a
model the caller copied for it). GRIP enters through one idiom only, `grip.wrap(optimizer)`, and
never sees the loss.

[distributed] Under `accelerate launch` / torchrun (WORLD_SIZE > 1) the same loop runs data
parallel through a DistributedContext (runs/distributed.py, docs/distributed.md); lines marked
[distributed] are its hooks, each the identity / the previous plain call in one process.

Footguns:
- The fractions of the "prepare" (base probes) and "final" phases are estimates: the rows of
  fresh forward passes so far over `probe_rows(...)`, capped at 99 % until the phase returns.
- A job's random streams (python, numpy, torch) are its own: each phase runs with the job's
  saved RNG state put back (`_own_rng`), so two jobs interleaved give the numbers each gives alone.
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..attacks.ledger import update_ledger
from ..data import encode_qa
from ..grip import GRIP
from ..grip.anchor import RouterInputAnchor
from ..grip.fit import fit_retain_statistics
from ..methods import MethodLoss, get_method
from ..moe import MoEModel
from ..scope import build_param_groups
from .config import RunConfig
from .data import UnlearningData
from .distributed import DistributedContext
from .evaluate import Baseline, evaluate_final, evaluate_step, grip_rank_report, grip_step_row
from .report import Timing
from .store import RunWriter, new_run_id

PHASES = ("prepare", "fit", "train", "final")    # in order; a finished job reports phase "done"
FIT_BATCH = 64                                   # retain examples per GRIP fit batch (cancel is polled between)


class JobCancelled(Exception):
    """Raised inside a phase when the cancel flag is set; caught by the job (status "cancelled")."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf: the job stops with this reason instead of training on garbage."""


@dataclass
class RunResult:
    """What a job returns: its config, how it ended, the step log and the final metrics."""

    config: RunConfig
    status: str                      # completed | cancelled | stopped | failed
    reason: str
    steps_done: int
    step_log: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    run_dir: Path | None = None
    unlearned: MoEModel | None = None   # in memory only; saved to disk only if config.save_weights
    phase: str = "done"                 # the phase the job ended in ("done" when it ran to the end)
    seconds: float = 0.0                # wall time from the start of "prepare" to the end

    @property
    def ok(self) -> bool:
        return self.status == "completed"


@dataclass
class JobProgress:
    """One progress event of a job (JobPair bars, the CLI): where it is and how far through that phase."""

    phase: str                 # a name in PHASES, or "done"
    fraction: float            # 0..1 within the phase (an estimate in "prepare" and "final", see the module doc)
    text: str                  # what is happening now, for a progress bar
    steps_done: int            # training steps finished so far
    row: dict | None = None    # the step's log row (phase "train", after a step)
    job: str = ""              # the job's name in a pair ("vanilla", "GRIP"); "" for a lone job

    @property
    def overall(self) -> float:
        """0..1 over the whole job: the phases weighted prepare 15 %, fit 10 %, train 60 %, final 15 %."""
        if self.phase == "done":
            return 1.0
        start = {"prepare": 0.0, "fit": 0.15, "train": 0.25, "final": 0.85}[self.phase]
        width = {"prepare": 0.15, "fit": 0.10, "train": 0.60, "final": 0.15}[self.phase]
        return start + width * min(1.0, max(0.0, self.fraction))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def example_batches(examples, batch_size: int, seed: int):
    """Endless deterministic stream of example batches, reshuffled each epoch."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield [examples[j] for j in order[i:i + batch_size]]


def probe_rows(data: UnlearningData, config: RunConfig, phase: str) -> int:
    """Rough count of example rows the base probes ("prepare") or the final probes ("final") pass through
    the model (traces + teacher-forced NLL + greedy answers), for the progress fraction only."""
    cap = lambda n: min(n, config.final_eval_examples) if config.final_eval_examples else n
    splits = sum(cap(len(v)) for v in data.splits().values())
    forget, retain = cap(len(data.forget)), len(data.retain_eval)
    if phase == "prepare":
        return 2 * splits + 2 * retain + forget + min(config.eval_examples, len(data.forget))
    return 2 * splits + 2 * retain + 4 * forget


# A run "collapsed" (destroyed the model rather than unlearned) when retain EM fell below this share of the
# base model's retain EM, from a base that knew something (>= COLLAPSE_MIN_BASE_EM).
COLLAPSE_RETAIN_RATIO = 0.25
COLLAPSE_MIN_BASE_EM = 0.2


def collapse_check(headline: dict) -> dict:
    """{"collapsed": bool, "collapse_reason": str} from a summary headline (retain EM vs the base's)."""
    retain, base = headline.get("retain_em"), headline.get("base_retain_em")
    if not isinstance(retain, (int, float)) or not isinstance(base, (int, float)) or base != base or retain != retain:
        return {"collapsed": None, "collapse_reason": "no retain EM to check"}
    if base >= COLLAPSE_MIN_BASE_EM and retain < COLLAPSE_RETAIN_RATIO * base:
        return {"collapsed": True, "collapse_reason": (
            f"retain EM fell from {base:.3f} to {retain:.3f} (below {COLLAPSE_RETAIN_RATIO:.0%} of the base): "
            "the run destroyed the model's retained knowledge, so its forgetting numbers mean nothing; "
            "lower the learning rate")}
    return {"collapsed": False, "collapse_reason": ""}


def check_data_matches(config: RunConfig, data: UnlearningData) -> None:
    """ConfigError when the data is not what the config says made the run (a saved run never misstates it)."""
    from ..data import SCENARIOS
    from ..moe.errors import ConfigError

    named = data.name if data.name in SCENARIOS else "custom"
    if config.scenario in SCENARIOS + ("custom",) and data.name in SCENARIOS + ("custom",) and named != config.scenario:
        raise ConfigError(f"the config says scenario {config.scenario!r} but the data given is {data.name!r}: "
                          "the saved run would misstate what made it")


class Job:
    """One unlearning job of `config` on `moe` and `data`, run phase by phase (see the module doc).

    moe: the base model; copied in `prepare` unless `owned` (then `moe.model` itself is trained).
    baseline: a `Baseline.compute` shared by many jobs on the same model and data (else measured here).
    progress(row): after every step, with its log row; on_phase(JobProgress): every progress event.
    cancel: an Event or a callable; polled between steps, fit batches and forward passes.
    reference: a frozen reference model for methods that need one (else a deep copy of the base).
    base_lock: held while the job copies `moe`, when others share it (the job never runs `moe` itself).
    """

    def __init__(self, moe: MoEModel, config: RunConfig, data: UnlearningData | None = None, *,
                 baseline: Baseline | None = None, progress: Callable[[dict], None] | None = None,
                 on_phase: Callable[[JobProgress], None] | None = None,
                 cancel: threading.Event | Callable[[], bool] | None = None, runs_dir: Path | str | None = None,
                 save: bool = True, dist: DistributedContext | None = None, owned: bool = False,
                 reference: torch.nn.Module | None = None, base_lock=None, name: str = ""):
        self.dist = dist or DistributedContext.from_env()                               # [distributed]
        config.check_method()                   # bad input fails here, before a run folder exists
        self.data = data or UnlearningData.for_config(config)
        check_data_matches(config, self.data)
        self.moe, self.config, self.baseline, self.owned, self.reference = moe, config, baseline, owned, reference
        self.base_lock = base_lock or contextlib.nullcontext()
        self.progress, self.on_phase, self.cancel, self.name = progress, on_phase, cancel, name
        self.writer = (RunWriter(runs_dir, new_run_id(config.display_name()))
                       if save and self.dist.is_main else None)                        # [distributed] rank 0 writes
        self.run_dir = self.writer.dir if self.writer else None
        if self.writer:
            self.writer.write_config(config.to_dict())
            self.writer.set_status("running", step=0)
        self.step_log: list[dict] = []
        self.status, self.reason, self.summary, self.phase = "running", "", {}, "prepare"
        self.step_seconds: list[float] = []
        self.grip_seconds: list[float] = []
        self.grip, self.fit_seconds, self.fit_cached, self.work = None, 0.0, False, None
        self.anchor: RouterInputAnchor | None = None       # GRIPConfig.input_anchor's loss term, made in `fit`
        self.stopped_early = self.trained = False          # stop_at_forget_em reached / no step left
        self.t0, self.t_end = time.perf_counter(), None
        outer = _rng_state()
        seed_everything(config.seed)
        self._rng = _rng_state()          # the job's own random streams, seeded (see own_rng)
        _set_rng_state(outer)

    # ---- progress and cancel ----------------------------------------------------------------------
    def report(self, phase: str, fraction: float, text: str, row: dict | None = None) -> None:
        self.phase = phase
        if self.on_phase:
            self.on_phase(JobProgress(phase, fraction, text, len(self.step_log), row, self.name))

    def check_cancel(self, collective: bool = True) -> None:
        """JobCancelled if the cancel flag is set. collective=False at points only some processes reach
        (rank 0's probes, a rank's fit batches): there, under a launch, only the step boundaries poll."""
        if not collective and self.dist.world_size > 1:                                  # [distributed]
            return
        if self.dist.any(_is_cancelled(self.cancel)) if collective else _is_cancelled(self.cancel):  # [distributed]
            raise JobCancelled(f"cancelled during {self.phase} after {len(self.step_log)} of {self.config.steps} "
                               f"steps, {time.perf_counter() - self.t0:.0f} s after the job started")

    @contextlib.contextmanager
    def _watch(self, phase: str, text: str, rows: int):
        """Poll cancel at every forward pass of the job's model; count fresh rows into the phase's fraction."""
        seen = [0]

        def hook(module, args, kwargs):
            self.check_cancel(collective=False)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if rows and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] > 1:   # not a decode step
                seen[0] += ids.shape[0]
                self.report(phase, min(0.99, seen[0] / max(rows, 1)), f"{text} · {seen[0]} of ~{rows} example passes")
        handle = self.work.model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def own_rng(self):
        """Run with this job's random streams, and keep where they got to (jobs interleave)."""
        outer = _rng_state()
        _set_rng_state(self._rng)
        try:
            yield
        finally:
            self._rng = _rng_state()
            _set_rng_state(outer)

    # ---- the four phases ----------------------------------------------------------------------------
    def prepare(self) -> None:
        """The job's own copy of the model, the base probes (unless shared), the method and the optimizer."""
        cfg, dist = self.config, self.dist
        self.report("prepare", 0.0, "copying the model")
        self.check_cancel()
        with self.base_lock:
            model = self.moe.model if self.owned else copy.deepcopy(self.moe.model)
        model = dist.place_model(model)                                                 # [distributed] device
        self.work = MoEModel(model, self.moe.tokenizer, name=self.moe.name)
        if self.baseline is None:         # the copy is still the base model: measure it there
            text = "base model probes"
            with self._watch("prepare", text, probe_rows(self.data, cfg, "prepare")):
                self.baseline = dist.on_main(Baseline.compute, self.work, self.data, cfg)   # [distributed] rank 0
        self.method = get_method(cfg.method, **cfg.method_args)
        if (self.method.needs_reference or cfg.grip.input_anchor) and self.reference is None:
            self.reference = dist.place_model(copy.deepcopy(self.moe.model), batches=False).eval().requires_grad_(False)
        self.groups = build_param_groups(model, self.work, cfg.scope)
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(self.groups, lr=cfg.scope.lr, weight_decay=cfg.weight_decay)
        self.forget_stream = example_batches(self.data.forget, cfg.batch_size, cfg.seed)
        self.retain_stream = example_batches(self.data.retain_train, cfg.batch_size, cfg.seed + 1)
        self.report("prepare", 1.0, "prepared")

    def encode(self, examples):
        return encode_qa(self.moe.tokenizer, examples, max_length=self.config.max_length)

    def fit(self) -> None:
        """GRIP's retained statistics (reused from the shared Baseline when an earlier job made them)."""
        cfg, dist, t0 = self.config, self.dist, time.perf_counter()
        if cfg.grip.mode != "off":        # vanilla runs (mode "off") skip the fit and the hooks: they pay nothing
            examples = self.data.retain_train[:cfg.grip_fit_examples] if cfg.grip_fit_examples else self.data.retain_train
            key = (cfg.grip.fit_key(), len(examples), cfg.max_length)
            share = self.baseline is not None and dist.world_size == 1
            cached = self.baseline.grip_fits.get(key) if share else None
            self.fit_cached = cached is not None
            if self.fit_cached:           # the base model's fit, made by an earlier job on this Baseline
                state = copy.deepcopy(cached)
            else:
                state = fit_retain_statistics(self.work, self._fit_batches(dist.shard(examples)), cfg.grip,
                                              reduce=dist.fit_reducer())               # [distributed] = GRIP.fit
                if share:
                    self.baseline.grip_fits[key] = copy.deepcopy(state)                # drift mode edits its copy
            self.grip = GRIP(self.work, state, cfg.grip)
            self.optimizer = self.grip.wrap(self.optimizer)
            if cfg.grip.input_anchor:     # a loss term on the router inputs (grip/anchor.py): GRIP never sees the loss
                self.anchor = RouterInputAnchor(self.work.layers, self.reference, cfg.grip.input_anchor,
                                                cfg.grip.input_anchor_layers)
            if self.writer:
                self.writer.write_json("grip_ranks.json", grip_rank_report(self.grip))
        self.fit_seconds = time.perf_counter() - t0
        self.optimizer = dist.prepare_optimizer(self.optimizer)  # [distributed] accelerate wraps the hooked optimizer
        self.work.model.train()
        self.report("fit", 1.0, "GRIP fit done" if self.grip else "no GRIP fit (vanilla)")

    def _fit_batches(self, examples):
        """The fit's retain batches; cancel and progress between them."""
        n = max(1, math.ceil(len(examples) / FIT_BATCH))
        for b, i in enumerate(range(0, len(examples), FIT_BATCH)):
            self.check_cancel(collective=False)
            self.report("fit", b / n, f"GRIP fit · retain batch {b + 1} of {n}")
            yield self.encode(examples[i:i + FIT_BATCH])
        self.check_cancel(collective=False)
        self.report("fit", 0.99, "GRIP fit · null-space bases")

    def step(self) -> bool:
        """One training step (and its step probes every eval_every steps); False when training is over."""
        cfg, dist, step = self.config, self.dist, len(self.step_log) + 1
        if step > cfg.steps or self.stopped_early:
            self.trained = True
            return False
        self.check_cancel()
        forget_batch = dist.to_device(self.encode(dist.shard(next(self.forget_stream))))  # [distributed] r::N of the
        retain_batch = dist.to_device(self.encode(dist.shard(next(self.retain_stream))))  # global batch, on device
        t_step = time.perf_counter()
        watch = self.anchor.watch(self.work.model, retain_batch) if self.anchor else contextlib.nullcontext({})
        with dist.autocast():                                                              # [distributed]
            with watch as seen:
                out = self.method.loss(self.work.model, forget_batch, retain_batch, self.reference)
            if self.anchor:
                anchor = self.anchor.loss(self.work.model, retain_batch, seen)
                out = MethodLoss(out.total + anchor, {**out.parts, "input_anchor": anchor.item()})
        logged = dist.mean(out.total)                                                      # [distributed] = loss
        if not torch.isfinite(logged):
            raise NonFiniteLossError(f"non-finite loss ({logged.item()}) at step {step}: stopped before "
                                     "updating the weights; lower the learning rate")
        self.optimizer.zero_grad(set_to_none=True)
        dist.backward(out.total, self.params)          # [distributed] loss.backward() (+ gradient all-reduce)
        if cfg.max_grad_norm:
            dist.clip_grad_norm_(self.params, cfg.max_grad_norm)                           # [distributed]
        self.optimizer.step()
        self.step_seconds.append(time.perf_counter() - t_step)
        grip_row = grip_step_row(self.grip.history[-1]) if self.grip is not None and self.grip.history else {}
        self.grip_seconds.append(grip_row.get("grip_ms", 0.0) / 1000)
        row = {"step": step, "loss": float(logged.item()), **dist.mean_dict(out.parts), **grip_row,
               "step_ms": 1000 * self.step_seconds[-1]}
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            self.work.model.eval()
            with self._watch("train", f"step {step} probes", 0):
                row.update(dist.main_only(evaluate_step, self.work, self.baseline, self.data, cfg))  # [distributed]
            self.work.model.train()
        return self._log_step(row)

    def _log_step(self, row: dict) -> bool:
        cfg, step = self.config, row["step"]
        self.step_log.append(row)
        if self.writer:
            self.writer.log_step(row)
        if self.progress:
            self.progress(row)
        self.report("train", step / max(cfg.steps, 1), f"step {step} / {cfg.steps}", row)
        if cfg.stop_at_forget_em is not None and "forget_em" in row and row["forget_em"] < cfg.stop_at_forget_em:
            self.reason = f"forget EM {row['forget_em']:.3f} < {cfg.stop_at_forget_em} at step {step}"
            self.stopped_early = True
        self.trained = step >= cfg.steps or self.stopped_early
        return not self.trained

    def finish(self) -> None:
        """The final probes (on rank 0), the timing, and the saved report, router deltas and weights."""
        cfg, dist, work = self.config, self.dist, self.work
        work.model.eval()
        dist.check_replicas(work.router_state())                             # [distributed] routers bitwise equal
        with self._watch("final", "final probes", probe_rows(self.data, cfg, "final")):
            # base=None: the attribution swaps the base's router tensors into this job's own router modules,
            # so the shared base model is not run (other sessions may be tracing it)
            report = dist.main_only(evaluate_final, work, None, self.baseline, self.data, cfg, self.grip)
        median = lambda xs: 1000 * float(np.median(xs)) if xs else math.nan
        report.timing = Timing(grip_fit_seconds=self.fit_seconds, grip_fit_cached=self.fit_cached,
                               step_ms_median=median(self.step_seconds), grip_ms_median=median(self.grip_seconds),
                               steps=len(self.step_seconds))
        report.steps_done = len(self.step_seconds)
        for key, value in collapse_check(report.headline.to_dict()).items():
            setattr(report.headline, key, value)
        report.ledger = update_ledger(self.moe, work)                        # where the update landed (cheap)
        summary = report.to_dict()                                           # RunReport's JSON form (summary.json)
        if self.writer:
            self.writer.write_json("summary.json", summary)
            self.writer.write_tensors("router_deltas.safetensors", {
                k: v - self.baseline.router_state[k] for k, v in work.router_state().items()})
            if cfg.save_weights:
                self.writer.save_model(work.model, self.moe.tokenizer,
                                       delta_of=self.moe if cfg.weights_format == "delta" else None)
        self.summary, self.status = summary, "completed"
        self.report("done", 1.0, f"{len(self.step_log)} steps · final probes done")

    # ---- how it ended --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self, reraise: bool = True):
        """Run phases: a cancel or a NaN loss ends the job with its reason; other errors mark it failed
        (and propagate unless `reraise` is False); Ctrl-C is recorded as a cancel and propagates."""
        try:
            with self.own_rng():
                yield
        except JobCancelled as exc:
            self._end("cancelled", str(exc))
        except NonFiniteLossError as exc:
            self._end("stopped", str(exc))
        except KeyboardInterrupt:
            self._end("cancelled", f"interrupted (Ctrl-C) during {self.phase} after step {len(self.step_log)}")
            raise
        except BaseException as exc:
            self._end("failed", f"{type(exc).__name__}: {exc}")
            self.summary = {"traceback": traceback.format_exc()[-3000:]}
            if reraise or not isinstance(exc, Exception):
                raise

    def _end(self, status: str, reason: str) -> None:
        self.status, self.reason, self.summary, self.work = status, reason, {}, None
        self.t_end = time.perf_counter()
        self.close()

    def close(self) -> None:
        """Write the final status (once)."""
        if self.t_end is None:
            self.t_end = time.perf_counter()
        if self.writer:
            self.writer.set_status(self.status, reason=self.reason, step=len(self.step_log))
            self.writer.close()
            self.writer = None

    def result(self) -> RunResult:
        return RunResult(self.config, self.status, self.reason, len(self.step_log), self.step_log, self.summary,
                         self.dist.broadcast_object(self.run_dir), self.work,   # [distributed] rank 0's dir
                         self.phase, (self.t_end or time.perf_counter()) - self.t0)


def _rng_state() -> tuple:
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state: tuple) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def run_unlearning(moe: MoEModel, config: RunConfig, data: UnlearningData | None = None, *,
                   baseline: Baseline | None = None, progress: Callable[[dict], None] | None = None,
                   cancel: threading.Event | Callable[[], bool] | None = None,
                   runs_dir: Path | str | None = None, save: bool = True,
                   dist: DistributedContext | None = None,
                   on_phase: Callable[[JobProgress], None] | None = None) -> RunResult:
    """Unlearn `data.forget` from a deep copy of `moe` with `config`; return (and save) the result.

    `progress(row)` is called after every step with the step's log row, `on_phase(JobProgress)` at
    every progress event of every phase; `cancel` (an Event or a callable) stops the job within one
    forward pass with status "cancelled" and a reason naming the phase. A NaN/inf loss stops it with
    status "stopped" and a reason naming the step. `baseline` (from `Baseline.compute`) lets many
    jobs on the same model and data share the base model's traces and probes.
    `dist`: the process's DistributedContext (default: from the environment; one process = no-op).
    """
    job = Job(moe, config, data, baseline=baseline, progress=progress, on_phase=on_phase, cancel=cancel,
              runs_dir=runs_dir, save=save, dist=dist)
    with job.guard():
        job.prepare()
        job.fit()
        while job.step():
            pass
        job.finish()
    job.close()
    return job.result()

"""run_unlearning: the one job loop (CLI, dashboard, study and Trainer callback all use it).

The loaded base model is never mutated: the job trains a deep copy. GRIP enters through
one idiom only, `grip.wrap(optimizer)`, and never sees the loss.

[distributed] Under `accelerate launch` / torchrun (WORLD_SIZE > 1) the same loop runs data
parallel through a DistributedContext (runs/distributed.py, docs/distributed.md); lines marked
[distributed] are its hooks, each the identity / the previous plain call in one process.
"""
from __future__ import annotations

import copy
import math
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data import encode_qa
from ..grip import GRIP
from ..grip.fit import fit_retain_statistics
from ..methods import get_method
from ..moe import MoEModel
from ..scope import build_param_groups
from .config import RunConfig
from .data import UnlearningData
from .distributed import DistributedContext
from .evaluate import Baseline, evaluate_final, evaluate_step, grip_rank_report, grip_step_row
from .report import Timing
from .store import RunWriter, new_run_id


class JobCancelled(Exception):
    """Raised inside the loop when the cancel flag is set; caught by run_unlearning."""


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

    @property
    def ok(self) -> bool:
        return self.status == "completed"


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


def run_unlearning(moe: MoEModel, config: RunConfig, data: UnlearningData | None = None, *,
                   baseline: Baseline | None = None, progress: Callable[[dict], None] | None = None,
                   cancel: threading.Event | Callable[[], bool] | None = None,
                   runs_dir: Path | str | None = None, save: bool = True,
                   dist: DistributedContext | None = None) -> RunResult:
    """Unlearn `data.forget` from a deep copy of `moe` with `config`; return (and save) the result.

    `progress(row)` is called after every step with the step's log row; `cancel` (an Event or a
    callable) stops the job between steps with status "cancelled". A NaN/inf loss stops it with
    status "stopped" and a reason naming the step. `baseline` (from `Baseline.compute`) lets many
    jobs on the same model and data share the base model's traces and probes.
    `dist`: the process's DistributedContext (default: from the environment; one process = no-op).
    """
    dist = dist or DistributedContext.from_env()                                        # [distributed]
    config.check_method()                       # bad input fails here, before a run folder exists
    data = data or UnlearningData.for_config(config)
    check_data_matches(config, data)
    tok = moe.tokenizer
    writer = RunWriter(runs_dir, new_run_id(config.display_name())) if save and dist.is_main else None  # [distributed] rank 0 writes
    if writer:
        writer.write_config(config.to_dict())
        writer.set_status("running", step=0)
    step_log: list[dict] = []
    status, reason, step = "completed", "", 0
    try:
        seed_everything(config.seed)
        baseline = baseline or dist.on_main(Baseline.compute, moe, data, config)        # [distributed] rank 0 (others: None)
        model = dist.place_model(copy.deepcopy(moe.model))                              # [distributed] device
        work = MoEModel(model, tok, name=moe.name)
        method = get_method(config.method, **config.method_args)
        ref_model = None
        if method.needs_reference:
            ref_model = dist.place_model(copy.deepcopy(moe.model), batches=False).eval().requires_grad_(False)  # [distributed]
        encode = lambda ex: encode_qa(tok, ex, max_length=config.max_length)
        groups = build_param_groups(model, work, config.scope)
        optimizer = torch.optim.AdamW(groups, lr=config.scope.lr, weight_decay=config.weight_decay)

        t0 = time.perf_counter()
        grip, fit_cached = None, False   # vanilla runs (mode "off") skip the fit and the hooks: they pay nothing
        if config.grip.mode != "off":
            fit_examples = data.retain_train[:config.grip_fit_examples] if config.grip_fit_examples else data.retain_train
            key = (config.grip.fit_key(), len(fit_examples), config.max_length)
            cached = baseline.grip_fits.get(key) if baseline is not None and dist.world_size == 1 else None
            fit_cached = cached is not None
            if fit_cached:                  # the base model's fit, made by an earlier job on this Baseline
                state = copy.deepcopy(cached)
            else:
                fit_examples = dist.shard(fit_examples)                                 # [distributed] r::N
                state = fit_retain_statistics(
                    work, (encode(fit_examples[i:i + 64]) for i in range(0, len(fit_examples), 64)),
                    config.grip, reduce=dist.fit_reducer())                            # [distributed] = GRIP.fit
                if baseline is not None and dist.world_size == 1:
                    baseline.grip_fits[key] = copy.deepcopy(state)                     # drift mode edits its copy
            grip = GRIP(work, state, config.grip)
            optimizer = grip.wrap(optimizer)
            if writer:
                writer.write_json("grip_ranks.json", grip_rank_report(grip))
        fit_seconds = time.perf_counter() - t0
        optimizer = dist.prepare_optimizer(optimizer)                   # [distributed] accelerate wraps the hooked optimizer
        params = [p for g in groups for p in g["params"]]

        forget_stream = example_batches(data.forget, config.batch_size, config.seed)
        retain_stream = example_batches(data.retain_train, config.batch_size, config.seed + 1)
        model.train()
        step_seconds, grip_seconds = [], []
        for step in range(1, config.steps + 1):
            if dist.any(_is_cancelled(cancel)):                                         # [distributed] agreed
                raise JobCancelled(f"cancelled before step {step}")
            forget_batch = dist.to_device(encode(dist.shard(next(forget_stream))))    # [distributed] r::N of the
            retain_batch = dist.to_device(encode(dist.shard(next(retain_stream))))    # global batch, on device
            t_step = time.perf_counter()
            with dist.autocast():                                                      # [distributed]
                out = method.loss(model, forget_batch, retain_batch, ref_model)
            loss = out.total
            logged = dist.mean(loss)                                                   # [distributed] = loss
            if not torch.isfinite(logged):
                raise NonFiniteLossError(f"non-finite loss ({logged.item()}) at step {step}: stopped before "
                                         "updating the weights; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            dist.backward(loss, params)                          # [distributed] loss.backward() (+ gradient all-reduce)
            if config.max_grad_norm:
                dist.clip_grad_norm_(params, config.max_grad_norm)                     # [distributed]
            optimizer.step()
            step_seconds.append(time.perf_counter() - t_step)
            grip_row = grip_step_row(grip.history[-1]) if grip is not None and grip.history else {}
            grip_seconds.append(grip_row.get("grip_ms", 0.0) / 1000)
            row = {"step": step, "loss": float(logged.item()), **dist.mean_dict(out.parts), **grip_row,
                   "step_ms": 1000 * step_seconds[-1]}
            if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                model.eval()
                row.update(dist.main_only(evaluate_step, work, baseline, data, config))  # [distributed] rank 0
                model.train()
            step_log.append(row)
            if writer:
                writer.log_step(row)
            if progress:
                progress(row)
            if (config.stop_at_forget_em is not None and "forget_em" in row
                    and row["forget_em"] < config.stop_at_forget_em):
                status, reason = "completed", f"forget EM {row['forget_em']:.3f} < {config.stop_at_forget_em} at step {step}"
                break
        model.eval()
        dist.check_replicas(work.router_state())                            # [distributed] routers bitwise equal
        report = dist.main_only(evaluate_final, work, moe, baseline, data, config, grip)   # [distributed] rank 0
        report.timing = Timing(
            grip_fit_seconds=fit_seconds, grip_fit_cached=fit_cached,
            step_ms_median=1000 * float(np.median(step_seconds)) if step_seconds else math.nan,
            grip_ms_median=1000 * float(np.median(grip_seconds)) if grip_seconds else math.nan,
            steps=len(step_seconds))
        report.steps_done = len(step_seconds)
        for key, value in collapse_check(report.headline.to_dict()).items():
            setattr(report.headline, key, value)
        summary = report.to_dict()                                          # RunReport's JSON form (summary.json)
        if writer:
            writer.write_json("summary.json", summary)
            writer.write_tensors("router_deltas.safetensors", {
                k: v - baseline.router_state[k] for k, v in work.router_state().items()})
            if config.save_weights:
                writer.save_model(model, tok, delta_of=moe if config.weights_format == "delta" else None)
        result_model = work
    except JobCancelled as exc:
        status, reason, summary, result_model = "cancelled", str(exc), {}, None
    except NonFiniteLossError as exc:
        status, reason, summary, result_model = "stopped", str(exc), {}, None
    except KeyboardInterrupt:
        if writer:
            writer.set_status("cancelled", reason=f"interrupted (Ctrl-C) after step {len(step_log)}",
                              step=len(step_log))
            writer.close()
        raise
    except BaseException as exc:
        if writer:
            writer.set_status("failed", reason=f"{type(exc).__name__}: {exc}", step=step)
            writer.close()
        raise
    if writer:
        writer.set_status(status, reason=reason, step=len(step_log))
        writer.close()
    return RunResult(config, status, reason, len(step_log), step_log, summary,
                     dist.broadcast_object(writer.dir if writer else None), result_model)  # [distributed] rank 0's dir

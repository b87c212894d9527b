"""The CLI's commands (argument parsing is in grip_core/cli.py; the work is in grip_core.runs)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from ..cli import load_kwargs
from ..fmt import pct
from ..moe import load_model
from ..moe.errors import ConfigError, GripStudioError
from .compare import GRIP_MODES, TABLE_COLUMNS, compare, compare_in_processes, format_table, make_config
from .config import RunConfig
from .data import UnlearningData
from .job import JobProgress
from .report import RunReport
from .store import DEFAULT_RUNS_DIR, atomic_write_json, atomic_write_text


class OutputPathError(GripStudioError, OSError):
    """An output path given on the command line cannot be written."""


def check_output_path(path: str | Path, flag: str) -> Path:
    """OutputPathError naming `flag` and `path` when a file cannot be written there (checked before any work)."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path}: is a directory; give a file path")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {path}: cannot write in {parent} (permission denied)")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputPathError(f"{flag} {path}: the file exists and is not writable")
    return path


def check_outputs(args) -> None:
    """Every output path of the command, checked before a model is loaded or a run is made."""
    out = getattr(args, "out", None)
    if out and args.command == "compare":
        for suffix in (".csv", ".json"):
            check_output_path(Path(out).with_suffix(suffix), "--out")
    elif out:
        check_output_path(out, "--out")
    if args.command == "study":
        out_dir = _study_out_dir(args)
        if out_dir.exists() and not out_dir.is_dir():
            raise OutputPathError(f"--out-dir {out_dir}: exists and is not a directory")
        check_output_path(out_dir / "findings.md", "--out-dir")
        if args.report:
            check_output_path(args.report, "--report")


def _steps(args) -> int:
    if args.steps is None:
        return RunConfig.steps           # the one source of defaults
    if args.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {args.steps}")
    return args.steps


def _data(args, seed: int | None = None, retain_eval_size: int = 64) -> UnlearningData:
    seed = args.seed if seed is None else seed
    if getattr(args, "forget_file", None) or getattr(args, "retain_file", None):
        if not (args.forget_file and args.retain_file):
            raise ConfigError("--forget-file needs --retain-file too" if args.forget_file
                              else "--retain-file needs --forget-file too")
        return UnlearningData.from_files(args.forget_file, args.retain_file, args.holdout_file, seed=seed,
                                         retain_eval_size=retain_eval_size)
    if getattr(args, "holdout_file", None):
        raise ConfigError("--holdout-file needs --forget-file and --retain-file")
    return UnlearningData.from_scenario(args.scenario, seed=seed, retain_eval_size=retain_eval_size)


def _data_record(data: UnlearningData) -> dict:
    """RunConfig fields that say which data made a run: scenario, and the files (paths + hashes) if custom."""
    return {"scenario": data.name if data.name != "custom" else "custom", "data_files": dict(data.files)}


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _check_model_source(model: str) -> None:
    """A cheap check of --model before anything is written (the load itself reports the details)."""
    from .._paths import DEMO_MODELS

    if model in DEMO_MODELS or model.startswith("tiny:"):
        return
    path = Path(model)
    if not path.is_dir() or not (path / "config.json").is_file():
        from ..moe.errors import ModelLoadError

        raise ModelLoadError(f"--model {model}: not a checkpoint directory (a folder with config.json)")


def _split_list(value: str, flag: str) -> list[str]:
    items = [m.strip() for m in value.split(",") if m.strip()]
    if not items:
        raise ConfigError(f"{flag} {value!r}: give at least one name (comma separated)")
    return items


def _write_table(stem: str, rows: list[dict]) -> None:
    stem = Path(stem)
    atomic_write_json(stem.with_suffix(".json"), rows)
    cols = TABLE_COLUMNS + ["reason"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def phase_lines(every: int, write: Callable[[str], None]) -> Callable[[JobProgress], None]:
    """A JobProgress callback that writes one line when a job enters a phase, and one every `every` training
    steps (0: none) with the step's loss (and its probes' EMs when that step measured them).

    Lines read "[graddiff/update] train: step 20 / 60 · loss 1.234"; `write` gets each line (the CLI passes
    tqdm.write to stderr, so the lines print above the run bar, not through it).
    """
    last: dict[str, str] = {}

    def on_event(p: JobProgress) -> None:
        name = p.job or "run"
        step_line = p.phase == "train" and p.row is not None and every and p.steps_done % every == 0
        if p.phase == last.get(name) and not step_line:
            return
        last[name] = p.phase
        line = f"[{name}] {p.phase}: {p.text}"
        if p.row is not None:
            line += f" · loss {p.row['loss']:.3f}" + "".join(
                f" · {k.replace('_', ' ')} {pct(p.row[k])}" for k in ("forget_em", "retain_em") if p.row.get(k) is not None)
        write(line)
    return on_event


def cmd_compare(args) -> int:
    from ..methods.base import method_class

    methods = _split_list(args.methods, "--methods")
    modes = _split_list(args.grip_modes, "--grip-modes")
    for m in methods:
        try:
            method_class(m)
        except ValueError as exc:
            raise ConfigError(f"--methods: {exc}") from None
    unknown = [m for m in modes if m not in GRIP_MODES]
    if unknown:
        raise ConfigError(f"--grip-modes: unknown mode(s) {unknown}; choose from {sorted(GRIP_MODES)}")
    steps = _steps(args)
    if args.log_every < 0:
        raise ConfigError(f"--log-every must be >= 0, got {args.log_every}")
    data = _data(args)
    for w in data.warnings:
        _warn(w)
    out = args.out or str(Path(args.runs_dir or DEFAULT_RUNS_DIR) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    for suffix in (".csv", ".json"):
        check_output_path(Path(out).with_suffix(suffix), "--out")
    moe = load_model(args.model, **load_kwargs(args))
    bar = tqdm(total=len(methods) * len(modes), desc="compare", unit="run", file=sys.stderr)

    def on_row(row):
        bar.update(1)
        bar.set_postfix_str(f"{row['method']}/{row['grip']}: {row['status']}")
    workers = min(args.workers or os.cpu_count() or 1, len(methods) * len(modes))
    progress = phase_lines(args.log_every, lambda line: tqdm.write(line, file=sys.stderr))
    common = dict(preset=args.preset, seed=args.seed, steps=steps, runs_dir=args.runs_dir, on_row=on_row,
                  progress=progress,
                  eval_every=args.eval_every, final_eval_examples=args.final_eval_examples, max_length=args.max_length,
                  model=str(args.model), **_data_record(data))
    if workers > 1:     # the model loaded above already failed early on a bad path / non-MoE model
        common.pop("model")                   # its `model` argument is recorded in every run's config
        rows = compare_in_processes(moe, args.model, data, methods, modes, workers, **common)
    else:
        rows = compare(moe, data, methods, modes, **common)
    bar.close()
    print(format_table(rows))
    _write_table(out, rows)
    print(f"\nwrote {out}.csv and {out}.json; runs saved under {args.runs_dir or 'runs/'}")
    return 0


# flag (argparse dest) -> the RunConfig field it sets, for `run --config FILE` with flags
_RUN_FLAGS = {"model": "model", "scenario": "scenario", "seed": "seed", "steps": "steps", "method": "method",
              "max_length": "max_length"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _explicit(args) -> set[str]:
    """Flags given on the command line (cli.main records them; else: those that differ from the defaults)."""
    if hasattr(args, "explicit"):
        return set(args.explicit)
    from ..cli import build_parser

    defaults = vars(build_parser().parse_args([args.command, *(["--base", "x", "--unlearned", "x", "--forget-file",
                                                                 "x", "--retain-file", "x"] if args.command == "diagnose"
                                                               else ["--file", "x"] if args.command == "trace" else [])]))
    return {k for k, v in vars(args).items() if k in defaults and defaults[k] != v}


def run_config_from_args(args):
    """The RunConfig of `run`, and the data it names, resolved so that the two always agree.

    Precedence: the config file holds the run; a flag given on the command line fills a field the file
    leaves out, and a flag that contradicts the file is an error (never silently one or the other).
    --forget-file / --retain-file make the scenario "custom" and record the files' paths and sha256.
    """
    explicit = _explicit(args)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            detail = f"{exc.msg}, line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else \
                type(exc).__name__
            raise ConfigError(f"{path}: not valid JSON ({detail})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object of RunConfig fields, got {type(raw).__name__}")
        d = dict(raw)
        values = {dest: getattr(args, dest) for dest in _RUN_FLAGS if dest in explicit}
        if "steps" in values:
            values["steps"] = _steps(args)
        if args.forget_file or args.retain_file:
            values["scenario"] = "custom"
        for dest, value in values.items():
            key = _RUN_FLAGS[dest]
            if key in d and d[key] != value:
                what = "--forget-file" if dest == "scenario" and value == "custom" and "scenario" not in explicit \
                    else f"{_flag(dest)} {value}"
                raise ConfigError(f"{what} conflicts with \"{key}\": {json.dumps(d[key])} in {path}; "
                                  "drop the flag or change the file")
            d[key] = value
        if "save_weights" in explicit:              # --save-weights [delta|full] sets two fields
            for key, value in (("save_weights", True), ("weights_format", args.save_weights)):
                if key in d and d[key] != value:
                    raise ConfigError(f"--save-weights {args.save_weights} conflicts with \"{key}\": "
                                      f"{json.dumps(d[key])} in {path}; drop the flag or change the file")
                d[key] = value
        if "grip_mode" in explicit:
            grip = d.get("grip") if isinstance(d.get("grip"), dict) else {}
            if args.grip_mode not in GRIP_MODES:
                raise ConfigError(f"--grip-mode: unknown mode {args.grip_mode!r}; choose from {sorted(GRIP_MODES)}")
            for k, v in GRIP_MODES[args.grip_mode].items():
                if k in grip and grip[k] != v:
                    raise ConfigError(f"--grip-mode {args.grip_mode} conflicts with \"grip\": {{\"{k}\": "
                                      f"{json.dumps(grip[k])}}} in {path}; drop the flag or change the file")
            d["grip"] = {**grip, **GRIP_MODES[args.grip_mode]}
        if "preset" in explicit:
            clash = [k for k in ("scope", "method_args") if k in d] + \
                (["preset"] if d.get("preset", args.preset) != args.preset else [])
            if clash:
                raise ConfigError(f"--preset {args.preset} conflicts with {clash} in {path}; drop one of them")
            p = make_config(d.get("method", RunConfig.method), "off", args.preset)
            d["scope"], d["method_args"], d["preset"] = dataclasses.asdict(p.scope), dict(p.method_args), args.preset
        if "data_files" in d and (args.forget_file or args.retain_file):
            raise ConfigError(f"--forget-file conflicts with \"data_files\" in {path}; drop one of them")
        try:
            config = RunConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    else:
        mode = "off" if args.grip_mode == "off" else args.grip_mode
        if mode not in GRIP_MODES:
            raise ConfigError(f"--grip-mode: unknown mode {mode!r}; choose from {sorted(GRIP_MODES)}")
        config = make_config(args.method, mode, args.preset, args.seed, _steps(args),
                             save_weights=bool(args.save_weights), weights_format=args.save_weights or "delta",
                             scenario=args.scenario, model=str(args.model), max_length=args.max_length)
    if args.forget_file or args.retain_file:
        data = _data(args, seed=config.seed, retain_eval_size=config.eval_examples)
    elif getattr(args, "holdout_file", None):
        raise ConfigError("--holdout-file needs --forget-file and --retain-file")
    else:
        data = UnlearningData.for_config(config)
    record = _data_record(data)
    config.scenario, config.data_files = record["scenario"], record["data_files"]
    return config, data


def cmd_run(args) -> int:
    from .job import run_unlearning

    config, data = run_config_from_args(args)      # all input checked before a model loads or a folder exists
    args.model = config.model
    for w in data.warnings:
        _warn(w)
    moe = load_model(args.model, **load_kwargs(args))
    bar = tqdm(total=config.steps, desc=config.display_name(), unit="step", file=sys.stderr)
    try:
        result = run_unlearning(moe, config, data, runs_dir=args.runs_dir,
                                progress=lambda row: (bar.update(1), bar.set_postfix(loss=f"{row['loss']:.3f}")))
    finally:
        bar.close()
    report = RunReport.from_dict(result.summary) if result.summary else None
    v = report.verdict() if report else None                # the one verdict (docs/method.md, Verdicts)
    headline = report.headline.to_dict() if report else {}
    print(json.dumps({"status": result.status, "reason": result.reason, "run_dir": str(result.run_dir),
                      **headline, **({"verdict": v.kind, "verdict_sentence": v.sentence} if v else {})}, indent=2))
    if report and report.headline.collapsed:
        _warn(f"the run collapsed: {report.headline.collapse_reason}")
    return 0 if result.status == "completed" else 1


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _loaded(moe) -> None:
    plan = moe.load_plan
    if plan is not None:
        print(f"loaded {plan.describe()}", file=sys.stderr)


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose

    data = UnlearningData.from_files(args.forget_file, args.retain_file, args.holdout_file, seed=args.seed)
    base = load_model(args.base, **load_kwargs(args), low_memory=True)   # one model in memory, no load transient
    _loaded(base)
    n = args.eval_examples
    step_n = RunConfig.eval_examples
    d = diagnose(base, args.unlearned, data, seed=args.seed, eval_examples=min(n, step_n) if n else step_n,
                 final_eval_examples=n, max_length=args.max_length)   # streams the unlearned tensors into `base`
    ck = d.report.checkpoint or {}
    print(f"applied {args.unlearned}: {ck.get('tensors_changed')} of {ck.get('tensors_read')} tensors differ "
          f"({ck.get('layout')} layout, {ck.get('seconds', 0):.1f} s)", file=sys.stderr)
    rows = [{"layer": a.layer, "retain_stability": a.stability_actual, "router_only": a.stability_router_only,
             "drift_only": a.stability_drift_only, "forget_shift": f.shift}
            for a, f in zip(d.report.attribution_retain.layers, d.report.routing_forget.layers)]
    print(format_table(rows, list(rows[0])))
    print(f"\nverdict: {d.verdict.upper()}\n{d.paragraph}")
    if args.out:
        atomic_write_json(Path(args.out), d.to_dict())
        print(f"wrote {args.out}")
    return 0


def cmd_trace(args) -> int:
    from ..data import read_qa_file
    from ..moe.memory import fmt_bytes
    from ..moe.stream import stream_routing

    examples = read_qa_file(args.file)
    moe = load_model(args.model, **load_kwargs(args))
    _loaded(moe)
    bar = tqdm(total=None, desc="trace", unit="tok", unit_scale=True, file=sys.stderr)
    said = []

    def progress(p):
        bar.total = p.tokens_total
        bar.n = p.tokens_done
        bar.set_postfix_str(f"{p.tokens_per_second:,.0f} tok/s")
        bar.refresh()
        if not said and p.batches_total > 1:     # measured on the first batch, before the long part
            said.append(p.eta_seconds)
            print(f"\n{p.tokens_total:,} tokens in {p.batches_total} batches; first batch {p.tokens_per_second:,.0f} "
                  f"tokens/s on {moe.load_plan.device if moe.load_plan else moe.device}: about "
                  f"{_duration(p.eta_seconds)} more (Ctrl-C stops)", file=sys.stderr)
    summary = stream_routing(moe, examples, token_budget=args.token_budget, max_length=args.max_length,
                             progress=progress)
    bar.close()
    out = {"model": moe.describe(), "num_examples": len(examples), **summary.to_dict(),
           "load": None if moe.load_plan is None else moe.load_plan.to_dict()}
    nmi = out["domain_nmi"]
    rows = [{"layer": l.index, "E": l.num_experts, "k": l.top_k,
             "busiest": int(max(range(l.num_experts), key=lambda e: out["expert_load"][i][e])),
             "max_load": max(out["expert_load"][i]), "min_load": min(out["expert_load"][i]),
             **({"domain_nmi": nmi["nmi"][i]} if nmi else {})} for i, l in enumerate(moe.layers)]
    size = "" if moe.load_plan is None else f" · {fmt_bytes(moe.load_plan.need_bytes)} {moe.load_plan.dtype}"
    print(f"{moe.family} · {len(moe.layers)} MoE layers{size} · {summary.num_tokens} tokens from {len(examples)} "
          f"examples in {summary.seconds:.1f} s ({summary.tokens_per_second:,.0f} tokens/s)")
    print(format_table(rows, list(rows[0])))
    if args.out:
        atomic_write_json(Path(args.out), out)
    return 0


def _parse_seeds(value: str | None) -> list[int] | None:
    if not value:
        return None
    seeds = []
    for item in value.split(","):
        try:
            seeds.append(int(item.strip()))
        except ValueError:
            raise ConfigError(f"--seeds {value!r}: {item.strip()!r} is not an integer "
                              "(give a comma list such as 0,1,2)") from None
    return seeds


def _study_out_dir(args) -> Path:
    return Path(args.out_dir) if args.out_dir else DEFAULT_RUNS_DIR / ("study-quick" if args.quick else "study")


def cmd_study(args) -> int:
    from .launch import LaunchConfig, slurm_settings_from
    from ..attacks import available_attacks
    from .study import FULL, QUICK, ROBUSTNESS, check_out_dir, run_study

    seeds = _parse_seeds(args.seeds)
    out_dir = _study_out_dir(args)
    check_out_dir(out_dir, args.write_committed_report)
    _check_model_source(args.model)          # before --out-dir is created
    if args.quick and args.robustness:
        raise ConfigError("--quick and --robustness are two different grids: give one")
    grid = QUICK if args.quick else ROBUSTNESS if args.robustness else FULL
    lists = {f: tuple(_split_list(getattr(args, f), "--" + f.replace("_", "-")))
             for f in ("scenarios", "regimes", "methods", "grip_modes", "attacks") if getattr(args, f)}
    unknown = [a for a in lists.get("attacks", ()) if a not in available_attacks()]
    if unknown:
        raise ConfigError(f"--attacks: unknown attack {unknown[0]!r} (known: {', '.join(available_attacks())})")
    for flag, value in (("--lrs-from", args.lrs_from), ("--compare-with", args.compare_with)):
        if value and not Path(value, "cells").is_dir():
            raise ConfigError(f"{flag} {value}: not a study folder (no cells/ in it)")
    sizes = {k: v for k, v in (("max_steps", args.steps), ("eval_examples", args.eval_examples),
                                ("final_eval_examples", args.final_eval_examples)) if v is not None}
    for k, v in sizes.items():
        if v < 1:
            raise ConfigError(f"--{'steps' if k == 'max_steps' else k.replace('_', '-')} must be >= 1, got {v}")
    grid = dataclasses.replace(grid, **lists, **sizes)
    slurm = slurm_settings_from(partition=args.slurm_partition, gpus_per_task=args.slurm_gpus_per_task,
                                cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb,
                                time_min=args.slurm_time, array_parallelism=args.slurm_array_parallelism,
                                account=args.slurm_account, qos=args.slurm_qos, constraint=args.slurm_constraint,
                                setup=tuple(args.slurm_setup) if args.slurm_setup else None)
    launch = LaunchConfig(launcher=args.launcher, workers=args.workers if args.workers > 0 else (os.cpu_count() or 1),
                          folder=Path(args.submitit_folder) if args.submitit_folder else None, slurm=slurm,
                          dry_run=args.dry_run)
    report = run_study(quick=args.quick, out_dir=out_dir, model=args.model, load=load_kwargs(args),
                       report_only=args.report_only, seeds=seeds, grid=grid, launch=launch,
                       write_committed=args.write_committed_report,
                       lrs_from=Path(args.lrs_from) if args.lrs_from else None,
                       compare_with=Path(args.compare_with) if args.compare_with else None)
    if report is None:                        # a dry run: nothing ran, no report
        return 0
    path = Path(args.report) if args.report else out_dir / "findings.md"
    atomic_write_text(path, report)
    print(f"wrote {path}")
    from .study import COMMITTED_DIR, COMMITTED_STUDIES, refresh_readme

    committed = {(COMMITTED_DIR / sub).resolve() for sub in COMMITTED_STUDIES.values()}
    if out_dir.resolve() in committed and not args.quick:  # the README states the same numbers, from the same cells
        from .._paths import REPO_ROOT

        if refresh_readme(REPO_ROOT / "README.md"):
            print(f"updated the study block of {REPO_ROOT / 'README.md'}")
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import format_diff, reproduce

    results = reproduce(Path(args.path), tolerance=args.tolerance, device=args.device)
    for name, d in results:
        print(format_diff(name, d))
    return 0 if all(not d for _, d in results) else 1

"""The CLI's commands (argument parsing is in grip_core/cli.py; the work is in grip_core.runs)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from ..cli import load_kwargs
from ..moe import load_model
from .compare import TABLE_COLUMNS, compare, compare_in_processes, format_table, make_config
from .data import UnlearningData
from .store import atomic_write_json, atomic_write_text
from .verdict import verdict


def _data(args) -> UnlearningData:
    if getattr(args, "forget_file", None):
        if not args.retain_file:
            raise ValueError("--forget-file needs --retain-file too")
        return UnlearningData.from_files(args.forget_file, args.retain_file, args.holdout_file, seed=args.seed)
    return UnlearningData.from_scenario(args.scenario, seed=args.seed)


def _write_table(stem: str, rows: list[dict]) -> None:
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stem.with_suffix(".json"), rows)
    cols = TABLE_COLUMNS + ["reason"]
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def cmd_compare(args) -> int:
    moe = load_model(args.model, **load_kwargs(args))
    data = _data(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    modes = [m.strip() for m in args.grip_modes.split(",") if m.strip()]
    bar = tqdm(total=len(methods) * len(modes), desc="compare", unit="run", file=sys.stderr)

    def on_row(row):
        bar.update(1)
        bar.set_postfix_str(f"{row['method']}/{row['grip']}: {row['status']}")
    workers = min(args.workers or os.cpu_count() or 1, len(methods) * len(modes))
    common = dict(preset=args.preset, seed=args.seed, steps=args.steps or 60, runs_dir=args.runs_dir, on_row=on_row,
                  eval_every=args.eval_every, final_eval_examples=args.final_eval_examples)
    if workers > 1:     # the model loaded above already failed early on a bad path / non-MoE model
        rows = compare_in_processes(moe, args.model, data, methods, modes, workers, **common)
    else:
        rows = compare(moe, data, methods, modes, **common)
    bar.close()
    print(format_table(rows))
    _write_table(args.out, rows)
    print(f"\nwrote {args.out}.csv and {args.out}.json; runs saved under {args.runs_dir or 'runs/'}")
    return 0


def cmd_run(args) -> int:
    from .config import RunConfig
    from .job import run_unlearning

    moe = load_model(args.model, **load_kwargs(args))
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            config = RunConfig.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    else:
        mode = "off" if args.grip_mode == "off" else args.grip_mode
        config = make_config(args.method, mode, args.preset, args.seed, args.steps or 60,
                             save_weights=bool(args.save_weights), weights_format=args.save_weights or "delta",
                             scenario=args.scenario)
    bar = tqdm(total=config.steps, desc=config.display_name(), unit="step", file=sys.stderr)
    result = run_unlearning(moe, config, _data(args), runs_dir=args.runs_dir,
                            progress=lambda row: (bar.update(1), bar.set_postfix(loss=f"{row['loss']:.3f}")))
    bar.close()
    headline = result.summary.get("headline", {})
    v = verdict(headline) if headline else None             # the one verdict (docs/method.md, Verdicts)
    print(json.dumps({"status": result.status, "reason": result.reason, "run_dir": str(result.run_dir),
                      **headline, **({"verdict": v.kind, "verdict_sentence": v.sentence} if v else {})}, indent=2))
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
    base = load_model(args.base, **load_kwargs(args))
    _loaded(base)
    n = args.eval_examples
    d = diagnose(base, args.unlearned, data, seed=args.seed, eval_examples=min(n, 64) if n else 64,
                 final_eval_examples=n)                            # streams the unlearned tensors into `base`
    ck = d.report.get("checkpoint", {})
    print(f"applied {args.unlearned}: {ck.get('tensors_changed')} of {ck.get('tensors_read')} tensors differ "
          f"({ck.get('layout')} layout, {ck.get('seconds', 0):.1f} s)", file=sys.stderr)
    rows = [{"layer": a["layer"], "retain_stability": a["stability_actual"],
             "router_only": a["stability_router_only"], "drift_only": a["stability_drift_only"],
             "forget_shift": f["shift"]}
            for a, f in zip(d.report["attribution_retain"]["layers"], d.report["routing_forget"]["layers"])]
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


def cmd_study(args) -> int:
    from .study import run_study

    report = run_study(quick=args.quick, out_dir=Path(args.out_dir), model=args.model, workers=args.workers,
                       load=load_kwargs(args),
                       report_only=args.report_only,
                       seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None)
    path = Path(args.report) if args.report else Path(args.out_dir) / "findings.md"
    atomic_write_text(path, report)
    print(f"wrote {path}")
    return 0

"""The CLI's commands (argument parsing is in grip_core/cli.py; the work is in grip_core.runs)."""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

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
    moe = load_model(args.model)
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

    moe = load_model(args.model)
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
                             save_weights=args.save_weights, scenario=args.scenario)
    bar = tqdm(total=config.steps, desc=config.display_name(), unit="step", file=sys.stderr)
    result = run_unlearning(moe, config, _data(args), runs_dir=args.runs_dir,
                            progress=lambda row: (bar.update(1), bar.set_postfix(loss=f"{row['loss']:.3f}")))
    bar.close()
    headline = result.summary.get("headline", {})
    v = verdict(headline) if headline else None             # the one verdict (docs/method.md, Verdicts)
    print(json.dumps({"status": result.status, "reason": result.reason, "run_dir": str(result.run_dir),
                      **headline, **({"verdict": v.kind, "verdict_sentence": v.sentence} if v else {})}, indent=2))
    return 0 if result.status == "completed" else 1


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose

    base, unlearned = load_model(args.base), load_model(args.unlearned)
    data = UnlearningData.from_files(args.forget_file, args.retain_file, args.holdout_file, seed=args.seed)
    d = diagnose(base, unlearned, data, seed=args.seed)
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
    from ..data import encode_qa, read_qa_file
    from ..metrics import domain_expert_nmi

    moe = load_model(args.model)
    examples = read_qa_file(args.file)
    texts = [ex.text if ex.is_text_only else None for ex in examples]
    if all(t is not None for t in texts):
        trace = moe.trace(texts)
    else:
        trace = moe.trace([encode_qa(moe.tokenizer, examples[i:i + 64]) for i in range(0, len(examples), 64)])
    domains = [ex.domain for ex in examples]
    nmi = domain_expert_nmi(trace, domains).to_dict() if len(set(domains)) > 1 else None
    summary = {"model": moe.describe(), "num_examples": len(examples), "num_tokens": trace.num_tokens,
               "expert_load": [trace.expert_load(l).tolist() for l in range(trace.num_layers)], "domain_nmi": nmi}
    rows = [{"layer": l.index, "E": l.num_experts, "k": l.top_k,
             "busiest": int(max(range(l.num_experts), key=lambda e: summary["expert_load"][i][e])),
             "max_load": max(summary["expert_load"][i]), "min_load": min(summary["expert_load"][i]),
             **({"domain_nmi": nmi["nmi"][i]} if nmi else {})} for i, l in enumerate(moe.layers)]
    print(f"{moe.family} · {len(moe.layers)} MoE layers · {trace.num_tokens} tokens from {len(examples)} examples")
    print(format_table(rows, list(rows[0])))
    if args.out:
        atomic_write_json(Path(args.out), summary)
    return 0


def cmd_study(args) -> int:
    from .study import run_study

    report = run_study(quick=args.quick, out_dir=Path(args.out_dir), model=args.model, workers=args.workers,
                       report_only=args.report_only,
                       seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None)
    path = Path(args.report) if args.report else Path(args.out_dir) / "findings.md"
    atomic_write_text(path, report)
    print(f"wrote {path}")
    return 0

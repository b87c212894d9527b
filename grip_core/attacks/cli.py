"""`python -m grip_core attack --base demo --run RUN_DIR`: the robustness rows and update ledger of a saved run.

The run must have kept its weights (`run --save-weights`, or RunConfig.save_weights): RUN_DIR/model/
is a delta or a full native checkpoint of the base named by --base. Writes RUN_DIR/robustness.json
and RUN_DIR/ledger.json and prints the rows.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from ..fmt import pct
from ..moe.errors import ConfigError
from .base import AttackConfig, available_attacks


def add_attack_parser(sub, add_load_args) -> None:
    """The `attack` subcommand's flags (called by grip_core.cli.build_parser)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "attack", help="did it really forget? restoration, expert forcing, relearning, quantization and "
                       "paraphrase attacks on a saved run, plus where its update landed")
    p.add_argument("--base", default="demo", help="the base model the run unlearned: demo or a checkpoint directory")
    p.add_argument("--run", required=True, help="a run folder with saved weights (run --save-weights)")
    p.add_argument("--attacks", default=",".join(available_attacks()),
                   help=f"comma list (default: all): {', '.join(available_attacks())}")
    d = AttackConfig()
    p.add_argument("--eval-examples", type=int, default=d.eval_examples,
                   help="forget examples probed, after the relearning slice is set aside (0 = all)")
    p.add_argument("--force-n", type=int, default=d.force_n, help="expert forcing: experts per token (0 = top-k)")
    p.add_argument("--relearn-steps", type=int, default=d.relearn_steps, help="steps of each relearning attack")
    p.add_argument("--relearn-fraction", type=float, default=d.relearn_fraction,
                   help="share of the forget set relearned on (the rest is evaluated)")
    p.add_argument("--quant-scope", default=d.quant_scope, choices=["experts", "linear"],
                   help="experts: expert weights only; linear: every decoder weight matrix")
    p.add_argument("--no-base", action="store_true", help="skip the attacks on the base model (faster; no base_em)")
    p.add_argument("--seed", type=int, default=d.seed)
    add_load_args(p)


def cmd_attack(args) -> int:
    from ..cli import load_kwargs
    from ..moe import MoEModel, load_model
    from ..moe.delta import apply_checkpoint, check_same_architecture
    from ..runs import RunConfig, UnlearningData, load_run
    from .ledger import ledger_from_checkpoint, save_ledger
    from .robustness import robustness, save_robustness

    names = [n.strip() for n in args.attacks.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_attacks()]
    if unknown or not names:
        raise ConfigError(f"--attacks {args.attacks!r}: unknown {', '.join(unknown) or 'empty list'}; "
                          f"available: {', '.join(available_attacks())}")
    config = AttackConfig(eval_examples=args.eval_examples, force_n=args.force_n, relearn_steps=args.relearn_steps,
                          relearn_fraction=args.relearn_fraction, quant_scope=args.quant_scope,
                          on_base=not args.no_base, seed=args.seed)
    run = load_run(args.run)
    weights = Path(args.run) / "model"
    if not weights.is_dir():
        raise ConfigError(f"--run {args.run}: the run kept no weights (no model/ folder); rerun it with --save-weights")
    data = UnlearningData.for_config(RunConfig.from_dict(run.config))
    base = load_model(args.base, **load_kwargs(args))
    check_same_architecture(base, weights)
    print(f"ledger of {weights} ...", file=sys.stderr)
    ledger = ledger_from_checkpoint(base, weights)                  # streamed: base is only read
    unlearned = MoEModel(copy.deepcopy(base.model), base.tokenizer, name=str(weights))
    apply_checkpoint(unlearned, weights)
    rows = robustness(base, unlearned, base.tokenizer, data.forget, related=data.holdout, attacks=names,
                      config=config, progress=lambda n: print(f"attack: {n} ...", file=sys.stderr))
    out = save_robustness(args.run, rows)
    save_ledger(args.run, ledger)
    if run.report is not None:            # the run report carries them too (Compare and the HTML export read it)
        from ..runs.store import atomic_write_json
        run.report.robustness, run.report.ledger = rows, ledger
        atomic_write_json(Path(args.run) / "summary.json", run.report.to_dict())
    print(format_rows(rows))
    print(f"wrote {out} and {Path(args.run) / 'ledger.json'}")
    return 0


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of robustness rows (percentages by grip_core.fmt.pct)."""
    head = ("attack", "setting", "base EM", "unlearned EM", "attacked EM", "recovered", "routing shift", "n")
    body = [(r["attack"], r["setting"], pct(r["base_em"], missing="—"), pct(r["unlearned_em"], missing="—"),
             pct(r["attacked_em"], missing="—"), pct(r["recovered"], missing="—"),
             pct(r["routing_shift"], missing="—"), str(r["n"])) for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])

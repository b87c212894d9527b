"""`python -m grip_core <command>`: argument parsing only; the work lives in grip_core.runs."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .grip.config import mode_help
from .moe.errors import GripStudioError


def _add_load_args(p: argparse.ArgumentParser) -> None:
    """--device / --dtype / --device-map / --offload-folder: how every model of the command is loaded."""
    g = p.add_argument_group("loading (memory is estimated before any weight is read)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="auto (bfloat16 on CUDA; float32 on CPU when it fits, else bfloat16), float32, bfloat16, float16")
    g.add_argument("--device-map", default=None,
                   help="auto / balanced / sequential: accelerate's big-model loading over GPUs, CPU and disk")
    g.add_argument("--offload-folder", default=None, help="with --device-map: where weights that fit nowhere go")
    g.add_argument("--max-memory", type=float, default=None, metavar="GB",
                   help="use at most this many GB on the device (a shared machine); with --device-map, the rest "
                        "is offloaded")


def load_kwargs(args) -> dict:
    """The load_model keyword arguments the loading flags ask for."""
    if args.max_memory is not None and args.max_memory <= 0:
        raise ValueError(f"--max-memory {args.max_memory}: give a positive number of GB")
    return {"device": args.device, "dtype": args.dtype, "device_map": args.device_map,
            "offload_folder": args.offload_folder,
            "max_memory": None if args.max_memory is None else int(args.max_memory * 1e9)}


def _defaults():
    """RunConfig() and the default preset: the one source of every run default the flags show."""
    from .runs.config import RunConfig
    from .runs.presets import DEFAULT_PRESET

    return RunConfig(), DEFAULT_PRESET


def _add_common(p: argparse.ArgumentParser, scenario: bool = True) -> None:
    d, _ = _defaults()
    p.add_argument("--model", default=d.model, help='"demo", "demo-fine" or a local checkpoint directory')
    _add_load_args(p)
    if scenario:
        p.add_argument("--scenario", default=d.scenario, choices=["domain", "entities"])
        p.add_argument("--forget-file", help="forget set (JSONL/CSV/TOFU JSON); overrides --scenario")
        p.add_argument("--retain-file", help="retain set (with --forget-file)")
        p.add_argument("--holdout-file", help="optional holdout set for the membership AUC")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens kept per example in training, probes, traces and attacks")
    p.add_argument("--runs-dir", default=None, help="where runs are saved (default: runs/)")


def build_parser() -> argparse.ArgumentParser:
    # `grip-studio` is the console script pyproject.toml installs; `python -m grip_core` the same CLI
    prog = "grip-studio" if Path(sys.argv[0]).name == "grip-studio" else "python -m grip_core"
    parser = argparse.ArgumentParser(prog=prog, description="GRIP Studio: unlearning for MoE "
                                     "models, with router constraints and forgot-or-rerouted diagnostics.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (or GRIP_STUDIO_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    d, default_preset = _defaults()
    from .runs.diagnose import DIAGNOSE_EXAMPLES

    p = sub.add_parser("compare", help="methods x GRIP modes on one model + scenario; prints a table")
    _add_common(p)
    p.add_argument("--methods", default="ga,graddiff,npo,simnpo,rmu")
    p.add_argument("--grip-modes", default="off,update", help="comma list of GRIP modes (" + mode_help() + ")")
    p.add_argument("--preset", default=default_preset, help="learning-rate / scope preset (see grip_core.runs.presets)")
    p.add_argument("--steps", type=int, default=None, help="unlearning steps (default: RunConfig's; 0 = none)")
    p.add_argument("--out", default=None, help="output stem: writes OUT.csv and OUT.json "
                   "(default: RUNS_DIR/compare-<time>, beside the runs)")
    p.add_argument("--workers", type=int, default=0,
                   help="parallel processes, one torch thread each (0: one per core; 1: in this process)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="steps between stability / EM checks logged per run (0: only the final evaluation)")
    p.add_argument("--final-eval-examples", type=int, default=d.final_eval_examples,
                   help=f"examples per split in the final probes (default: RunConfig's, {d.final_eval_examples}; "
                        "the study uses 200; 0 = all)")
    p.add_argument("--log-every", type=int, default=10,
                   help="print each run's phase changes to stderr, and its loss every N training steps (0: no step lines)")

    p = sub.add_parser("run", help="one unlearning job from a JSON RunConfig (or flags)")
    _add_common(p)
    p.add_argument("--config", help="RunConfig JSON file")
    p.add_argument("--method", default=d.method)
    p.add_argument("--grip-mode", default=d.grip.mode, help="GRIP mode (" + mode_help() + ")")
    p.add_argument("--preset", default=default_preset)
    p.add_argument("--steps", type=int, default=None, help="unlearning steps (default: RunConfig's; 0 = none)")
    p.add_argument("--save-weights", nargs="?", const="delta", choices=["delta", "full"], default=None,
                   help="keep the unlearned weights in the run folder: delta (default: only changed tensors) or full")

    p = sub.add_parser("diagnose", help='base + unlearned checkpoints: "forgot or rerouted?"')
    p.add_argument("--base", required=True, help="base checkpoint directory (or demo)")
    p.add_argument("--unlearned", required=True,
                   help="unlearned checkpoint directory (full or a run's weight delta); streamed into the base model")
    _add_load_args(p)
    p.add_argument("--forget-file", required=True)
    p.add_argument("--retain-file", required=True)
    p.add_argument("--holdout-file")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-examples", type=int, default=DIAGNOSE_EXAMPLES,
                   help="examples per split in the probes (0 = all; generation is the cost at real width)")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="tokens kept per example in the probes, traces and the restoration attack")
    p.add_argument("--out", help="write the report as JSON here")

    p = sub.add_parser("trace", help="routing summary of a model on a file")
    p.add_argument("--model", default="demo")
    p.add_argument("--file", required=True, help="JSONL/CSV/TOFU JSON (question/answer or text)")
    p.add_argument("--out", help="write the summary as JSON here")
    p.add_argument("--token-budget", type=int, default=8192, help="padded tokens per forward batch")
    p.add_argument("--max-length", type=int, default=128, help="tokens kept per text")
    _add_load_args(p)

    p = sub.add_parser("study", help="the grid study (resumable, one task per cell), writing a markdown report")
    p.add_argument("--quick", action="store_true", help="one seed, fewer cells (<= 10 min on 2 cores)")
    p.add_argument("--out-dir", default=None,
                   help="cells + report go here (default runs/study, runs/study-quick with --quick)")
    p.add_argument("--write-committed-report", action="store_true",
                   help="allow an --out-dir under docs/ (the committed study, docs/study)")
    p.add_argument("--report", default=None, help="markdown report path (default OUT_DIR/findings.md)")
    p.add_argument("--seeds", default=None, help="comma list of seeds (overrides the grid's)")
    p.add_argument("--scenarios", default=None, help="comma list (overrides the grid's)")
    p.add_argument("--regimes", default=None, help="comma list of presets (overrides the grid's)")
    p.add_argument("--methods", default=None, help="comma list (overrides the grid's)")
    p.add_argument("--grip-modes", default=None, help="comma list (overrides the grid's)")
    p.add_argument("--robustness", action="store_true",
                   help="the robustness grid: domain + entities x shortcut + full x GradDiff, NPO, SimNPO x every "
                        "GRIP mode x 3 seeds, each cell attacked by every attack (suggested --out-dir: "
                        "OUT/robustness --lrs-from OUT)")
    p.add_argument("--attacks", default=None,
                   help="comma list of robustness attacks run on every cell (overrides the grid's; "
                        "see `python -m grip_core attack --help`)")
    p.add_argument("--lrs-from", default=None,
                   help="another study folder whose learning-rate records to reuse (instead of calibrating again)")
    p.add_argument("--compare-with", default=None,
                   help="another study folder (another model, same grid): the report shows both side by side")
    p.add_argument("--steps", type=int, default=None, help="max steps per run (overrides the grid's 200)")
    p.add_argument("--eval-examples", type=int, default=None, help="per-step probe examples (grid: 64)")
    p.add_argument("--final-eval-examples", type=int, default=None, help="final probe examples (grid: 200)")
    p.add_argument("--launcher", default="pool", choices=["pool", "local", "slurm"],
                   help="pool: this machine's processes; local: submitit's local executor; slurm: submitit job arrays")
    p.add_argument("--workers", type=int, default=0,
                   help="pool / local: cells at once, one torch thread each (0: one per core)")
    p.add_argument("--submitit-folder", default=None, help="submitit logs and pickles (default OUT_DIR/submitit; "
                   "on a cluster: a shared file system)")
    p.add_argument("--dry-run", action="store_true", help="--launcher slurm: print the sbatch script, submit nothing")
    g = p.add_argument_group("Slurm (--launcher slurm)")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-gpus-per-task", type=int, default=None)
    g.add_argument("--slurm-cpus-per-task", type=int, default=None)
    g.add_argument("--slurm-mem-gb", type=float, default=None)
    g.add_argument("--slurm-time", type=int, default=None, help="minutes per task (default 60)")
    g.add_argument("--slurm-array-parallelism", type=int, default=None, help="tasks running at once (default 64)")
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--slurm-qos", default=None)
    g.add_argument("--slurm-constraint", default=None)
    g.add_argument("--slurm-setup", action="append", default=None,
                   help="a shell line run before each task (repeatable), e.g. 'source .venv/bin/activate'")
    p.add_argument("--model", default="demo")
    _add_load_args(p)
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from saved cells")

    p = sub.add_parser("reproduce", help="re-run a study cell, a run folder or a study folder and diff the numbers")
    p.add_argument("path", help="a cell (cells/<name>--<id>.json), a run folder (config.json) or a study folder")
    p.add_argument("--tolerance", type=float, default=0.0, help="numbers closer than this count as equal")
    p.add_argument("--device", default=None, help="re-run study cells here (cpu, cuda, cuda:N; default: where each "
                   "cell ran, or the CPU for a GPU cell on a machine without one)")
    from .attacks.cli import add_attack_parser
    add_attack_parser(sub, _add_load_args)
    return parser


def explicit_flags(argv: list[str] | None) -> set[str]:
    """The dests of the options given on the command line (not left at their defaults)."""
    parser = build_parser()

    def suppress(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sp in action.choices.values():
                    suppress(sp)
            elif action.dest not in ("help", "command"):
                action.default = argparse.SUPPRESS
    suppress(parser)
    return set(vars(parser.parse_args(argv))) - {"command"}


def _close_progress_bars() -> None:
    """Close any open tqdm bar, so an error line starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:     # pragma: no cover
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - closing is best effort
            pass


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return msg.strip("'\"") if isinstance(exc, KeyError) else msg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GRIP_STUDIO_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.explicit = explicit_flags(argv)
    try:
        from .runs import commands

        commands.check_outputs(args)
        if args.command == "attack":
            from .attacks.cli import cmd_attack
            return cmd_attack(args) or 0
        return getattr(commands, f"cmd_{args.command}")(args) or 0
    except KeyboardInterrupt:
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    except (GripStudioError, FileNotFoundError, ValueError, OSError) as exc:
        _close_progress_bars()
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        _close_progress_bars()
        if debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug in GRIP Studio; rerun with "
              "--debug or GRIP_STUDIO_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

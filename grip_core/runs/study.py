"""The study: where does the router shortcut appear on the demo, and what does GRIP do about it?

Grid: scenario x regime (scope + learning rates) x method x GRIP mode x seed. Each cell is one
`run_unlearning` job, run as one task by a launcher (grip_core.runs.launch: this process / a
process pool, submitit's local executor, or a Slurm job array) and saved as
`cells/<readable name>--<id>.json`. The id is a hash of everything that decides the cell's
numbers (`cell_key`): the model's and the data's content fingerprints, the full RunConfig
(method, scope and learning rate, the whole GRIPConfig, steps, evaluation sizes, seed, ...), the
model dtype and STUDY_CODE_VERSION. Resuming skips cells whose id exists, so a changed setting
makes new cells and never mixes with old ones. Each cell also keeps its spec, its key and a
manifest (grip_core.runs.manifest: git commit, versions, device, machine, wall time), so it can
be traced and re-run (`python -m grip_core reproduce <cell>`).

The learning rate of each (scenario, regime, method) is chosen by a fixed rule, never by looking
at GRIP: the smallest rate of the grid's `lr_ladder` at which VANILLA unlearning (first seed)
brings forget EM below `FORGET_TARGET` within `max_steps` (`calibrate_task`, run before the other
cells). A regime that trains the same parameters as an earlier one on this model is run once and
reported under both names (`regime_aliases`). The report (`study_report`) and the Findings page
are built from the cells; each (method, GRIP mode) row gets the one verdict
(grip_core.runs.verdict, docs/method.md "Verdicts") of its mean over seeds.

A grid with `attacks` (the ROBUSTNESS grid, `study --robustness`) also runs those robustness attacks
(grip_core.attacks) on each cell's unlearned model, in the same task, and saves their rows and the update
ledger's shares in the cell. Such a cell has its own id (its key adds the attacks and their settings),
but its unlearning run is the plain cell's: `attacked_vs_plain` checks the two agree, and `--lrs-from`
adopts the plain study's learning-rate records instead of calibrating again. `--compare-with` puts
another model's study beside this one in the report (`side_by_side`).

Footguns:
- `--seeds 1,2` runs a subset of the grid's seeds but still calibrates on the grid's first seed
  (`StudyGrid.calibration_seed`), so machines that split the seeds share one learning rate per group.
- Bump STUDY_CODE_VERSION in any change that alters a cell's numbers (a metric, the job loop, GRIP):
  the id does not see code, and the git commit (in the manifest) would change every id on every commit.
- The id hashes every RunConfig / GRIPConfig field, so adding a config field changes every id: the
  committed cells then no longer match (tests/test_study.py checks they do). If the new field's default
  reproduces the old behaviour, list it in `_ADDED_OFF` (left out of the key at that value); otherwise
  re-key the cells with `rekey_cells`.
- The device is not part of the id (the dtype is: `run_study` resolves "auto" once, where it runs, and
  every task loads that dtype): a float32 cell made on a GPU shares its id with the CPU one and differs
  only by rounding; its manifest records the device.
- Every cell runs with ONE torch thread (so its numbers do not depend on the core count of the machine
  that ran it; one thread vs many can change float sums in the last bits).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .._paths import DEFAULT_RUNS_DIR, DEMO_MODELS, REPO_ROOT
from ..fmt import mean_sd, pct
from ..moe import load_model
from ..moe.errors import ConfigError
from ..scope import classify_parameters, scope_parameter_names
from . import manifest
from .compare import make_config, result_row
from .data import UnlearningData
from .evaluate import Baseline
from .job import run_unlearning
from .launch import LaunchConfig, map_tasks
from .presets import get_preset
from .store import atomic_write_json
from .verdict import FORGET_TARGET, STABLE_RETAIN, verdict

STUDY_CODE_VERSION = 1            # bump when a code change alters any cell's numbers (see Footguns)
MAX_STEPS = 200
LR_LADDER = (1e-4, 3e-4, 1e-3)
CLAIM_STABILITY = STABLE_RETAIN   # the paper's bar (the verdict's, grip_core.runs.verdict)
COMMITTED_DIR = REPO_ROOT / "docs"  # a study writing under here needs write_committed=True


@dataclass(frozen=True)
class StudyGrid:
    scenarios: tuple[str, ...]            # demo scenarios ("domain", "entities")
    regimes: tuple[str, ...]              # preset names (grip_core.runs.presets)
    methods: tuple[str, ...]              # method names (grip_core.methods)
    grip_modes: tuple[str, ...]           # GRIP mode names (grip_core.runs.compare.GRIP_MODES)
    seeds: tuple[int, ...]                # seeds of every cell (calibration: see calibration_seed)
    eval_examples: int = 64               # examples per split in the per-step probes (and the retain-eval slice)
    final_eval_examples: int = 200        # examples per split in the final probes
    max_steps: int = MAX_STEPS            # a run stops here if forget EM never fell below FORGET_TARGET
    lr_ladder: tuple[float, ...] = LR_LADDER
    eval_every: int = 10                  # forget EM is checked (and a run may stop) every N steps
    attacks: tuple[str, ...] = ()         # robustness attacks run on each cell's unlearned model (grip_core.attacks);
                                          # () = none. Attacked cells are their own cells (own ids; see cell_key)
    attack_eval_examples: int = 200       # forget examples each attack is judged on (after the relearning slice)
    calibration_seed: int | None = None   # the seed whose vanilla runs choose the learning rates (None: seeds[0]);
                                          # `run_study(seeds=...)` keeps the grid's, so a split of seeds shares it

    @property
    def calibrating_seed(self) -> int:
        return self.seeds[0] if self.calibration_seed is None else self.calibration_seed

    @property
    def size(self) -> int:
        return len(self.scenarios) * len(self.regimes) * len(self.methods) * len(self.grip_modes) * len(self.seeds)


FULL = StudyGrid(("domain", "entities"), ("shortcut", "full", "experts+routers"),
                 ("ga", "graddiff", "npo", "simnpo", "rmu"), ("off", "update", "drift", "anchor"), (0, 1, 2))
# The robustness study (issue "did it really forget?"): every attack on the key cells, 3 seeds.
ROBUSTNESS = StudyGrid(("domain", "entities"), ("shortcut", "full"), ("graddiff", "npo", "simnpo"),
                       ("off", "update", "drift"), (0, 1, 2),
                       attacks=("restoration", "expert_forcing", "relearn_router", "relearn_full", "relearn_related",
                                "quant_int8", "quant_nf4", "quant_int4", "paraphrase"))
QUICK = StudyGrid(("domain",), ("shortcut", "full"), ("graddiff",), ("off", "update", "drift"), (0,),
                  eval_examples=48, final_eval_examples=120)


# ----------------------------------------------------------------------------------- cell identity

def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_WEIGHT_FILES = re.compile(r".*\.(safetensors|bin|json|model)$")
_DOC_FILES = {"training_log.json"}


@functools.lru_cache(maxsize=None)
def model_fingerprint(source: str) -> str:
    """sha256 of a model's weights, config and tokenizer files ("demo" / "demo-fine" = a shipped demo;
    "tiny:..." = its name: built from code). A delta folder's fingerprint includes its base's."""
    if source.startswith("tiny:"):
        return _sha({"tiny": source})
    path = DEMO_MODELS.get(source) or Path(source)
    if not path.is_dir():
        raise ConfigError(f"model {source!r}: not a checkpoint directory, cannot fingerprint it")
    files = {p.name: _file_sha(p) for p in sorted(path.iterdir())
             if p.is_file() and _WEIGHT_FILES.match(p.name) and p.name not in _DOC_FILES}
    from ..moe.delta import is_delta_dir, read_delta_manifest

    if is_delta_dir(path):
        files["base"] = model_fingerprint(str(read_delta_manifest(path)["base"]))
    return _sha(files)


@functools.lru_cache(maxsize=None)
def data_fingerprint(scenario: str, seed: int, retain_eval_size: int) -> str:
    """sha256 of every split of a demo scenario's UnlearningData (the retain/eval split depends on the seed)."""
    data = UnlearningData.from_scenario(scenario, seed=seed, retain_eval_size=retain_eval_size)
    return _sha({k: [dataclasses.asdict(e) for e in v] for k, v in data.splits().items()} |
                {"retain_train": [dataclasses.asdict(e) for e in data.retain_train]})


def cell_spec(grid: StudyGrid, scenario: str, regime: str, method: str, mode: str, seed: int, lr: float | None,
              model: str = "demo", load: dict | None = None) -> dict:
    """A cell as a small JSON object: all a task needs (the model goes as its path, never as an object)."""
    spec = {"scenario": scenario, "regime": regime, "method": method, "grip": mode, "seed": seed, "lr": lr,
            "max_steps": grid.max_steps, "eval_every": grid.eval_every, "eval_examples": grid.eval_examples,
            "final_eval_examples": grid.final_eval_examples, "forget_target": FORGET_TARGET,
            "model": model, "load": dict(load or {})}
    if grid.attacks:                      # only then: the ids of cells without attacks never change
        spec["attacks"] = list(grid.attacks)
        spec["attack_config"] = attack_settings(grid, seed)
    return spec


def attack_settings(grid: StudyGrid, seed: int) -> dict:
    """The AttackConfig of a cell's attacks, as a dict: the library's defaults, judged on the grid's
    `attack_eval_examples`, relearning slice drawn with the cell's seed, no attack on the base model
    (every cell's `recovered` needs only the base's plain EM, which is measured anyway)."""
    from ..attacks import AttackConfig

    return dataclasses.asdict(AttackConfig(eval_examples=grid.attack_eval_examples, seed=seed, on_base=False))


def _without_attacks(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k not in ("attacks", "attack_config")}


def cell_config(spec: dict):
    """The RunConfig of a cell spec."""
    config = make_config(spec["method"], spec["grip"], spec["regime"], spec["seed"], spec["max_steps"],
                         scenario=spec["scenario"], eval_every=spec["eval_every"],
                         stop_at_forget_em=spec["forget_target"], eval_examples=spec["eval_examples"],
                         final_eval_examples=spec["final_eval_examples"], model=spec["model"])
    config.scope = dataclasses.replace(config.scope, lr=spec["lr"] if spec["lr"] is not None else LR_LADDER[0])
    return config


_NOT_NUMBERS = ("label", "preset", "model", "save_weights", "weights_format", "data_files")  # for the record only
# ("preset" names the regime; the scope and method_args it set are hashed)
# Config fields added after cells were made, at the value that reproduces the code before them: left out of the
# key at that value (so those cells keep their ids), hashed at any other value.
_ADDED_OFF = {("grip", "input_anchor"): 0.0, ("grip", "input_anchor_layers"): 0}


def cell_key(spec: dict) -> dict:
    """Everything that decides a cell's numbers (hashed into its id)."""
    config = cell_config(spec).to_dict()
    for k in _NOT_NUMBERS:
        config.pop(k, None)
    if spec["lr"] is None:
        config["scope"].pop("lr")
    for (section, name), off in _ADDED_OFF.items():
        if config[section].get(name) == off:
            config[section].pop(name)
    key = {"code_version": STUDY_CODE_VERSION, "model": model_fingerprint(spec["model"]),
           "dtype": spec["load"].get("dtype"),
           "data": data_fingerprint(spec["scenario"], spec["seed"], spec["eval_examples"]), "config": config}
    if spec.get("attacks"):
        key["attacks"] = {"names": list(spec["attacks"]), "config": spec["attack_config"]}
    return key


def cell_id(spec: dict) -> str:
    return _sha(cell_key(spec))[:16]


def cell_name(spec: dict) -> str:
    lr = "" if spec["lr"] is None else f"__lr{spec['lr']:g}"
    return "__".join(str(spec[k]) for k in ("scenario", "regime", "method", "grip")).replace("/", "-") + \
        f"__s{spec['seed']}{lr}" + ("__attacked" if spec.get("attacks") else "")


def calibration_key(spec: dict, ladder: tuple[float, ...]) -> dict:
    """What decides a (scenario, regime, method)'s calibrated learning rate: its first-seed vanilla key, no lr."""
    return {**cell_key({**_without_attacks(spec), "grip": "off", "lr": None}), "lr_ladder": list(ladder),
            "forget_target": spec["forget_target"]}


def _lr_path(cells_dir: Path, spec: dict, ladder) -> Path:
    name = "__".join(str(spec[k]) for k in ("scenario", "regime", "method")).replace("/", "-")
    return cells_dir / f"lr__{name}--{_sha(calibration_key(spec, ladder))[:16]}.json"


def cell_index(cells_dir: Path) -> dict[str, Path]:
    """{id: path} of the cells saved under cells_dir."""
    out = {}
    for p in Path(cells_dir).glob("*--*.json"):
        if not p.name.startswith("lr__"):
            out[p.stem.rsplit("--", 1)[1]] = p
    return out


# ----------------------------------------------------------------------------------- tasks

_MODELS: dict = {}
_BASELINES: dict = {}


def _load_cached(model: str, load: dict | None = None):
    """One model per (source, load settings) per process."""
    key = (model, tuple(sorted((load or {}).items())))
    if key not in _MODELS:
        _MODELS[key] = load_model(model, **(load or {}))
    return _MODELS[key]


def _dtype_name(moe) -> str:
    return str(next(moe.model.parameters()).dtype).replace("torch.", "")


def _setup(moe, spec: dict):
    """The cell's data and Baseline (shared by the cells of one process with the same data and eval sizes)."""
    key = (spec["model"], tuple(sorted(spec["load"].items())), spec["scenario"], spec["seed"], spec["eval_examples"],
           spec["final_eval_examples"])
    if key not in _BASELINES:
        data = UnlearningData.from_scenario(spec["scenario"], seed=spec["seed"], retain_eval_size=spec["eval_examples"])
        _BASELINES[key] = (data, Baseline.compute(moe, data, cell_config({**spec, "grip": "off"})))
    return _BASELINES[key]


def run_cell(spec: dict, runs_dir: Path | str | None) -> dict:
    """Run one cell (no file written): its numbers, spec, key and manifest. One torch thread."""
    torch.set_num_threads(1)
    moe = _load_cached(spec["model"], spec["load"])
    data, baseline = _setup(moe, spec)
    started = time.time()
    t0 = time.perf_counter()
    config = cell_config(spec)
    result = run_unlearning(moe, config, data, baseline=baseline, runs_dir=runs_dir)
    seconds = time.perf_counter() - t0
    row = result_row(spec["method"], spec["grip"], result)
    if spec.get("attacks"):
        row.update(_attack_cell(moe, data, result, spec))
    reached = next((r["step"] for r in result.step_log if r.get("forget_em", 1.0) < spec["forget_target"]), None)
    device, dtype = str(next(moe.model.parameters()).device), _dtype_name(moe)
    if result.run_dir:
        manifest.update_manifest(result.run_dir, device=device, dtype=dtype)
    key = cell_key(spec)
    return {"id": _sha(key)[:16], "name": cell_name(spec), **row,
            **{k: spec[k] for k in ("scenario", "regime", "seed", "lr")}, "steps_to_forget": reached,
            "seconds": seconds, "spec": spec, "key": key,
            "manifest": {**manifest.environment(device, dtype), "seed": config.seed, "grip_seed": config.grip.seed,
                         "effective_batch": config.batch_size, "started": started, "finished": time.time(),
                         "wall_seconds": seconds}}


def _attack_cell(moe, data, result, spec: dict) -> dict:
    """{"robustness": rows, "ledger": share by group, "attack_seconds"}: the cell's attacks on its unlearned model
    (grip_core.attacks.robustness; judged on the forget set minus the relearning slice, related = holdout)."""
    from ..attacks import AttackConfig, ledger_summary, robustness

    t0 = time.perf_counter()
    rows = robustness(moe, result.unlearned, None, data.forget, related=data.holdout, attacks=spec["attacks"],
                      config=AttackConfig(**spec["attack_config"]))
    ledger = result.summary.get("ledger")
    return {"robustness": rows, "ledger": ledger_summary(ledger) if ledger else None,
            "attack_seconds": time.perf_counter() - t0}


def cell_task(spec: dict, out_dir: str) -> dict:
    """A launcher task: the cell of `spec`, from its file if it exists, else run and saved under out_dir/cells."""
    out = Path(out_dir)
    cid = cell_id(spec)
    path = out / "cells" / f"{cell_name(spec)}--{cid}.json"
    if path.exists():
        return json.loads(path.read_text())
    cell = run_cell(spec, out / "runs")
    if cell.get("run_dir"):
        cell["run_dir"] = os.path.relpath(cell["run_dir"], out)
    atomic_write_json(path, cell)
    return cell


def calibrate_task(spec: dict, ladder: list[float], out_dir: str) -> float:
    """A launcher task: the fixed learning-rate rule for the group of `spec` (its first seed, vanilla).

    Runs vanilla cells at each rate of the ladder (each saved as a cell) until forget EM < the target;
    the rate chosen (else the largest) is saved as the group's lr record."""
    spec = {**spec, "grip": "off"}
    path = _lr_path(Path(out_dir) / "cells", spec, tuple(ladder))
    if path.exists():
        return json.loads(path.read_text())["lr"]
    for lr in ladder:
        cell = cell_task({**spec, "lr": lr}, out_dir)
        if cell["steps_to_forget"] is not None:
            break
    atomic_write_json(path, {"lr": lr, "name": path.stem.split("--")[0], "key": calibration_key(spec, tuple(ladder)),
                             "rule": f"smallest of {list(ladder)} reaching forget EM < {spec['forget_target']} in "
                                     f"{spec['max_steps']} steps (vanilla, seed {spec['seed']}), else the largest"})
    return lr


# ----------------------------------------------------------------------------------- the grid

def regime_aliases(moe, regimes: tuple[str, ...]) -> dict[str, str]:
    """{regime: an earlier regime that trains the SAME parameters at the same relative learning rates}.

    Such a regime would repeat the earlier one's runs to the last digit (the same seeded jobs), so
    the study runs it once and reports it under both names. On OLMoE (no shared experts)
    `experts+routers` and `shortcut` (`moe` scope, routers x30) are the same parameter set.
    """
    kinds = classify_parameters(moe.model, moe.layers)
    group = {"router": "routers", "expert": "experts", "shared": "experts", "other": "other"}
    seen: dict[tuple, str] = {}
    aliases = {}
    for name in regimes:
        preset = get_preset(name)
        scope = dataclasses.replace(preset.scope, lr=1.0)
        signature = (tuple((n, scope.group_lr(group[kinds[n]])) for n in scope_parameter_names(moe.model, moe, scope)),
                     tuple(sorted(preset.method_args.items())))
        if signature in seen:
            aliases[name] = seen[signature]
        else:
            seen[signature] = name
    return aliases


@dataclass
class StudyPlan:
    """The grid resolved against the files of a study folder."""

    grid: StudyGrid
    out_dir: Path
    model: str
    load: dict                            # load_model kwargs with the resolved dtype (part of every cell id)
    aliases: dict[str, str]
    groups: list[dict]                    # first-seed vanilla specs (lr None), one per (scenario, regime, method)
    lrs: dict[tuple, float]               # (scenario, regime, method) -> calibrated lr, where known

    def specs(self) -> list[dict]:
        """Every run cell whose lr is known, seed-major (a study stopped early covers the grid with fewer seeds)."""
        out = []
        for seed in self.grid.seeds:
            for g in self.groups:
                lr = self.lrs.get((g["scenario"], g["regime"], g["method"]))
                if lr is not None:
                    out += [{**g, "grip": m, "seed": seed, "lr": lr} for m in self.grid.grip_modes]
        return out


def plan_study(grid: StudyGrid, out_dir: Path, model: str = "demo", load: dict | None = None,
               aliases: dict[str, str] | None = None) -> StudyPlan:
    """The grid against a study folder. Without `aliases` the model is loaded (to resolve its dtype and
    find the aliased regimes); with them (from a study's manifest), `load` must hold the resolved dtype."""
    if aliases is None:
        moe = _load_cached(model, load)
        load = {**(load or {}), "dtype": _dtype_name(moe)}
        aliases = regime_aliases(moe, grid.regimes)
    groups = [cell_spec(grid, sc, rg, m, "off", grid.calibrating_seed, None, model, load)
              for sc in grid.scenarios for rg in grid.regimes if rg not in aliases for m in grid.methods]
    return StudyPlan(grid, out_dir, model, load, aliases, groups, _known_lrs(out_dir, groups, grid))


def adopt_lrs(out_dir: Path, source: Path, grid: StudyGrid, model: str = "demo", load: dict | None = None) -> int:
    """Copy the learning-rate records of another study folder that this grid's groups would calibrate
    (same calibration key, hence the same file name) into out_dir/cells; returns how many were copied.
    A record is a fixed rule's outcome on a keyed vanilla run, so it holds wherever that key does."""
    if not (Path(source) / "cells").is_dir():
        raise ConfigError(f"--lrs-from {source}: not a study folder (no cells/ in it)")
    plan = plan_study(grid, out_dir, model, load)
    n = 0
    for g in plan.groups:
        src, dst = _lr_path(Path(source) / "cells", g, grid.lr_ladder), _lr_path(Path(out_dir) / "cells", g, grid.lr_ladder)
        if src.exists() and not dst.exists():
            atomic_write_json(dst, {**json.loads(src.read_text()), "copied_from": str(src.relative_to(source))})
            n += 1
    return n


def _known_lrs(out_dir: Path, groups: list[dict], grid: StudyGrid) -> dict[tuple, float]:
    lrs = {}
    for g in groups:
        p = _lr_path(out_dir / "cells", g, grid.lr_ladder)
        if p.exists():
            lrs[(g["scenario"], g["regime"], g["method"])] = json.loads(p.read_text())["lr"]
    return lrs


def default_out_dir(quick: bool) -> Path:
    return DEFAULT_RUNS_DIR / ("study-quick" if quick else "study")


def check_out_dir(out_dir: Path, write_committed: bool) -> None:
    """ConfigError when out_dir is inside the committed docs/ and the caller did not ask for it."""
    try:
        inside = Path(out_dir).resolve().is_relative_to(COMMITTED_DIR.resolve())
    except OSError:
        inside = False
    if inside and not write_committed:
        raise ConfigError(f"--out-dir {out_dir}: that is the committed study report (under docs/); "
                          "add --write-committed-report to write there")


def run_study(quick: bool = False, out_dir: Path | None = None, seeds: list[int] | None = None,
              model: str = "demo", workers: int = 1, report_only: bool = False, grid: StudyGrid | None = None,
              load: dict | None = None, launch: LaunchConfig | None = None, write_committed: bool = False,
              lrs_from: Path | None = None, compare_with: Path | None = None) -> str | None:
    """Run (or resume) the grid; return the markdown report (None for a Slurm dry run).

    `out_dir`: default runs/study (runs/study-quick with `quick`); a folder under docs/ needs
    `write_committed`. `report_only` builds the report from the cells already there (e.g. made by a
    cluster). `workers` / `launch`: where the tasks run (grip_core.runs.launch; `workers` is the pool's
    size when `launch` is not given; 0 = one per core). `grid` replaces the FULL / QUICK grid.
    `load`: load_model keyword arguments (device, dtype, device_map) for every task's model.
    `lrs_from`: another study folder whose learning-rate records this grid reuses (`adopt_lrs`; e.g. the
    robustness study takes the main study's rates instead of calibrating again).
    `compare_with`: another study folder (another model, the same grid) whose rows the report shows side by side.
    """
    grid = grid or (QUICK if quick else FULL)
    if seeds:          # the calibration stays on the grid's own first seed (machines splitting seeds agree)
        grid = dataclasses.replace(grid, seeds=tuple(seeds), calibration_seed=grid.calibrating_seed)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(quick)
    check_out_dir(out_dir, write_committed)
    launch = launch or LaunchConfig(workers=workers if workers > 0 else (os.cpu_count() or 1))
    launch.folder = launch.folder or out_dir / "submitit"
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    started = time.time()
    if lrs_from is not None:
        adopt_lrs(out_dir, Path(lrs_from), grid, model, load)
    plan = plan_study(grid, out_dir, model, load)
    n_before = len(cell_index(out_dir / "cells"))
    study_manifest = {**manifest.environment(), "command": sys.argv, "launcher": launch.launcher,
                      "workers": launch.workers, "grid": dataclasses.asdict(grid), "model": model, "load": plan.load,
                      "aliases": plan.aliases, "study_code_version": STUDY_CODE_VERSION, "started": started,
                      "finished": None}
    if not launch.dry_run:
        atomic_write_json(out_dir / "manifest.json", study_manifest)     # the Findings page reads a filling study
    if not report_only:
        bar = tqdm(total=len(plan.groups) * len(grid.grip_modes) * len(grid.seeds), desc="study", unit="cell",
                   file=sys.stderr)
        bar.update(len(_present(plan)))
        todo = [g for g in plan.groups if (g["scenario"], g["regime"], g["method"]) not in plan.lrs]
        lrs = map_tasks(calibrate_task, [(g, list(grid.lr_ladder), str(out_dir)) for g in todo], launch,
                        on_result=lambda _: bar.update(1), name="learning-rate calibration")
        if launch.dry_run and todo:    # the cells' learning rates are not known before the calibration has run
            bar.close()
            n = len(plan.groups) * len(grid.grip_modes) * len(grid.seeds) - len(_present(plan)) - len(todo)
            print(f"# then: the grid's other {n} cells as a second job array of the same form")
            return None
        plan.lrs.update({(g["scenario"], g["regime"], g["method"]): lr for g, lr in zip(todo, lrs)})
        index = cell_index(out_dir / "cells")
        specs = [s for s in plan.specs() if cell_id(s) not in index]
        map_tasks(cell_task, [(s, str(out_dir)) for s in specs], launch, on_result=lambda _: bar.update(1),
                  name="study cells")
        bar.close()
        if launch.dry_run:
            return None
    cells = _present(plan)
    atomic_write_json(out_dir / "manifest.json", {
        **study_manifest, "finished": time.time(), "wall_seconds": time.time() - started,
        "cells_made": len(cell_index(out_dir / "cells")) - n_before, "cells_present": len(cells)})
    check = _alias_check(out_dir / "cells", cells, plan.aliases)
    cells = cells + _aliased(cells, plan.aliases)
    extra = attacked_vs_plain(cells, Path(lrs_from)) if (lrs_from is not None and grid.attacks) else []
    if compare_with is not None:
        other = read_study(Path(compare_with))
        extra += side_by_side(cells, grid, other["cells"], other["grid"], (model, other["manifest"].get("model", "demo")))
    return study_report(cells, grid, quick, plan.aliases, check, model,
                        _regenerate(out_dir, model, grid, compare_with, lrs_from), extra)


def _rel(path: Path) -> Path:
    try:
        return Path(path).resolve().relative_to(REPO_ROOT.resolve())
    except ValueError:
        return Path(path)


def _regenerate(out_dir: Path, model: str, grid: StudyGrid, compare_with: Path | None = None,
                lrs_from: Path | None = None) -> str:
    """The command that rebuilds a study folder's report from its cells."""
    committed = " --write-committed-report" if Path(out_dir).resolve().is_relative_to(COMMITTED_DIR.resolve()) else ""
    base = ROBUSTNESS if grid.attacks else FULL
    lists = "".join(f" --{f.replace('_', '-')} {','.join(getattr(grid, f))}"
                    for f in ("scenarios", "regimes", "methods", "grip_modes") if getattr(grid, f) != getattr(base, f))
    return (f"python -m grip_core study --report-only --out-dir {_rel(out_dir)}{committed}"
            + ("" if model == "demo" else f" --model {model}") + (" --robustness" if grid.attacks else "") + lists
            + ("" if lrs_from is None else f" --lrs-from {_rel(lrs_from)}")
            + ("" if compare_with is None else f" --compare-with {_rel(compare_with)}"))


def _present(plan: StudyPlan) -> list[dict]:
    """The plan's cells that exist on disk (read once)."""
    index = cell_index(plan.out_dir / "cells")
    return [json.loads(index[i].read_text()) for i in (cell_id(s) for s in plan.specs()) if i in index]


def read_study(out_dir: Path, grid: StudyGrid | None = None, model: str = "demo", load: dict | None = None) -> dict:
    """{"cells" (run + aliased), "grid", "aliases", "alias_check", "manifest"} of a study folder (which may be
    still filling), for the report and the Findings page. The grid, model, load settings and aliases come
    from the folder's manifest.json when it has one (then no model is loaded), else from the arguments
    (default: the FULL grid on the demo)."""
    out_dir = Path(out_dir)
    if not (out_dir / "cells").is_dir():
        raise ConfigError(f"{out_dir}: not a study folder (no cells/ in it)")
    saved = json.loads((out_dir / "manifest.json").read_text()) if (out_dir / "manifest.json").is_file() else {}
    if grid is None and saved.get("grid"):
        grid = StudyGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["grid"].items()})
    grid = grid or FULL
    if "aliases" in saved and "load" in saved:
        plan = plan_study(grid, out_dir, saved.get("model", model), saved["load"], saved["aliases"])
    else:
        plan = plan_study(grid, out_dir, model, load)
    cells = _present(plan)
    return {"cells": cells + _aliased(cells, plan.aliases), "grid": grid, "aliases": plan.aliases,
            "alias_check": _alias_check(out_dir / "cells", cells, plan.aliases), "manifest": saved}


def _alias_check(cells_dir: Path, cells: list[dict], aliases: dict[str, str]) -> dict[tuple, tuple[int, int]]:
    """{(scenario, alias): (identical, compared)}: cells of an aliased regime that were RUN (before aliasing,
    kept as cells/alias__*.json) vs its source regime's."""
    timing = {"seconds", "regime", "run_dir", "step_ms", "grip_ms", "id", "name", "spec", "key", "manifest", "migrated"}
    source = {(c["scenario"], c["regime"], c["method"], c["grip"], c["seed"]): c for c in cells}
    out: dict[tuple, list[int]] = {}
    for p in sorted(Path(cells_dir).glob("alias__*.json")):
        c = json.loads(p.read_text())
        ref = source.get((c["scenario"], aliases.get(c["regime"]), c["method"], c["grip"], c["seed"]))
        if ref is not None:
            n = out.setdefault((c["scenario"], c["regime"]), [0, 0])
            n[0] += all(c.get(k) == ref.get(k) for k in c if k not in timing)
            n[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _aliased(cells: list[dict], aliases: dict[str, str]) -> list[dict]:
    return [{**c, "regime": alias, "same_as": source} for alias, source in aliases.items()
            for c in cells if c["regime"] == source]


# ----------------------------------------------------------------------------------- migration

LEGACY_SETTINGS = {"max_steps": 200, "eval_every": 10, "eval_examples": 64, "final_eval_examples": 200,
                   "forget_target": FORGET_TARGET, "model": "demo", "load": {"dtype": "float32"}}


def migrate_legacy_cells(cells_dir: Path, made_by: dict | None = None) -> dict[str, int]:
    """Rename cells saved before content-hashed ids (`<scenario>__<regime>__<method>__<mode>__<seed>.json`,
    `..__lr.json`) to the id scheme, computing each id from what the cell stored plus LEGACY_SETTINGS (the
    FULL grid's settings and the CPU float32 demo of the code that made them, which the files do not
    record: each migrated cell says so). Cells of an aliased regime become `alias__...` files (kept only
    for the identity check). Nothing is re-run. `made_by`: the manifest of the code and machine that made
    the cells, where it is known (else the cell's manifest says it is not). Returns {"cells", "lr", "alias"}."""
    cells_dir = Path(cells_dir)
    moe = _load_cached("demo", {"dtype": "float32"})
    aliases = regime_aliases(moe, FULL.regimes)
    counts = {"cells": 0, "lr": 0, "alias": 0}
    note = ("made before cell ids and manifests: the spec's max_steps, eval_every, eval_examples, "
            "final_eval_examples, model and dtype are the settings of the code that made it, not read from the cell")
    for p in sorted(cells_dir.glob("*.json")):
        parts = p.stem.split("__")
        if "--" in p.stem or p.stem.startswith(("lr__", "alias__")):
            continue
        if len(parts) == 4 and parts[3] == "lr":
            sc, rg, m = parts[:3]
            spec = {**cell_spec(FULL, sc, rg, m, "off", 0, None), **LEGACY_SETTINGS}
            old = json.loads(p.read_text())
            path = _lr_path(cells_dir, spec, FULL.lr_ladder)
            atomic_write_json(path, {**old, "name": path.stem.split("--")[0],
                                     "key": calibration_key(spec, FULL.lr_ladder), "migrated": {"from": p.name}})
            p.unlink()
            counts["lr"] += 1
            continue
        if len(parts) != 5:
            continue
        old = json.loads(p.read_text())
        if old["regime"] in aliases:
            atomic_write_json(cells_dir / f"alias__{p.name}", old)
            p.unlink()
            counts["alias"] += 1
            continue
        spec = {**cell_spec(FULL, old["scenario"], old["regime"], old["method"], old["grip"], old["seed"], old["lr"]),
                **LEGACY_SETTINGS}
        key = cell_key(spec)
        cid = _sha(key)[:16]
        cell = {"id": cid, "name": cell_name(spec), **old, "spec": spec, "key": key,
                "manifest": ({**made_by, "wall_seconds": old.get("seconds")} if made_by else
                             {"git_commit": None, "note": "not recorded: " + note}),
                "migrated": {"from": p.name, "note": note}}
        atomic_write_json(cells_dir / f"{cell['name']}--{cid}.json", cell)
        p.unlink()
        counts["cells"] += 1
    return counts


def fill_base_ems(cells_dir: Path) -> int:
    """Measure the base model's forget / retain EM for cells saved without them (the verdict needs them).

    They are the base model's exact match on the cell's own final-probe splits (the forget set and the
    seed's retain-eval slice, capped as the run caps them), measured now by run_probes as evaluate_final
    measures them; each filled cell records `base_em_source` saying so. Returns the count."""
    from ..metrics import run_probes
    from .evaluate import _cap

    n, measured = 0, {}
    for p in sorted(Path(cells_dir).glob("*--*.json")):
        c = json.loads(p.read_text())
        if p.name.startswith("lr__") or c.get("base_forget_em") is not None:
            continue
        spec = c["spec"]
        key = (spec["model"], spec["load"].get("dtype"), spec["scenario"], spec["seed"], spec["eval_examples"],
               spec["final_eval_examples"])
        if key not in measured:
            moe = _load_cached(spec["model"], spec["load"])
            data = UnlearningData.from_scenario(spec["scenario"], seed=spec["seed"], retain_eval_size=spec["eval_examples"])
            splits = {k: _cap(v, spec["final_eval_examples"]) for k, v in data.splits().items() if k in ("forget", "retain")}
            probes = run_probes(moe, splits, membership=None).to_dict()["splits"]
            measured[key] = (probes["forget"]["exact_match"], probes["retain"]["exact_match"])
        c["base_forget_em"], c["base_retain_em"] = measured[key]
        c["base_em_source"] = (f"measured after the run on the cell's own final-probe splits (run_probes, commit "
                               f"{manifest.git_state()['git_commit']}), not by the run that made the cell")
        c["verdict"] = verdict(c).kind
        atomic_write_json(p, c)
        n += 1
    return n


def rekey_cells(cells_dir: Path) -> int:
    """Recompute every cell's id from its stored spec (after a config field was added; see Footguns)."""
    n = 0
    for p in sorted(Path(cells_dir).glob("*--*.json")):
        c = json.loads(p.read_text())
        if "spec" not in c:
            continue
        key = cell_key(c["spec"])
        if _sha(key)[:16] != c["id"]:
            c.update(id=_sha(key)[:16], key=key)
            atomic_write_json(p.with_name(f"{c['name']}--{c['id']}.json"), c)
            p.unlink()
            n += 1
    return n


# ----------------------------------------------------------------------------------- the report

FORGET_COLUMNS = [("forget_em", "forget EM"), ("retain_em", "retain EM"), ("holdout_em", "holdout EM"),
                  ("membership_auc", "MIA AUC"), ("steps_to_forget", "steps to forget")]
ROUTING_COLUMNS = [("retain_stability", "stability"), ("retain_stability_router_only", "router-only"),
                   ("retain_stability_drift_only", "drift-only"), ("forget_shift", "forget shift"),
                   ("restoration_recovered", "restoration")]
_VERDICT_KEYS = ("base_forget_em", "forget_em", "base_retain_em", "retain_em", "retain_stability",
                 "retain_stability_router_only", "retain_stability_drift_only", "forget_shift", "restoration_recovered")


def group_by(cells: list[dict], *keys) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for c in cells:
        out.setdefault(tuple(c.get(k) for k in keys), []).append(c)
    return out


def _mean(cells: list[dict], key: str) -> float | None:
    vals = [c.get(key) for c in cells if c.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _sd(cells: list[dict], key: str) -> float | None:
    vals = [c.get(key) for c in cells if c.get(key) is not None]
    return statistics.pstdev(vals) if len(vals) > 1 else None


def figure_rows(cells: list[dict], grid: StudyGrid) -> list[dict]:
    """study_rows without the aliased copies and the cells themselves: the plain data of the study's figures."""
    return [{k: v for k, v in r.items() if k != "cells"} for r in study_rows(cells, grid) if not r["same_as"]]


def study_rows(cells: list[dict], grid: StudyGrid) -> list[dict]:
    """One row per (scenario, regime, method, GRIP mode): the mean of each number over seeds, the row's
    verdict and whether the paper's claim holds there (GRIP rows: verdict erased AND stability >= the bar).
    Plain data: the report's tables, its summary and the Findings page's figures all read these rows."""
    rows = []
    order = {m: i for i, m in enumerate(grid.grip_modes)}
    for (sc, rg, method, mode), cs in sorted(group_by(cells, "scenario", "regime", "method", "grip").items(),
                                             key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], order.get(kv[0][3], 9))):
        keys = _VERDICT_KEYS + ("steps_to_forget", "holdout_em", "membership_auc", "seconds")
        mean = {k: _mean(cs, k) for k in keys}
        sd = {k: _sd(cs, k) for k in keys}
        v = verdict(mean)
        stab = mean["retain_stability"]
        holds = None if mode == "off" else (v.kind == "erased" and stab is not None and stab >= CLAIM_STABILITY)
        rows.append({"scenario": sc, "regime": rg, "method": method, "grip": mode, "lr": cs[0].get("lr"),
                     "seeds": sorted(c["seed"] for c in cs), "same_as": cs[0].get("same_as"), "cells": cs,
                     "mean": mean, "sd": sd, "verdict": v.kind, "verdict_title": v.title, "claim_holds": holds,
                     "why_not": "" if holds or mode == "off" else _why_not(v, stab, grid.max_steps)})
    return rows


def panels(rows: list[dict], aliases: dict[str, str]) -> list[tuple[str, str, list[dict]]]:
    """study_rows grouped by (scenario, regime), in reading order: run regimes first, aliased ones last."""
    by = group_by(rows, "scenario", "regime")
    return [(sc, rg, by[(sc, rg)]) for sc, rg in sorted(by, key=lambda k: (k[1] in aliases, k))]


def coverage(cells: list[dict], grid: StudyGrid) -> dict:
    """{"present", "total", "aliased", "run", "missing_by_seed"}: the grid cells a study folder holds."""
    run = [c for c in cells if not c.get("same_as")]
    per_seed = grid.size // len(grid.seeds)
    missing = {s: per_seed - sum(1 for c in cells if c["seed"] == s) for s in grid.seeds}
    return {"present": len(cells), "total": grid.size, "aliased": len(cells) - len(run), "run": len(run),
            "missing_by_seed": {s: n for s, n in missing.items() if n}}


def machines(cells: list[dict]) -> list[str]:
    """"<cpu> (<cores> cores[, gpu]), run on <device>: N cells" per machine and device that made the cells (manifests)."""
    count: dict[str, int] = {}
    for c in cells:
        if c.get("same_as"):
            continue
        m = (c.get("manifest") or {}).get("machine")
        device = (c.get("manifest") or {}).get("device")
        name = (f"{m['cpu']} ({m['cores']} cores{', ' + m['gpu'] if m.get('gpu') else ''})"
                + (f", run on {device}" if device else "") if m else "not recorded (cells made before manifests)")
        count[name] = count.get(name, 0) + 1
    return [f"{k}: {v} cells" for k, v in sorted(count.items(), key=lambda kv: -kv[1])]


def study_summary(cells: list[dict], grid: StudyGrid) -> list[str]:
    """The few sentences the report, the Findings page and the README state, computed from the rows."""
    cov = coverage(cells, grid)
    rows = [r for r in study_rows(cells, grid) if not r["same_as"]]
    out = [f"Coverage: {cov['present']} of {cov['total']} cells ({cov['aliased']} of them aliased: the same runs "
           f"reported under a second regime name); seeds {list(grid.seeds)}"
           + ("" if not cov["missing_by_seed"] else "; missing: " +
              ", ".join(f"{n} cells of seed {s}" for s, n in cov["missing_by_seed"].items())) + "."]
    vanilla = [r for r in rows if r["grip"] == "off"]
    rerouted = [r for r in vanilla if r["verdict"] == "rerouted"]
    if vanilla:
        where = sorted({f"{r['scenario']}/{r['regime']}" for r in rerouted})
        out.append(f"Router shortcut: {len(rerouted)} of {len(vanilla)} vanilla (method, scenario, regime) rows are "
                   f"REROUTED (restoring the original routers brings the forgotten answers back)"
                   + (f", all in {', '.join(where)}" if where else "") + ".")
    grip = [r for r in rows if r["grip"] != "off"]
    if grip:
        forgot = [r for r in grip if r["verdict"] not in ("not forgotten", "cannot diagnose")]
        recs = [r["mean"]["restoration_recovered"] for r in forgot if r["mean"]["restoration_recovered"] is not None]
        other = [r["mean"]["restoration_recovered"] for r in grip if r not in forgot
                 and r["mean"]["restoration_recovered"] is not None]
        stabs = [r["mean"]["retain_stability"] for r in grip if r["mean"]["retain_stability"] is not None]
        holds = [r for r in grip if r["claim_holds"]]
        out.append(f"With GRIP, restoring the original routers recovers at most {pct(max(recs) if recs else None)} of the "
                   f"forgotten answers in the {len(forgot)} GRIP rows that forgot (vanilla rows that rerouted: "
                   + (f"{pct(min(r['mean']['restoration_recovered'] for r in rerouted))}–"
                      f"{pct(max(r['mean']['restoration_recovered'] for r in rerouted))}" if rerouted else "none")
                   + (f"; up to {pct(max(other))} in the {len(other)} GRIP rows that did not forget, of the few answers "
                      "they lost" if other else "")
                   + f"); retained stability {_f3(min(stabs) if stabs else None)}–{_f3(max(stabs) if stabs else None)}.")
        reasons: dict[str, int] = {}
        for r in grip:
            if not r["claim_holds"]:
                for reason in r["why_not"].strip(" ()").split("; "):
                    if reason:
                        reasons[reason] = reasons.get(reason, 0) + 1
        out.append(f"The paper's claim (verdict ERASED and retained stability ≥ {CLAIM_STABILITY}) holds in "
                   f"{len(holds)} of {len(grip)} GRIP rows"
                   + (f" ({', '.join(r['method'] + ' ' + r['grip'] + ' in ' + r['scenario'] + '/' + r['regime'] for r in holds)})"
                      if holds else "")
                   + ("; where it does not: " + ", ".join(f"{k} ({v})" for k, v in
                                                         sorted(reasons.items(), key=lambda kv: -kv[1])) if reasons else "")
                   + ".")
        pairs = [(r, next((v for v in vanilla if (v["scenario"], v["regime"], v["method"]) ==
                           (r["scenario"], r["regime"], r["method"])), None)) for r in grip]
        slower = [g["mean"]["steps_to_forget"] / v["mean"]["steps_to_forget"] for g, v in pairs
                  if v and g["mean"]["steps_to_forget"] and v["mean"]["steps_to_forget"]]
        never = sum(1 for r in grip if r["mean"]["steps_to_forget"] is None)
        if slower:
            out.append(f"Cost: GRIP needs {min(slower):.1f}–{max(slower):.1f}× the vanilla steps to bring forget EM "
                       f"below {FORGET_TARGET}" + (f"; {never} GRIP rows never got there within {grid.max_steps} steps"
                                                   if never else "") + ".")
    return out


README_START, README_END = "<!-- study-summary:start -->", "<!-- study-summary:end -->"
README_METHODS = ("graddiff", "npo", "simnpo")        # the methods of the robustness and demo-fine grids too
README_ATTACKS = (("restoration", "restoration attack recovers"), ("expert_forcing", "expert forcing recovers"),
                  ("relearn_router", "relearning (routers) recovers"), ("relearn_full", "relearning (all) recovers"),
                  ("quant_int4", "INT4 recovers"))
COMMITTED_STUDIES = {"main": "study", "robustness": "study/robustness", "demo-fine": "study/demo_fine"}  # under docs/


def readme_block(cells: list[dict], grid: StudyGrid, robustness: list[dict] | None = None,
                 second: list[dict] | None = None, second_name: str = "demo-fine") -> str:
    """The README's study block: the same summary sentences as the report and the Findings page, and the
    headline table (GradDiff / NPO / SimNPO means over seeds) of every run (scenario, regime). `robustness`:
    the robustness study's cells (their attacks become columns; restoration comes from every cell's own
    final report); `second`: another demo's study cells, appended as rows named `second_name`."""
    names = {"off": "off", "update": "update", "drift": "drift-aware (every 10 steps)",
             "anchor": "update + router-input anchor"}
    cols = [("forget_em", "forget EM", "{:.3f}"), ("retain_em", "retain EM", "{:.2f}"),
            ("retain_stability", "retained routing stability", "{:.2f}"),
            ("retain_stability_router_only", "new routers on original inputs", "{:.2f}")]
    attacks = {(x["scenario"], x["regime"], x["method"], x["grip"]): {r["attack"]: r["recovered"] for r in x["robustness"]}
               for x in robustness_means(robustness or [])}
    label = {"graddiff": "GradDiff", "npo": "NPO", "simnpo": "SimNPO", "ga": "GA"}
    lines = [README_START, "", *(f"- {s}" for s in study_summary(cells, grid)), "",
             f"Headline numbers, mean over seeds ({' / '.join(label.get(m, m) for m in README_METHODS)}); the attack "
             "columns (share of the forgotten answers brought back) come from the robustness study "
             "(`docs/study/robustness/`), \"–\" where it did not run:",
             "", "| model · scenario · regime | GRIP | " + " | ".join(c[1] for c in cols) + " | " +
             " | ".join(n for _, n in README_ATTACKS) + " |", "|---|---|" + "---|" * (len(cols) + len(README_ATTACKS))]
    for model, cs, g in (("demo", cells, grid), (second_name, second or [], grid)):
        rows = {(r["scenario"], r["regime"], r["method"], r["grip"]): r["mean"] for r in study_rows(cs, g)
                if not r["same_as"]}
        for sc, rg in sorted({(k[0], k[1]) for k in rows}):
            modes = [m for m in names if any((sc, rg, x, m) in rows for x in README_METHODS)]
            for i, mode in enumerate(modes):
                vals = []
                for key, _, f in cols:
                    xs = [rows.get((sc, rg, m, mode), {}).get(key) for m in README_METHODS]
                    vals.append(" / ".join("–" if x is None else f.format(x) for x in xs))
                for a, _ in README_ATTACKS:
                    if a == "restoration":
                        xs = [rows.get((sc, rg, m, mode), {}).get("restoration_recovered") for m in README_METHODS]
                    else:
                        xs = [attacks.get((sc, rg, m, mode), {}).get(a) if model == "demo" else None
                              for m in README_METHODS]
                    vals.append(" / ".join("–" if x is None else pct(x, 0) for x in xs))
                lines.append(f"| {f'**{model} · {sc} · {rg}**' if i == 0 else ''} | {names[mode]} | " +
                             " | ".join(vals) + " |")
    return "\n".join(lines + ["", README_END])


def refresh_readme(readme: Path | None = None) -> bool:
    """Rewrite the README's study block from the committed study folders (main, robustness, demo-fine);
    False when the README has no block. Any folder that is missing contributes nothing."""
    docs = COMMITTED_DIR
    main = read_study(docs / COMMITTED_STUDIES["main"])
    extra = {}
    for name in ("robustness", "demo-fine"):
        folder = docs / COMMITTED_STUDIES[name]
        extra[name] = read_study(folder)["cells"] if (folder / "manifest.json").is_file() else []
    block = readme_block(main["cells"], main["grid"], extra["robustness"], extra["demo-fine"])
    return update_readme(readme or REPO_ROOT / "README.md", block)


def update_readme(path: Path, block: str) -> bool:
    """Replace the study block between the README's markers; False (nothing written) if it has none."""
    text = Path(path).read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        return False
    head, rest = text.split(README_START, 1)
    from .store import atomic_write_text

    atomic_write_text(Path(path), head + block + rest.split(README_END, 1)[1])
    return True


def study_report(cells: list[dict], grid: StudyGrid, quick: bool, aliases: dict[str, str] | None = None,
                 alias_check: dict[tuple, tuple[int, int]] | None = None, model: str = "demo",
                 command: str | None = None, extra: list[str] | None = None) -> str:
    """Markdown: coverage and machines, the summary, then two narrow tables per (scenario, regime), aliased last;
    then the robustness section when the cells were attacked. `command`: how to regenerate it (default: the
    committed main study's)."""
    aliases = aliases or {}
    command = command or "python -m grip_core study --report-only --out-dir docs/study --write-committed-report"
    kind = "robustness study" if grid.attacks else "study"
    lines = [f"# GRIP Studio {kind}{' (quick)' if quick else ''}{'' if model == 'demo' else ' on ' + model}", "",
             f"Made by `python -m grip_core study{' --quick' if quick else ''}` on the `{model}` model (regenerate: "
             f"`{command}`). "
             f"Grid: scenarios {list(grid.scenarios)}, regimes {list(grid.regimes)}, methods {list(grid.methods)}, "
             f"GRIP modes {list(grid.grip_modes)}, seeds {list(grid.seeds)}; {grid.eval_examples} examples per split "
             f"in the per-step probes, {grid.final_eval_examples} in the final ones. Learning rate per (scenario, "
             f"regime, method): the smallest of {list(grid.lr_ladder)} at which vanilla unlearning reaches forget EM "
             f"< {FORGET_TARGET} within {grid.max_steps} steps (else the largest); every run stops once forget EM < "
             f"{FORGET_TARGET} (checked every {grid.eval_every} steps) or at {grid.max_steps} steps. Mean±sd over seeds. "
             "Stability is measured on retained questions held out of training and of GRIP's fit. Figures: the "
             "dashboard's Findings page.", "",
             "Cells made on: " + "; ".join(machines(cells) or ["no cells yet"]) + ".", ""]
    migrated = sum(1 for c in cells if c.get("migrated") and not c.get("same_as"))
    if migrated:
        lines += [f"{migrated} cells were made before cell ids and renamed to them without re-running: their files "
                  "did not record the evaluation sizes, step limit, model or dtype, so their specs state those of the "
                  "code that made them (`migrated` in the cell).", ""]
    filled = sum(1 for c in cells if c.get("base_em_source") and not c.get("same_as"))
    if filled:
        lines += [f"{filled} cells were saved without the base model's exact match; their base EMs (which the "
                  "verdicts need) were measured afterwards on each cell's own evaluation splits by the same code "
                  "(`base_em_source` in the cell).", ""]
    lines += ["## Summary", ""] + [f"- {s}" for s in study_summary(cells, grid)] + [""]
    for scenario, regime, group in panels(study_rows(cells, grid), aliases):
        lines += [f"## {scenario} scenario · {regime} regime", ""]
        if regime in aliases:
            src = aliases[regime]
            done = (alias_check or {}).get((scenario, regime))
            check = (f" Checked: {done[0]} of {done[1]} `{regime}` runs made before this rule gave numbers identical "
                     f"to `{src}`'s." if done else "")
            lines += [f"On this model `{regime}` trains exactly the parameters of `{src}`, at the same relative "
                      f"learning rates (no shared experts), so its runs would repeat `{src}`'s to the last digit: see "
                      f"\"{scenario} scenario · {src} regime\" above (not run twice).{check}", ""]
            continue
        lines += ["| method | GRIP | lr | " + " | ".join(n for _, n in FORGET_COLUMNS) + " | verdict |",
                  "|---|---|---|" + "---|" * len(FORGET_COLUMNS) + "---|"]
        for r in group:
            lines.append(f"| {r['method']} | {r['grip']} | {r['lr']:g} | " +
                         " | ".join(mean_sd([c.get(k) for c in r["cells"]]) for k, _ in FORGET_COLUMNS) +
                         f" | {r['verdict_title']} |")
        lines += ["", "| method | GRIP | " + " | ".join(n for _, n in ROUTING_COLUMNS) + " | paper's claim |",
                  "|---|---|" + "---|" * len(ROUTING_COLUMNS) + "---|"]
        for r in group:
            claim = "–" if r["claim_holds"] is None else ("HOLDS" if r["claim_holds"] else "no" + r["why_not"])
            lines.append(f"| {r['method']} | {r['grip']} | " +
                         " | ".join(mean_sd([c.get(k) for c in r["cells"]]) for k, _ in ROUTING_COLUMNS) + f" | {claim} |")
        lines.append("")
    lines += robustness_section(cells, grid) + list(extra or [])
    return "\n".join(lines) + "\n"


def _f3(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _why_not(v, stab, max_steps: int) -> str:
    """Why a GRIP row does not support the paper's claim (verdict "erased" AND stability >= the bar)."""
    reasons = []
    if stab is not None and stab < CLAIM_STABILITY:
        reasons.append(f"stability below {CLAIM_STABILITY}")
    if v.kind in ("rerouted", "mixed"):
        reasons.append("restoration still recovers answers")
    fem = v.numbers.get("forget_em")
    if fem is None or fem >= v.forget_target:
        reasons.append(f"forget EM not below {v.forget_target} within {max_steps} steps")
    if v.kind in ("collapsed", "not forgotten", "cannot diagnose"):
        reasons.append(f"verdict {v.kind}")
    return " (" + "; ".join(reasons) + ")" if reasons else ""


# ----------------------------------------------------------------------------------- the robustness report

_MODE_ORDER = {m: i for i, m in enumerate(FULL.grip_modes)}   # rows in the grid's mode order
_ROW_NUMBERS = ("base_em", "unlearned_em", "attacked_em", "recovered", "base_prob", "unlearned_prob", "attacked_prob",
                "routing_shift")


def robustness_means(cells: list[dict]) -> list[dict]:
    """The attacked cells averaged over seeds: one entry per (scenario, regime, method, GRIP mode) with
    "label", "seeds", "robustness" (rows of the agreed shape, each number the mean over seeds; plus
    "recovered_sd") and "ledger" (mean share of ‖ΔΘ‖² by group). Plain data for the report and the
    Findings page's heatmap (grip_core.viz.robustness draws it like a run's matrix)."""
    from ..attacks.matrix import cell_label

    out = []
    attacked = [c for c in cells if c.get("robustness")]
    for (sc, rg, method, mode), cs in sorted(group_by(attacked, "scenario", "regime", "method", "grip").items(),
                                             key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], _MODE_ORDER.get(kv[0][3], 9))):
        by: dict[tuple, list[dict]] = {}
        for c in cs:
            for r in c["robustness"]:
                by.setdefault((r["attack"], r["setting"]), []).append(r)
        rows = []
        for (attack, setting), rs in by.items():
            rows.append({"attack": attack, "setting": setting, **{k: _mean(rs, k) for k in _ROW_NUMBERS},
                         "n": rs[0]["n"], "recovered_sd": _sd(rs, "recovered")})
        groups = sorted({g for c in cs for g in (c.get("ledger") or {})})
        out.append({"scenario": sc, "regime": rg, "method": method, "grip": mode, "seeds": sorted(c["seed"] for c in cs),
                    "label": f"{cell_label(method, mode)} · {sc} · {rg}", "robustness": rows,
                    "steps": _mean(cs, "steps"), "forget_em": _mean(cs, "forget_em"),
                    "ledger": {g: _mean([c["ledger"] for c in cs if c.get("ledger")], g) for g in groups}})
    return out


def robustness_summary(means: list[dict]) -> list[str]:
    """The robustness sentences (report, Findings page): per regime, each attack's mean recovered share by GRIP
    mode over the (scenario, method) rows; and forced routing's forget EM next to the paper's."""
    if not means:
        return []
    from ..viz.robustness import ATTACK_NAMES

    name = {"off": "vanilla", "update": "GRIP update", "drift": "GRIP drift", "anchor": "GRIP anchor"}
    out = []
    for regime, group in sorted(group_by(means, "regime").items()):
        modes = [m for m in name if any(x["grip"] == m for x in group)]
        attacks: list[str] = []
        for x in group:
            attacks += [r["attack"] for r in x["robustness"] if r["attack"] not in attacks]
        parts = []
        for a in attacks:
            vals = [[r["recovered"] for x in group if x["grip"] == m for r in x["robustness"]
                     if r["attack"] == a and r["recovered"] is not None] for m in modes]
            parts.append(f"{ATTACK_NAMES.get(a, a)} " + " / ".join(pct(statistics.fmean(v) if v else None, 0)
                                                                   for v in vals))
        n_rows = len({(x["scenario"], x["method"]) for x in group})
        out.append(f"`{regime[0]}` regime, recovered share of the forgotten answers ({' / '.join(name[m] for m in modes)}; "
                   f"mean over {n_rows} (scenario, method) rows and their seeds): " + "; ".join(parts) + ".")
    forced = {m: [r for x in means if x["grip"] == m for r in x["robustness"] if r["attack"] == "expert_forcing"]
              for m in name}
    if any(forced.values()):
        out.append("Expert forcing (each forget token sent to the top-k experts it did not select), forget EM "
                   "unlearned → forced, all rows: " + ", ".join(
                       f"{name[m]} {_f3(_mean(rs, 'unlearned_em'))} → {_f3(_mean(rs, 'attacked_em'))}"
                       for m, rs in forced.items() if rs) +
                   " (the GRIP paper on Qwen3-30B-A3B, approximately: baseline .26 → .37, GRIP .24 → .27).")
    return out


def robustness_section(cells: list[dict], grid: StudyGrid) -> list[str]:
    """Markdown lines: the robustness summary and one table per (scenario, regime) (recovered mean±sd per attack)."""
    from ..viz.robustness import ATTACK_NAMES

    means = robustness_means(cells)
    if not means:
        return []
    raw = group_by([c for c in cells if c.get("robustness")], "scenario", "regime", "method", "grip")
    lines = ["## Robustness: did it really forget?", "",
             f"Each cell's unlearned model attacked by {', '.join(ATTACK_NAMES.get(a, a) for a in grid.attacks)} "
             f"(grip_core.attacks; defined in docs/method.md), judged on {grid.attack_eval_examples} forget examples "
             "outside the relearning slice. **recovered** = (attacked − unlearned forget EM) / (base − unlearned), "
             "mean±sd over seeds; \"router share\" = the routers' share of ‖ΔΘ‖² (the update ledger).", ""]
    lines += [f"- {s}" for s in robustness_summary(means)] + [""]
    attacks = [a for a in grid.attacks if any(r["attack"] == a for x in means for r in x["robustness"])]
    for (sc, rg), group in sorted(group_by(means, "scenario", "regime").items()):
        lines += [f"### {sc} scenario · {rg} regime", "",
                  "| method | GRIP | seeds | steps | forget EM | router share | " +
                  " | ".join(ATTACK_NAMES.get(a, a) for a in attacks) + " |",
                  "|---|---|---|---|---|---|" + "---|" * len(attacks)]
        for x in group:
            cs = raw[(sc, rg, x["method"], x["grip"])]
            cols = []
            for a in attacks:
                cols.append(mean_sd([next((r["recovered"] for r in c["robustness"] if r["attack"] == a), None)
                                     for c in cs]))
            lines.append(f"| {x['method']} | {x['grip']} | {len(cs)} | {mean_sd([c.get('steps') for c in cs])} | "
                         f"{mean_sd([c.get('forget_em') for c in cs])} | "
                         f"{mean_sd([(c.get('ledger') or {}).get('router') for c in cs])} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------- two models side by side

SIDE_BY_SIDE = (("steps_to_forget", "steps to forget"), ("forget_em", "forget EM"), ("retain_em", "retain EM"),
                ("retain_stability", "stability"), ("retain_stability_router_only", "router-only"),
                ("retain_stability_drift_only", "drift-only"), ("restoration_recovered", "restoration"))


def side_by_side(cells: list[dict], grid: StudyGrid, other: list[dict], other_grid: StudyGrid,
                 names: tuple[str, str]) -> list[str]:
    """Markdown lines: every (scenario, regime, method, GRIP mode) row both studies ran, each number as
    "this / other" (means over seeds, each study's own seeds), plus the verdicts."""
    mine = {(r["scenario"], r["regime"], r["method"], r["grip"]): r for r in study_rows(cells, grid)}
    theirs = {(r["scenario"], r["regime"], r["method"], r["grip"]): r for r in study_rows(other, other_grid)}
    keys = [k for k in mine if k in theirs]
    if not keys:
        return []
    lines = [f"## Side by side: `{names[0]}` / `{names[1]}`", "",
             f"Each entry is \"{names[0]} / {names[1]}\": the mean over each study's seeds "
             f"({names[0]}: {list(grid.seeds)}, {names[1]}: {list(other_grid.seeds)}); the same data, stopping rule "
             "and learning-rate rule. \"(demo: = shortcut)\": on that model the regime is aliased (the same runs).", "",
             "| scenario · regime | method | GRIP | " + " | ".join(n for _, n in SIDE_BY_SIDE) + " | verdicts |",
             "|---|---|---|" + "---|" * len(SIDE_BY_SIDE) + "---|"]
    for k in keys:
        a, b = mine[k], theirs[k]
        cols = []
        for key, _ in SIDE_BY_SIDE:
            xs = [r["mean"].get(key) for r in (a, b)]
            cols.append(" / ".join("–" if x is None else (f"{x:.0f}" if key == "steps_to_forget" else f"{x:.3f}")
                                   for x in xs))
        alias = "".join(f" ({n}: = {r['same_as']})" for n, r in zip(names, (a, b)) if r["same_as"])
        lines.append(f"| {k[0]} · {k[1]}{alias} | {k[2]} | {k[3]} | " + " | ".join(cols) +
                     f" | {a['verdict']} / {b['verdict']} |")
    return lines + [""]


_OUTCOME = ("steps", "forget_em", "retain_em", "holdout_em", "retain_stability", "retain_stability_router_only",
            "retain_stability_drift_only", "restoration_recovered")


def attacked_vs_plain(cells: list[dict], plain_dir: Path) -> list[str]:
    """Markdown lines: do the attacked cells repeat, before their attacks, the plain cell of `plain_dir` with the
    same spec (the same unlearning run: the attacks come after it)? Counts, then each cell that differs."""
    index = cell_index(Path(plain_dir) / "cells")
    same, differ, absent = 0, [], 0
    for c in cells:
        if not c.get("robustness") or c.get("same_as"):
            continue
        path = index.get(cell_id(_without_attacks(c["spec"])))
        if path is None:
            absent += 1
            continue
        plain = json.loads(path.read_text())
        keys = [k for k in _OUTCOME if c.get(k) != plain.get(k)]
        if not keys:
            same += 1
            continue
        differ.append(f"  - {c['name']}: " + ", ".join(f"{k} {_fmt_outcome(c.get(k))} vs {_fmt_outcome(plain.get(k))}"
                                                       for k in keys) + f" (torch {_torch_of(c)} vs {_torch_of(plain)})")
    if not same + len(differ):
        return []
    return ["## Reproducibility", "",
            f"- {same} of {same + len(differ)} attacked cells repeat the unlearning run of their plain cell in "
            f"`{_rel(Path(plain_dir))}` (same spec without the attacks) to the last digit"
            + (f"; {absent} have no plain cell there" if absent else "") + (". These differ:" if differ else "."),
            *differ, ""]


def _torch_of(cell: dict) -> str:
    return (cell.get("manifest") or {}).get("versions", {}).get("torch") or "before manifests"


def _fmt_outcome(x) -> str:
    return "–" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))

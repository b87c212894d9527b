"""The robustness matrix of one run: every attack on the base and unlearned models, as rows.

`robustness(base, unlearned, tokenizer, forget, ...)` returns the rows (the agreed shape, see
grip_core/attacks/base.py); `save_robustness(run_dir, rows)` writes them to the run folder as
`robustness.json`, `load_robustness(run_dir)` reads them back (None when absent). A run's method and
GRIP mode come from its config.json; the matrix across runs (method x mode rows, attack columns)
is drawn by grip_core.viz.robustness.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from ..moe import MoEModel
from ..moe.errors import ConfigError, RunStoreError
from .base import ROW_KEYS, AttackConfig, AttackContext, attack_class, available_attacks

ROBUSTNESS_FILE = "robustness.json"


def split_forget(forget: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(relearning slice, the rest) of the forget set: `fraction` of it drawn by `random.Random(seed)`."""
    order = list(range(len(forget)))
    random.Random(seed).shuffle(order)
    n = max(1, round(fraction * len(forget))) if len(forget) > 1 else 0
    pick = set(order[:n])
    return [forget[i] for i in sorted(pick)], [ex for i, ex in enumerate(forget) if i not in pick]


def robustness(base: MoEModel, unlearned: MoEModel, tokenizer=None, forget: Sequence = (), *,
               related: Sequence = (), attacks: Sequence[str] | None = None,
               config: AttackConfig | None = None, progress=None) -> list[dict]:
    """Run `attacks` (default: all) against `unlearned` (and `base`), judged on the forget set minus the
    relearning slice; `related` = same-kind facts never in the forget set (relearn_related; e.g. the
    demo's holdout split). Both models are left exactly as they were. `progress(name)` is called before
    each attack.
    """
    config = config or AttackConfig()
    names = list(attacks) if attacks is not None else available_attacks()
    classes = {}
    for name in names:
        classes.setdefault(attack_class(name), []).append(name)       # unknown names fail here, before any work
    tokenizer = tokenizer if tokenizer is not None else unlearned.tokenizer
    qa = [ex for ex in forget if not getattr(ex, "is_text_only", False)]
    if len(qa) < 2:
        raise ConfigError(f"robustness needs at least 2 forget QA examples, got {len(qa)}")
    relearn_set, rest = split_forget(qa, config.relearn_fraction, config.seed)
    eval_set = rest[:config.eval_examples] if config.eval_examples else rest
    ctx = AttackContext(base, unlearned, tokenizer, eval_set, relearn_set,
                        [ex for ex in related if not getattr(ex, "is_text_only", False)], config)
    ctx.plain = {"base": ctx.probe(base), "unlearned": ctx.probe(unlearned)}
    ctx.unlearned_trace = ctx.trace(unlearned)
    rows: list[dict] = []
    for cls, wanted in classes.items():
        if progress:
            progress(", ".join(wanted))
        rows += cls().run(ctx, wanted)
    return rows


def check_rows(rows, where: str = "robustness rows") -> list[dict]:
    """The rows if each is a dict with exactly the agreed keys; RunStoreError naming `where` otherwise."""
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RunStoreError(f"{where}: expected a list of objects")
    for r in rows:
        if set(r) != set(ROW_KEYS):
            raise RunStoreError(f"{where}: a row has keys {sorted(r)}, expected {list(ROW_KEYS)}")
    return rows


def save_robustness(run_dir: str | Path, rows: list[dict]) -> Path:
    """Write `rows` to RUN_DIR/robustness.json (atomic); returns the path."""
    from ..runs.store import atomic_write_json

    path = Path(run_dir) / ROBUSTNESS_FILE
    atomic_write_json(path, check_rows(rows))
    return path


def load_robustness(run_dir: str | Path) -> list[dict] | None:
    """The rows of RUN_DIR/robustness.json, or None when the run has none."""
    path = Path(run_dir) / ROBUSTNESS_FILE
    if not path.is_file():
        return None
    try:
        return check_rows(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError) as exc:
        raise RunStoreError(f"{path}: unreadable ({exc})") from None

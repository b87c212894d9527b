"""UnlearningData: the forget / retain / holdout / paraphrase examples of one job."""
from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..data import QAExample, load_demo_world, read_qa_file
from ..moe.errors import ConfigError, GripStudioError


class DataOverlapError(GripStudioError, ValueError):
    """The forget and retain sets hold the same examples: unlearning one while keeping the other is meaningless."""


def _fact(ex: QAExample) -> tuple:
    return (ex.question.strip().lower(), ex.answer.strip().lower(), "" if ex.question else ex.text.strip().lower())


def file_record(path: str | Path, n_examples: int | None = None) -> dict:
    """{"path", "sha256", "examples"} of a data file, for the run's config.json."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    out = {"path": str(path.resolve()), "sha256": h.hexdigest()}
    if n_examples is not None:
        out["examples"] = n_examples
    return out


@dataclass
class UnlearningData:
    """Splits of one unlearning job.

    `retain_eval` is held out of training and of GRIP.fit: retained-routing stability is
    measured on it, so "stability" always means stability on UNSEEN retained inputs.
    """

    forget: list[QAExample]
    retain_train: list[QAExample]
    retain_eval: list[QAExample]
    holdout: list[QAExample] = field(default_factory=list)
    paraphrase_forget: list[QAExample] = field(default_factory=list)
    paraphrase_retain: list[QAExample] = field(default_factory=list)
    name: str = "custom"
    files: dict = field(default_factory=dict)        # custom data: split -> file_record(...)
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.forget:
            raise ConfigError(f"{self.name}: the forget set is empty")
        if not self.retain_train or not self.retain_eval:
            raise ConfigError(f"{self.name}: the retain set is empty (or too small to hold out an evaluation slice)")
        forget = {_fact(ex) for ex in self.forget}
        retain = {_fact(ex) for ex in self.retain_train + self.retain_eval}
        both = forget & retain
        where = f" ({self.files['forget']['path']} / {self.files['retain']['path']})" if {"forget", "retain"} <= set(self.files) else ""
        if forget == retain:
            raise DataOverlapError(f"{self.name}: the forget and retain sets hold the same {len(forget)} examples{where}; "
                                   "give different files")
        if both:
            msg = (f"{self.name}: {len(both)} of {len(forget)} forget examples are also in the retain set "
                   f"({len(retain)} examples){where}: those facts are both forgotten and kept")
            self.warnings.append(msg)
            warnings.warn(msg, stacklevel=3)

    @staticmethod
    def _split_retain(retain: list[QAExample], retain_eval_size: int, seed: int):
        order = list(range(len(retain)))
        random.Random(seed).shuffle(order)
        n = min(retain_eval_size, max(1, len(retain) // 4))
        return [retain[i] for i in order[n:]], [retain[i] for i in order[:n]]

    @classmethod
    def from_scenario(cls, scenario: str, seed: int = 0, retain_eval_size: int = 64) -> "UnlearningData":
        """The demo world's `entities` or `domain` scenario."""
        try:
            w = load_demo_world(scenario)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        train, held = cls._split_retain(list(w.retain), retain_eval_size, seed)
        return cls(list(w.forget), train, held, list(w.holdout), list(w.paraphrase_forget),
                   list(w.paraphrase_retain), name=scenario)

    @classmethod
    def from_files(cls, forget: str | Path, retain: str | Path, holdout: str | Path | None = None,
                   seed: int = 0, retain_eval_size: int = 64) -> "UnlearningData":
        """User files (JSONL / CSV / TOFU JSON with question + answer); `files` records their paths and hashes."""
        f_ex, r_ex = read_qa_file(forget), read_qa_file(retain)
        h_ex = read_qa_file(holdout) if holdout else []
        files = {"forget": file_record(forget, len(f_ex)), "retain": file_record(retain, len(r_ex))}
        if holdout:
            files["holdout"] = file_record(holdout, len(h_ex))
        train, held = cls._split_retain(r_ex, retain_eval_size, seed)
        return cls(f_ex, train, held, h_ex, name="custom", files=files)

    @classmethod
    def for_config(cls, config) -> "UnlearningData":
        """The data a RunConfig names: its demo scenario, or (scenario "custom") the files in `data_files`,
        which must still hash to what was recorded."""
        if config.scenario != "custom":
            return cls.from_scenario(config.scenario, seed=config.seed, retain_eval_size=config.eval_examples)
        files = config.data_files or {}
        if not isinstance(files, dict) or not all(isinstance(files.get(k), dict) and isinstance(files[k].get("path"), str)
                                                  for k in ("forget", "retain")):
            raise ConfigError('scenario "custom" needs data_files {"forget": {"path": ...}, "retain": {"path": ...}} '
                              "(or --forget-file / --retain-file)")
        for split, rec in files.items():
            if isinstance(rec, dict) and rec.get("sha256") and Path(rec["path"]).is_file():
                now = file_record(rec["path"])["sha256"]
                if now != rec["sha256"]:
                    raise ConfigError(f"{rec['path']}: the {split} file changed since the config was written "
                                      f"(sha256 {now[:12]}..., recorded {str(rec['sha256'])[:12]}...)")
        hold = files.get("holdout")
        return cls.from_files(files["forget"]["path"], files["retain"]["path"],
                              hold["path"] if isinstance(hold, dict) else None,
                              seed=config.seed, retain_eval_size=config.eval_examples)

    def splits(self) -> dict[str, list[QAExample]]:
        """The evaluation splits by name (empty ones left out)."""
        out = {"forget": self.forget, "retain": self.retain_eval, "holdout": self.holdout,
               "paraphrase_forget": self.paraphrase_forget, "paraphrase_retain": self.paraphrase_retain}
        return {k: v for k, v in out.items() if v}

"""UnlearningData: the forget / retain / holdout / paraphrase examples of one job."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..data import QAExample, load_demo_world, read_qa_file


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

    def __post_init__(self):
        if not self.forget:
            raise ValueError(f"{self.name}: the forget set is empty")
        if not self.retain_train or not self.retain_eval:
            raise ValueError(f"{self.name}: the retain set is empty (or too small to hold out an evaluation slice)")

    @staticmethod
    def _split_retain(retain: list[QAExample], retain_eval_size: int, seed: int):
        order = list(range(len(retain)))
        random.Random(seed).shuffle(order)
        n = min(retain_eval_size, max(1, len(retain) // 4))
        return [retain[i] for i in order[n:]], [retain[i] for i in order[:n]]

    @classmethod
    def from_scenario(cls, scenario: str, seed: int = 0, retain_eval_size: int = 64) -> "UnlearningData":
        """The demo world's `entities` or `domain` scenario."""
        w = load_demo_world(scenario)
        train, held = cls._split_retain(list(w.retain), retain_eval_size, seed)
        return cls(list(w.forget), train, held, list(w.holdout), list(w.paraphrase_forget),
                   list(w.paraphrase_retain), name=scenario)

    @classmethod
    def from_files(cls, forget: str | Path, retain: str | Path, holdout: str | Path | None = None,
                   seed: int = 0, retain_eval_size: int = 64) -> "UnlearningData":
        """User files (JSONL / CSV / TOFU JSON with question + answer)."""
        train, held = cls._split_retain(read_qa_file(retain), retain_eval_size, seed)
        return cls(read_qa_file(forget), train, held, read_qa_file(holdout) if holdout else [], name="custom")

    def splits(self) -> dict[str, list[QAExample]]:
        """The evaluation splits by name (empty ones left out)."""
        out = {"forget": self.forget, "retain": self.retain_eval, "holdout": self.holdout,
               "paraphrase_forget": self.paraphrase_forget, "paraphrase_retain": self.paraphrase_retain}
        return {k: v for k, v in out.items() if v}

"""The demo world's forgetting scenarios, read from the shipped JSONL files in data/world/.

Two scenarios (see data/world/README.md): `entities` (TOFU-like, all facts of ~10 % of the
entities across domains) and `domain` (WMDP-like, one whole domain). Both split the SAME
trained facts, so one demo model serves both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .._paths import WORLD_DIR  # data/world/ in a checkout, the packaged copy when installed
from .examples import DataFileError, QAExample, read_qa_file

SCENARIOS = ("entities", "domain")


@dataclass
class DemoSplits:
    """One scenario's splits. paraphrase_* hold the same facts as forget/retain, questions reworded."""
    scenario: str
    forget: list[QAExample] = field(default_factory=list)
    retain: list[QAExample] = field(default_factory=list)
    holdout: list[QAExample] = field(default_factory=list)      # same kind of facts, never trained
    paraphrase_forget: list[QAExample] = field(default_factory=list)
    paraphrase_retain: list[QAExample] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[QAExample]]:
        return {"forget": self.forget, "retain": self.retain, "holdout": self.holdout,
                "paraphrase_forget": self.paraphrase_forget, "paraphrase_retain": self.paraphrase_retain}

    @property
    def domains(self) -> list[str]:
        return sorted({ex.domain for ex in self.forget + self.retain})


def load_demo_world(scenario: str = "entities", root: str | Path | None = None) -> DemoSplits:
    """Read `{scenario}_{forget,retain,holdout,paraphrase}.jsonl` from `root` (default: data/world/)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown demo scenario {scenario!r}; expected one of {SCENARIOS}")
    root = Path(root) if root is not None else WORLD_DIR
    splits = DemoSplits(scenario)
    for name in ("forget", "retain", "holdout"):
        setattr(splits, name, read_qa_file(root / f"{scenario}_{name}.jsonl"))
    path = root / f"{scenario}_paraphrase.jsonl"
    for ex in read_qa_file(path):
        split = ex.meta.get("split")
        if split not in ("forget", "retain"):
            raise DataFileError(path, None, f"example {ex.id!r}: split must be 'forget' or 'retain', got {split!r}")
        (splits.paraphrase_forget if split == "forget" else splits.paraphrase_retain).append(ex)
    return splits

"""Paired forget/retain data for Trainer-style unlearning loops.

A `Trainer` draws ONE batch per micro-step, while unlearning losses take a forget AND a
retain batch. The field's answer (open-unlearning) is a dataset of pairs plus a collator
that encodes both halves; `compute_loss` then reads `inputs["forget"]`, `inputs["retain"]`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from torch.utils.data import IterableDataset

from ..data import QAExample, encode_qa
from ..runs.job import example_batches   # the runner's own sampler: same code, same order


class ForgetRetainStream(IterableDataset):
    """Endless {"forget": QAExample, "retain": QAExample} pairs, in run_unlearning's order.

    Why a stream and why this order: the runner draws forget batches from a stream seeded
    `seed` and retain batches from one seeded `seed + 1`, each reshuffled every epoch. Yielding
    the same examples one at a time means a Trainer with `per_device_train_batch_size ==
    batch_size` sees exactly the runner's batches, so the two give the same numbers. Being
    endless, the length comes from `TrainingArguments.max_steps` (as the runner's `steps`).
    """

    def __init__(self, forget: Sequence[QAExample], retain: Sequence[QAExample], batch_size: int, seed: int = 0):
        if not forget or not retain:
            raise ValueError("ForgetRetainStream needs non-empty forget and retain sets")
        self.forget, self.retain = list(forget), list(retain)
        self.batch_size, self.seed = batch_size, seed

    def __iter__(self) -> Iterator[dict]:
        forget = example_batches(self.forget, self.batch_size, self.seed)
        retain = example_batches(self.retain, self.batch_size, self.seed + 1)
        while True:
            yield from ({"forget": f, "retain": r} for f, r in zip(next(forget), next(retain)))


@dataclass
class QAPairCollator:
    """Pairs -> {"forget": batch, "retain": batch}, each from `encode_qa` (the runner's encoding).

    Needs `TrainingArguments(remove_unused_columns=False)`: otherwise the Trainer drops the
    "forget"/"retain" keys, which are not arguments of the model's forward.
    """

    tokenizer: object
    max_length: int = 64

    def __call__(self, pairs: list[dict]) -> dict:
        return {side: encode_qa(self.tokenizer, [p[side] for p in pairs], max_length=self.max_length)
                for side in ("forget", "retain")}

"""diagnose: a base and an unlearned checkpoint -> "did it forget, or just reroute?"

The verdict is built from the numbers only, by grip_core.runs.verdict (the same function the
Compare page, the CLI and the study use; rules in docs/method.md, "Verdicts"), so the same
report always says the same thing. The sharpest number is the router-restoration attack:
if putting the ORIGINAL routers back brings the forgotten answers back, the knowledge was
hidden behind the router, not erased.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..attacks.ledger import ledger_from_checkpoint, ledger_from_norms, update_ledger
from ..moe import MoEModel
from ..moe.errors import ModelLoadError
from ..moe.delta import apply_checkpoint, check_same_architecture
from .config import RunConfig
from .data import UnlearningData
from .evaluate import Baseline, evaluate_final
from .report import RunReport
from .verdict import verdict


# examples per split in a diagnosis's final probes (the CLI's --eval-examples, the dashboard's default): a sample,
# because generation is the cost at real width
DIAGNOSE_EXAMPLES = 200


@dataclass
class Diagnosis:
    report: RunReport     # evaluate_final's full report (+ `checkpoint` when streamed in place)
    verdict: str          # a kind of grip_core.runs.verdict ("rerouted", "erased", "mixed", ...)
    paragraph: str

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "paragraph": self.paragraph, **self.report.to_dict()}


def verdict_from(headline: dict) -> tuple[str, str]:
    """(verdict kind, paragraph) from a report's headline numbers: grip_core.runs.verdict, the one verdict."""
    v = verdict(headline)
    return v.kind, v.paragraph


def diagnose(base: MoEModel, unlearned: MoEModel | str | Path, data: UnlearningData, seed: int = 0,
             eval_examples: int = RunConfig.eval_examples, final_eval_examples: int = DIAGNOSE_EXAMPLES,
             max_length: int = RunConfig.max_length) -> Diagnosis:
    """Compare a base model with an unlearned checkpoint of the same architecture on forget/retain data.

    `unlearned` is either a checkpoint path (full, sharded, Hub or native layout, or a GRIP Studio
    delta) or a loaded MoEModel. With a path, the base is measured first, then the checkpoint's
    differing tensors are streamed INTO `base` (grip_core/moe/delta.py) and measured again: one
    model in memory. The restoration attack swaps router rows only.
    Probes use at most `final_eval_examples` examples per split (0 = all): generation is the cost;
    every probe, trace and attack keeps `max_length` tokens per example.

    Footgun: with a path, `base` holds the UNLEARNED weights afterwards (the report says what changed).
    """
    in_place = not isinstance(unlearned, MoEModel)
    if in_place:
        check_same_architecture(base, unlearned)           # config.json only: fail before the base is measured
    if not in_place and [l.router_weight.shape for l in base.layers] != [l.router_weight.shape for l in unlearned.layers]:
        raise ValueError("the base and unlearned models have different MoE router shapes: not the same architecture")
    config = RunConfig(seed=seed, eval_examples=eval_examples, final_eval_examples=final_eval_examples,
                       scenario=data.name, steps=0, max_length=max_length)
    baseline = Baseline.compute(base, data, config)
    applied = None
    if in_place:
        try:                                               # streamed, before the base's weights are replaced
            ledger = ledger_from_checkpoint(base, unlearned, chunk_bytes=4 << 20)   # small float64 slices: peak memory
        except ModelLoadError:                             # a Hub-layout checkpoint: per tensor, from the apply below
            ledger = None
        applied = apply_checkpoint(base, unlearned)
        ledger = ledger if ledger is not None else ledger_from_norms(applied.changed, base)
        report = evaluate_final(base, None, baseline, data, config)
        report.checkpoint = applied.to_dict()
    else:
        ledger = update_ledger(base, unlearned)
        report = evaluate_final(unlearned, base, baseline, data, config)
    report.ledger = ledger                                 # where the update landed
    verdict, paragraph = verdict_from(report.headline.to_dict())
    return Diagnosis(report, verdict, paragraph)

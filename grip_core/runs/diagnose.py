"""diagnose: a base and an unlearned checkpoint -> "did it forget, or just reroute?"

The verdict is built from the numbers only, with fixed thresholds written here, so the same
report always says the same thing. The sharpest number is the router-restoration attack:
if putting the ORIGINAL routers back brings the forgotten answers back, the knowledge was
hidden behind the router, not erased.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..moe import MoEModel
from ..moe.delta import apply_checkpoint
from .config import RunConfig
from .data import UnlearningData
from .evaluate import Baseline, evaluate_final

FORGOT_EM_DROP = 0.5        # forget EM fell by at least half of its base value: "it no longer answers"
REROUTED_RECOVERY = 0.5     # restoring the routers brings back >= 50 % of what was forgotten
ERASED_RECOVERY = 0.1       # ... <= 10 %: the routers are not what hides it
STABLE_RETAIN = 0.95        # the paper's bar for retained routing stability


@dataclass
class Diagnosis:
    report: dict          # evaluate_final's full report
    verdict: str          # "rerouted" | "erased" | "mixed" | "not forgotten"
    paragraph: str

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "paragraph": self.paragraph, **self.report}


def verdict_from(headline: dict) -> tuple[str, str]:
    """(verdict, one paragraph) from a report's headline numbers."""
    h = headline
    base_em, em = h["base_forget_em"] or 0.0, h["forget_em"] or 0.0
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f} %"
    facts = (f"Forget-set exact match went from {pct(base_em)} to {pct(em)}; retain from {pct(h['base_retain_em'])} "
             f"to {pct(h['retain_em'])}. Expert selection shifted on {pct(h['forget_shift'])} of forget-set routing "
             f"slots and {pct(h['retain_shift'])} of retained ones; {pct(h['retain_stability'])} of retained "
             f"(token, layer) top-k sets are unchanged ({pct(h['retain_stability_router_only'])} with only the new "
             f"routers, {pct(h['retain_stability_drift_only'])} with only the drifted router inputs). Putting the "
             f"original routers back gives {pct(h['restored_forget_em'])} forget exact match, recovering "
             f"{pct(h['restoration_recovered'])} of what was forgotten.")
    if base_em <= 0 or em > base_em * (1 - FORGOT_EM_DROP):
        return "not forgotten", facts + " The model still answers most of the forget set: it did not forget."
    rec = h["restoration_recovered"] or 0.0
    if rec >= REROUTED_RECOVERY:
        return "rerouted", facts + (" Verdict: REROUTED. The knowledge is still in the experts; the unlearning "
                                    "moved the routers so that forget tokens no longer reach it (superficial "
                                    "forgetting).")
    if rec <= ERASED_RECOVERY:
        tail = "" if (h["retain_stability"] or 0) >= STABLE_RETAIN else (
            " Retained routing moved noticeably, mostly through " +
            ("the routers." if (h["retain_stability_router_only"] or 1) < (h["retain_stability_drift_only"] or 1)
             else "drifting router inputs (attention, embeddings, earlier experts)."))
        return "erased", facts + " Verdict: ERASED from the model's weights as far as routing can tell: restoring " \
                                 "the original routers does not bring the answers back." + tail
    return "mixed", facts + " Verdict: MIXED. Part of the forgetting is undone by restoring the routers, part is not."


def diagnose(base: MoEModel, unlearned: MoEModel | str | Path, data: UnlearningData, seed: int = 0,
             eval_examples: int = 64, final_eval_examples: int = 200) -> Diagnosis:
    """Compare a base model with an unlearned checkpoint of the same architecture on forget/retain data.

    `unlearned` is either a checkpoint path (full, sharded, Hub or native layout, or a GRIP Studio
    delta) or a loaded MoEModel. With a path, the base is measured first, then the checkpoint's
    differing tensors are streamed INTO `base` (grip_core/moe/delta.py) and measured again: one
    model in memory. The restoration attack swaps router rows only.
    Probes use at most `final_eval_examples` examples per split (0 = all): generation is the cost.

    Footgun: with a path, `base` holds the UNLEARNED weights afterwards (the report says what changed).
    """
    in_place = not isinstance(unlearned, MoEModel)
    if not in_place and [l.router_weight.shape for l in base.layers] != [l.router_weight.shape for l in unlearned.layers]:
        raise ValueError("the base and unlearned models have different MoE router shapes: not the same architecture")
    config = RunConfig(seed=seed, eval_examples=eval_examples, final_eval_examples=final_eval_examples,
                       scenario=data.name, steps=0)
    baseline = Baseline.compute(base, data, config)
    applied = None
    if in_place:
        applied = apply_checkpoint(base, unlearned)
        report = evaluate_final(base, None, baseline, data, config)
        report["checkpoint"] = applied.to_dict()
    else:
        report = evaluate_final(unlearned, base, baseline, data, config)
    verdict, paragraph = verdict_from(report["headline"])
    return Diagnosis(report, verdict, paragraph)

"""What a job measures: a few numbers every N steps, and the full forgot-or-rerouted report at the end.

Everything here is computed from the base model (once, in `Baseline`) and the model being
unlearned, through grip_core.metrics. The final report is a RunReport (grip_core/runs/report.py),
whose `to_dict()` the run store writes; the per-step rows are plain dicts with the keys in STEP_EVAL_KEYS.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..data import encode_qa
from ..metrics import (ProbeResult, compare_traces, exact_match_accuracy, full_router_state,
                       router_restoration_attack, routing_shift_attribution, run_probes)
from ..moe import MoEModel, RoutingTrace
from .report import GripRanks, Headline, RunReport, parse


def _cap(examples: list, n: int) -> list:
    return examples[:n] if n else examples


def _trace(moe: MoEModel, examples, max_length: int, keep_inputs: bool) -> RoutingTrace:
    batches = [encode_qa(moe.tokenizer, examples[i:i + 64], max_length=max_length)
               for i in range(0, len(examples), 64)]
    return moe.trace(batches, keep_inputs=keep_inputs)


@dataclass
class Baseline:
    """The base model's side of every comparison, computed once and shared by many jobs.

    Holds the base routers (the restoration attack puts them back), the base traces of the
    retained-evaluation and forget sets WITH router inputs (attribution needs them), and the
    base probes.
    """

    router_state: dict[str, torch.Tensor]       # moe.router_state(): weights (+ logit biases)
    full_routers: dict[str, torch.Tensor]       # every router tensor incl. selection-bias buffers
    retain_trace: RoutingTrace
    forget_trace: RoutingTrace
    step_forget: list                           # the per-step forget probe subset
    step_em: dict[str, float]                   # base EM on the per-step probe subsets
    probes: dict                                # base probes on the final splits (ProbeResult.to_dict())
    max_length: int
    # GRIP fits of the base model on the retain split, by (GRIPConfig.fit_key(), fit examples, max_length):
    # jobs sharing this Baseline fit once (run_unlearning fills and reads it; states are copied, never shared)
    grip_fits: dict = field(default_factory=dict)

    @classmethod
    @torch.no_grad()
    def compute(cls, moe: MoEModel, data, config) -> "Baseline":
        n = config.eval_examples
        step_forget = data.forget[:n]
        final = {k: _cap(v, config.final_eval_examples) for k, v in data.splits().items()}
        return cls(
            router_state=moe.router_state(), full_routers=full_router_state(moe),
            retain_trace=_trace(moe, data.retain_eval, config.max_length, keep_inputs=True),
            forget_trace=_trace(moe, _cap(data.forget, config.final_eval_examples), config.max_length, True),
            step_forget=step_forget,
            step_em={"forget_em": exact_match_accuracy(moe, step_forget),
                     "retain_em": exact_match_accuracy(moe, data.retain_eval)},
            probes=run_probes(moe, final, max_length=config.max_length).to_dict(), max_length=config.max_length)


# the keys evaluate_step adds to a step row (metrics.jsonl), read by the training curves (grip_core.viz.runs)
STEP_EVAL_KEYS = ("retain_stability", "forget_shift", "forget_em", "retain_em")


@torch.no_grad()
def evaluate_step(work: MoEModel, baseline: Baseline, data, config) -> dict:
    """Cheap numbers for the live curves: retained stability, forget shift, forget/retain EM (STEP_EVAL_KEYS)."""
    retain = compare_traces(baseline.retain_trace, _trace(work, data.retain_eval, config.max_length, False))
    forget_trace = _trace(work, _cap(data.forget, config.final_eval_examples), config.max_length, False)
    forget = compare_traces(baseline.forget_trace, forget_trace)
    return {"retain_stability": retain.stability, "forget_shift": forget.shift,
            "forget_em": exact_match_accuracy(work, baseline.step_forget),
            "retain_em": exact_match_accuracy(work, data.retain_eval)}


@torch.no_grad()
def evaluate_final(work: MoEModel, base: MoEModel | None, baseline: Baseline, data, config, grip=None) -> RunReport:
    """The full report: probes, routing (retain + forget), attribution, restoration attack, GRIP ranks.

    Everything about the base model comes from `baseline`; `base` is only asked for its router
    MODULES (attribution calls them with swapped-in weights), so `base=None` uses `work`'s, and a
    checkpoint diagnosed in place (grip_core/runs/diagnose.py) needs one model in memory.
    Probes, traces and the restoration attack all keep `baseline.max_length` tokens per example.
    """
    base = work if base is None else base
    max_length = baseline.max_length
    final = {k: _cap(v, config.final_eval_examples) for k, v in data.splits().items()}
    probes = run_probes(work, final, max_length=max_length)
    base_probes = parse(ProbeResult, baseline.probes, "Baseline.probes")
    new_retain = _trace(work, data.retain_eval, max_length, keep_inputs=True)
    new_forget = _trace(work, final["forget"], max_length, keep_inputs=True)
    routing_retain = compare_traces(baseline.retain_trace, new_retain)
    routing_forget = compare_traces(baseline.forget_trace, new_forget)
    attr_retain = routing_shift_attribution(base, baseline.full_routers, work, baseline.retain_trace, new_retain)
    attr_forget = routing_shift_attribution(base, baseline.full_routers, work, baseline.forget_trace, new_forget)
    restoration = router_restoration_attack(work, baseline.router_state, final["forget"],
                                            em_base=base_probes.splits["forget"].exact_match, max_length=max_length)
    em = lambda p, s: p.splits[s].exact_match if s in p.splits else None
    headline = Headline(
        forget_em=em(probes, "forget"), retain_em=em(probes, "retain"), holdout_em=em(probes, "holdout"),
        paraphrase_forget_em=em(probes, "paraphrase_forget"),
        base_forget_em=em(base_probes, "forget"), base_retain_em=em(base_probes, "retain"),
        membership_auc=probes.membership_auc, base_membership_auc=base_probes.membership_auc,
        retain_stability=routing_retain.stability, retain_stability_router_only=attr_retain.stability_router_only,
        retain_stability_drift_only=attr_retain.stability_drift_only,
        forget_shift=routing_forget.shift, retain_shift=routing_retain.shift,
        forget_shift_router_share=attr_forget.router_share,
        restoration_recovered=restoration.recovered, restoration_recovered_raw=restoration.recovered_raw,
        restored_forget_em=restoration.em_restored)
    return RunReport(headline=headline, probes=probes, base_probes=base_probes,
                     routing_retain=routing_retain, routing_forget=routing_forget,
                     attribution_retain=attr_retain, attribution_forget=attr_forget, restoration=restoration,
                     grip=grip_rank_report(grip) if grip is not None and grip.config.mode != "off" else None)


def grip_rank_report(grip) -> GripRanks:
    """Null-space rank per layer x expert (d' - rank(U_j)), the mean free dimensions per layer, and d'."""
    return GripRanks(mode=grip.config.mode, threshold_kind=grip.config.threshold_kind,
                     eps_null=float(grip.config.eps_null), energy=float(grip.config.energy),
                     dim=int(max(st.input_dim for st in grip.state.layers)),
                     null_space_rank=grip.null_space_rank.tolist(), mean_free_dims=grip.mean_free_dims.tolist(),
                     layers=[l.index for l in grip.moe.layers])


def grip_step_row(stats) -> dict:
    """The per-step log fields of one GRIPStepStats (means over layers; the same keys in every mode)."""
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0
    return {"grip_removed": mean(stats.removed), "grip_leak": mean(stats.leak),
            "grip_alpha_min": min(stats.alpha_min) if stats.alpha_min else 1.0,
            "grip_ms": stats.t_project_ms + stats.t_margin_ms + stats.t_drift_ms,
            "grip_drift_ms": stats.t_drift_ms}

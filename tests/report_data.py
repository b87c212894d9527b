"""Complete RunReports with chosen numbers, for the tests of code that READS reports (tables, sentences, figures).

The numbers are the caller's; the types are the real ones (grip_core.runs.report and the metrics' result
dataclasses), so a report built here parses, saves and loads like one evaluate_final wrote. Tests of the
code that WRITES reports run the demo model instead (tests/test_report.py).
"""
from __future__ import annotations

from grip_core.metrics.attacks import RestorationResult
from grip_core.metrics.attribution import AttributionResult, LayerAttribution
from grip_core.metrics.probes import ProbeResult, SplitProbe
from grip_core.metrics.routing import LayerRouting, RoutingComparison
from grip_core.runs.report import Headline, RunReport


def _routing(stability: float, shift: float, freq_change: list[float], layer: int = 0) -> RoutingComparison:
    base = [1.0 / len(freq_change)] * len(freq_change)
    row = LayerRouting(layer=layer, num_tokens=100, num_experts=len(freq_change), top_k=1, stability=stability,
                       overlap=1 - shift, jaccard=1 - shift, shift=shift, freq_kl=0.0, entropy_base=1.0,
                       entropy_new=1.0, freq_base=base, freq_new=[b + c for b, c in zip(base, freq_change)],
                       freq_change=list(freq_change))
    return RoutingComparison(layers=[row], stability=stability, overlap=1 - shift, jaccard=1 - shift, shift=shift,
                             freq_kl=0.0, entropy_base=1.0, entropy_new=1.0, num_tokens=100)


def _attribution(actual: float, router_only: float, drift_only: float, layer: int = 0) -> AttributionResult:
    shift = 1 - actual
    router = ((1 - router_only) + (shift - (1 - drift_only))) / 2
    drift = shift - router
    shares = (router / shift, drift / shift) if shift > 0 else (None, None)
    row = LayerAttribution(layer=layer, num_tokens=100, stability_actual=actual, stability_router_only=router_only,
                           stability_drift_only=drift_only, shift_actual=shift, router_contribution=router,
                           drift_contribution=drift, router_share=shares[0], drift_share=shares[1],
                           trace_agreement_base=1.0, trace_agreement_new=1.0)
    return AttributionResult(layers=[row], stability_actual=actual, stability_router_only=router_only,
                             stability_drift_only=drift_only, shift_actual=shift, router_contribution=router,
                             drift_contribution=drift, router_share=shares[0], drift_share=shares[1], num_tokens=100)


def _probes(forget_em, retain_em, auc=None) -> ProbeResult:
    split = lambda em: SplitProbe(n=10, exact_match=em, mean_nll=1.0, mean_prob=0.4)
    return ProbeResult(splits={"forget": split(forget_em), "retain": split(retain_em)}, membership_auc=auc,
                       membership_pair=("forget", "holdout") if auc is not None else None)


def make_report(**headline) -> RunReport:
    """A RunReport whose detail blocks agree with `headline` (Headline fields; missing ones are None)."""
    h = Headline(**headline)
    num = lambda v, d: d if v is None else v
    f, bf = num(h.forget_em, 0.0), num(h.base_forget_em, 1.0)
    restored = num(h.restored_forget_em, f + num(h.restoration_recovered, 0.0) * (bf - f))
    raw = (restored - f) / max(bf - f, 1e-9)
    stab, fshift = num(h.retain_stability, 1.0), num(h.forget_shift, 0.0)
    return RunReport(
        headline=h, probes=_probes(h.forget_em, h.retain_em, h.membership_auc),
        base_probes=_probes(h.base_forget_em, h.base_retain_em, h.base_membership_auc),
        routing_retain=_routing(stab, 1 - stab, [0.01, -0.01]),
        routing_forget=_routing(1 - fshift, fshift, [0.2, -0.2]),
        attribution_retain=_attribution(stab, num(h.retain_stability_router_only, stab),
                                        num(h.retain_stability_drift_only, 1.0)),
        attribution_forget=_attribution(1 - fshift, 1 - fshift, 1.0),
        restoration=RestorationResult(split="forget", n=10, em_base=bf, em_unlearned=f, em_restored=restored,
                                      forgotten=bf - f, recovered_raw=raw, recovered=min(1.0, max(0.0, raw)),
                                      nll_unlearned=2.0, nll_restored=1.0))

"""Metrics: routing from traces, attribution of routing shift, knowledge probes, attacks, ablation.

Every result is a dataclass with `.to_dict()` (JSON-able) for the run store and grip_core.viz.
"""
from .ablation import AblationTable, ablate_experts, ablation_table, expert_slices, experts_by_label
from .attacks import (RestorationResult, TransplantResult, load_router_state, router_restoration_attack,
                      router_transplant, swapped_routers, with_routers)
from .attribution import (AttributionResult, LayerAttribution, attribute_models, full_router_state,
                          routing_shift_attribution, select_with)
from .probes import (ProbeResult, SplitProbe, answer_nll, exact_match_accuracy, greedy_predictions, membership_auc,
                     paraphrased, run_probes)
from .routing import (KL_PSEUDO_COUNT, LabelExpertMatrix, LabelExpertNMI, LayerRouting, RoutingComparison,
                      compare_traces, domain_expert_nmi, expert_by_label_matrix, load_entropy, load_kl,
                      set_agreement, slot_counts, token_labels, top1_expert)

__all__ = ["AblationTable", "ablate_experts", "ablation_table", "expert_slices", "experts_by_label",
           "RestorationResult", "TransplantResult", "load_router_state", "router_restoration_attack",
           "router_transplant", "swapped_routers", "with_routers", "AttributionResult", "LayerAttribution", "attribute_models",
           "full_router_state", "routing_shift_attribution", "select_with", "ProbeResult", "SplitProbe",
           "answer_nll", "exact_match_accuracy", "greedy_predictions", "membership_auc", "paraphrased", "run_probes",
           "KL_PSEUDO_COUNT", "LabelExpertMatrix", "LabelExpertNMI", "LayerRouting", "RoutingComparison",
           "compare_traces", "domain_expert_nmi", "expert_by_label_matrix", "load_entropy", "load_kl",
           "set_agreement", "slot_counts", "token_labels", "top1_expert"]

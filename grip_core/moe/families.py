"""The one table of per-family router quirks.

Every transformers MoE family returns routing a little differently. Rather than
`if family == ...` chains spread over the code, each family is one `FamilySpec`
row here, and discovery/tracing read the row. A model type that is not in the
table falls back to `GENERIC`, which accepts any `*TopKRouter` returning
(logits, weights, indices) and refuses everything else loudly.

Footguns, written down:
- Llama4's router returns (scores, logits), the reverse of everyone else, and its
  scores are E-wide with exactly 0 for experts that were not selected.
- DeepSeek-V3 / GLM4-MoE / dots1 choose experts with sigmoid(logits) + a bias
  buffer (`e_score_correction_bias`) inside groups; the bias moves selection but
  not the mixing weights. Selection must be read from the returned indices.
- HunYuan keeps its router weight in a child `nn.Linear` (`wg.weight`).
- PhiMoE adds jitter noise in training mode: trace in eval mode.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    router_class: str = r"Top[Kk]Router$"     # regex on the router module's class name
    output: str = "logits_weights_indices"    # or "scores_logits" (Llama4)
    score_fn: str = "softmax"                 # softmax | sigmoid | sparsemixer | unknown
    weight_attr: str = "weight"               # dotted path from the router to its weight
    selection_bias_attr: str | None = None    # dotted path to a selection-only bias
    shared_expert_attrs: tuple[str, ...] = field(default_factory=tuple)
    selection: str = "logit"                  # selection rule kind (grip_core/moe/selection.py): "logit" =
                                              # top-k of the logits; "sigmoid_bias" = top-k of sigmoid + bias
    group_attrs: tuple[str, str] | None = None  # router attributes (num groups, groups kept): grouped top-k
    tested: str = ""                          # how the test suite checks it (README table)

    def matches_router(self, class_name: str) -> bool:
        return re.search(self.router_class, class_name) is not None

    @property
    def grouped_topk(self) -> bool:
        """Top-k inside the best groups of experts (DeepSeek-V3)."""
        return self.group_attrs is not None


_DEEPSEEK_LIKE = dict(score_fn="sigmoid", selection_bias_attr="e_score_correction_bias", selection="sigmoid_bias",
                      shared_expert_attrs=("shared_experts",), group_attrs=("num_group", "topk_group"))

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("Mixtral", ("mixtral",), tested="tiny random, trace == router_logits"),
    FamilySpec("Qwen2-MoE", ("qwen2_moe",), shared_expert_attrs=("shared_expert",),
               tested="tiny random, shared expert"),
    FamilySpec("Qwen3-MoE", ("qwen3_moe",), tested="tiny random"),
    FamilySpec("OLMoE", ("olmoe",), tested="tiny random + the demo model"),
    FamilySpec("DeepSeek-V3", ("deepseek_v3",), router_class=r"TopkRouter$", **_DEEPSEEK_LIKE,
               tested="tiny random, sigmoid, grouped top-k, nonzero selection bias"),
    FamilySpec("GLM4-MoE", ("glm4_moe",), router_class=r"TopkRouter$", **_DEEPSEEK_LIKE,
               tested="tiny random, selection bias"),
    FamilySpec("dots1", ("dots1",), router_class=r"TopkRouter$", **_DEEPSEEK_LIKE,
               tested="tiny random, selection bias"),
    FamilySpec("GPT-OSS", ("gpt_oss",), tested="tiny random, router bias"),
    FamilySpec("GraniteMoE", ("granitemoe",), tested="tiny random"),
    FamilySpec("GraniteMoE-Shared", ("granitemoeshared",), shared_expert_attrs=("shared_mlp",),
               tested="tiny random, shared expert"),
    FamilySpec("PhiMoE", ("phimoe",), score_fn="sparsemixer", tested="tiny random"),
    FamilySpec("Llama4", ("llama4_text", "llama4"), router_class=r"Router$", output="scores_logits",
               score_fn="sigmoid", shared_expert_attrs=("shared_expert",),
               tested="tiny random, (scores, logits) output, shared expert"),
    FamilySpec("MiniMax", ("minimax",), tested="tiny random"),
    FamilySpec("HunYuan-MoE-V1", ("hunyuan_v1_moe",), router_class=r"MoEV1Gate$", weight_attr="wg.weight",
               tested="tiny random, router weight in a child Linear"),
    FamilySpec("ERNIE-4.5-MoE", ("ernie4_5_moe",), selection_bias_attr="moe_statics.e_score_correction_bias",
               shared_expert_attrs=("shared_experts",), tested="tiny random, selection bias"),
)

GENERIC = FamilySpec("generic", (), tested="")


def family_for(model_type: str | None) -> FamilySpec:
    """The table row for a config's `model_type`, or the GENERIC fallback."""
    for spec in FAMILIES:
        if model_type in spec.model_types:
            return spec
    return GENERIC


def get_attr_path(obj, path: str):
    """`get_attr_path(router, "wg.weight")` -> router.wg.weight (None where absent)."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj

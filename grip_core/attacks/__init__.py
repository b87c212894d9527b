"""Attacks on unlearning: did the model really forget? And where did the update land?

One attack = one module here behind `@register_attack(...)` (like grip_core/methods/): restoration,
expert forcing, relearning (router / full / related), quantization (INT8 / NF4 / INT4), paraphrases.
`robustness(...)` runs them on a base + unlearned pair and returns rows of the agreed shape;
`update_ledger(...)` (ledger.py) says where ‖ΔΘ‖ went, by parameter group.
"""
from .base import (ROW_KEYS, Attack, AttackConfig, AttackContext, Probe, attack_class, available_attacks,
                   recovered, register_attack, slot_shift)
# registration order = the matrix's column order
from .restoration import Restoration  # noqa: E402,I001
from .forcing import ExpertForcing, forced_experts  # noqa: E402
from .relearn import Relearning, relearned  # noqa: E402
from .quantize import Quantization, quantized, round_trip  # noqa: E402
from .paraphrase import Paraphrase  # noqa: E402
from .ledger import (GROUPS, LEDGER_FILE, ledger_from_checkpoint, ledger_from_deltas, ledger_summary,  # noqa: E402
                     load_ledger, save_ledger, update_ledger)
from .robustness import ROBUSTNESS_FILE, load_robustness, robustness, save_robustness, split_forget  # noqa: E402

__all__ = ["ROW_KEYS", "Attack", "AttackConfig", "AttackContext", "Probe", "attack_class", "available_attacks",
           "recovered", "register_attack", "slot_shift", "Restoration", "ExpertForcing", "Relearning", "Quantization",
           "Paraphrase", "forced_experts", "GROUPS", "LEDGER_FILE", "ledger_from_checkpoint", "ledger_from_deltas",
           "ledger_summary",
           "load_ledger", "save_ledger", "update_ledger", "quantized", "round_trip", "relearned",
           "ROBUSTNESS_FILE", "load_robustness", "robustness", "save_robustness", "split_forget"]

"""Unlearning methods, one file each, found by name through a registry.

Adding a method = adding one module here that decorates its class with
`@register_method("name")`: every module of this package is imported below.
"""

import importlib
import pkgutil

from .base import (
    Batch,
    MethodArgs,
    MethodLoss,
    UnlearningMethod,
    answer_nll,
    available_methods,
    forward_logits,
    get_method,
    method_class,
    reduce_nll,
    register_method,
    sequence_logprob,
    token_nll,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from .ga import GA, GAArgs  # noqa: E402  (re-exported for typed configs)
from .graddiff import GradDiff, GradDiffArgs  # noqa: E402
from .npo import NPO, NPOArgs  # noqa: E402
from .rmu import RMU, RMUArgs  # noqa: E402
from .simnpo import SimNPO, SimNPOArgs  # noqa: E402

__all__ = [
    "Batch", "MethodArgs", "MethodLoss", "UnlearningMethod", "answer_nll", "available_methods", "forward_logits",
    "get_method", "method_class", "reduce_nll", "register_method", "sequence_logprob", "token_nll",
    "GA", "GAArgs", "GradDiff", "GradDiffArgs", "NPO", "NPOArgs", "RMU", "RMUArgs", "SimNPO", "SimNPOArgs",
]

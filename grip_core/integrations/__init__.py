"""GRIP in training loops GRIP Studio does not own.

Plain PyTorch needs nothing from here: `optimizer = grip.wrap(optimizer)` is the whole
integration. This package adds the Hugging Face `Trainer` form (`GRIPCallback`) and the
paired forget/retain data pieces a Trainer-based unlearning loop needs.
"""
from .data import ForgetRetainStream, QAPairCollator
from .trainer import GRIPCallback, check_trainer_supported, innermost_optimizer

__all__ = ["ForgetRetainStream", "QAPairCollator", "GRIPCallback", "check_trainer_supported", "innermost_optimizer"]

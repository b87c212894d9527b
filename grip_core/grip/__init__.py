"""GRIP: keep retained expert selection stable while any unlearning method trains (docs/method.md#grip).

    grip = GRIP.fit(moe, retain_batches, GRIPConfig())
    optimizer = grip.wrap(optimizer)   # the canonical idiom; then loss.backward(); optimizer.step()
"""
from .adapter import GRIP, GRIPStepStats
from .config import GRIPConfig
from .fit import GRIPState, LayerStats, fit_retain_statistics

__all__ = ["GRIP", "GRIPConfig", "GRIPState", "GRIPStepStats", "LayerStats", "fit_retain_statistics"]

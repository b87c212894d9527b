"""The one way GRIP Studio writes a fraction as a percentage: in tables, sentences and verdicts.

Tables (grip_core.viz.percent_strings), the Compare sentence, the Diagnose verdict and the
CLI all call `pct`, so a number reads the same everywhere: 0.9961 is "99.6 %" in the table
AND in the sentence next to it. Pure Python (no torch, no plotly, no streamlit).
"""
from __future__ import annotations

import math

PCT_DIGITS = 1   # one decimal: "99.6 %"; the tables and the verdict sentences use the same


def pct(x: float | None, digits: int = PCT_DIGITS, missing: str = "n/a") -> str:
    """0.9961 -> '99.6 %'; None / NaN / inf -> `missing` ('n/a' in sentences, '—' in tables)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return missing
    if not math.isfinite(v):
        return missing
    return f"{100 * v:.{digits}f} %"

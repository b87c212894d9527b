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


def mean_sd(values, digits: int = 3, missing: str = "–") -> str:
    """A column of numbers as one unbreakable "mean±sd" table entry: [0.01, 0.09] -> '0.050±0.040'.

    Whole numbers (or means above 5, e.g. steps, seconds) get no decimals; one value, or no spread,
    gives the mean alone; None entries are left out and counted: '0.050 (2/3)'.
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return missing
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / len(vals)) if len(vals) > 1 else 0.0
    d = 0 if m > 5 or all(float(v).is_integer() and v > 1 for v in vals) else digits
    out = f"{m:.{d}f}" + (f"±{sd:.{d}f}" if round(sd, d) else "")
    return out + ("" if len(vals) == len(values) else f" ({len(vals)}/{len(values)})")

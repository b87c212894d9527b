"""THE verdict: did an unlearned MoE forget, only reroute, or break? One function, used everywhere.

Compare (grip_core.viz.report), Diagnose (grip_core.runs.diagnose, the dashboard page), the CLI
and the study (grip_core.runs.study) all call `verdict(headline)`, so the same numbers always
get the same words. The rules and thresholds are written out in docs/method.md ("Verdicts");
the constants below are the only place they live.

`headline` is a report's `headline` dict (grip_core.runs.evaluate.evaluate_final) or any dict
with the same keys (a study cell, a mean over seeds). Missing numbers are allowed: a rule that
needs a missing number is skipped, and the sentence says "n/a" for it.

Pure Python: no torch, no streamlit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal, Mapping, get_args

from ..fmt import pct

VerdictKind = Literal["cannot diagnose", "collapsed", "not forgotten", "rerouted", "mixed", "partially erased",
                      "erased"]
KINDS: tuple[str, ...] = get_args(VerdictKind)

# ----------------------------------------------------------------------------- the thresholds (docs/method.md)
BASE_KNOWS_MIN = 0.20      # the base model must answer >= 20 % of the forget set exactly, else there is nothing
#                            to forget and no forgetting to measure ("cannot diagnose"); twice FORGET_TARGET, so
#                            reaching the target is a real drop, not noise around an unknown set
FORGET_TARGET = 0.10       # forget EM must fall BELOW this for "erased" (the study's stopping rule too)
FORGOT_EM_DROP = 0.5       # "it forgot": forget EM fell by at least half of the base's (or below FORGET_TARGET)
REROUTED_RECOVERY = 0.5    # restoring the original routers brings back >= 50 % of what was forgotten: rerouted
ERASED_RECOVERY = 0.10     # ... <= 10 %: the routers are not what hides it (erased); in between: mixed
STABLE_RETAIN = 0.95       # the GRIP paper's bar for retained routing stability (named in every sentence)
RETAIN_COLLAPSE = 0.5      # retain EM below half of the base's: the run destroyed the model ("collapsed")


def _num(x) -> float | None:
    """x as a finite float, or None (None / NaN / inf / not a number)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Verdict:
    """One verdict: its `kind`, the `sentence` that states it with its trade-off, and the numbers it used."""

    kind: VerdictKind
    sentence: str                                  # the verdict with forget EM, retain EM, stability, restoration
    numbers: dict = field(default_factory=dict)    # every number the rules read (None = missing)
    forget_target: float = FORGET_TARGET
    retain_collapsed: bool = False                 # retain EM < RETAIN_COLLAPSE x base (also set on "rerouted")
    details: str = ""                              # routing detail (shifts, router-only / drift-only stability)

    @property
    def title(self) -> str:
        """"REROUTED", "PARTIALLY ERASED", ... (the headline word)."""
        return self.kind.upper()

    @property
    def paragraph(self) -> str:
        """The sentence followed by the routing details (Diagnose, the CLI)."""
        return f"{self.sentence} {self.details}".strip()

    def to_dict(self) -> dict:
        return {**asdict(self), "title": self.title}


def base_knowledge_warning(base_forget_em: float | None, n: int | None = None) -> str | None:
    """A warning when the base model does not know the forget set (None when it does, or is not measured).

    For the upload / Diagnose page: call it with the base model's exact match on the forget set
    before the (slow) diagnosis; the verdict would be "cannot diagnose".
    """
    em = _num(base_forget_em)
    if em is None or em >= BASE_KNOWS_MIN:
        return None
    on = f" on {n} questions" if n else ""
    return (f"The base model answers only {pct(em)} of the forget set exactly{on} (a diagnosis needs at least "
            f"{pct(BASE_KNOWS_MIN)}): it never knew these facts, so there is nothing to forget and no forgetting "
            "to measure. Check that the forget set matches the base model (same facts, same answer format).")


def _details(n: dict) -> str:
    """Routing numbers that support the verdict (not part of the rules)."""
    out = ""
    if n.get("restored_forget_em") is not None:
        out += f"With the original routers put back, forget EM is {pct(n['restored_forget_em'])}. "
    if all(n.get(k) is None for k in ("forget_shift", "retain_stability_router_only", "retain_stability_drift_only")):
        return out.strip()
    out += (f"Expert selection shifted on {pct(n['forget_shift'])} of forget-set routing slots and "
           f"{pct(n['retain_shift'])} of retained ones; {pct(n['retain_stability'])} of retained (token, layer) "
           f"top-k sets are unchanged ({pct(n['retain_stability_router_only'])} with only the new routers, "
           f"{pct(n['retain_stability_drift_only'])} with only the drifted router inputs).")
    stab, ro, do = n["retain_stability"], n["retain_stability_router_only"], n["retain_stability_drift_only"]
    if stab is not None and stab < STABLE_RETAIN and ro is not None and do is not None:
        out += (" Retained routing moved mostly through " +
                ("the routers." if ro < do else "drifting router inputs (attention, embeddings, earlier experts)."))
    return out


def verdict(headline: Mapping, *, forget_target: float = FORGET_TARGET) -> Verdict:
    """The verdict for a report's headline numbers. Rules, in order (docs/method.md, "Verdicts"):

    1. cannot diagnose: no forget EM, or the base answers < BASE_KNOWS_MIN of the forget set.
    2. forgot := forget EM <= (1 - FORGOT_EM_DROP) x base forget EM, or forget EM < forget_target
       (no base number: only the target counts).
    3. rerouted: forgot and restoration recovers >= REROUTED_RECOVERY (even when retain EM collapsed:
       then the sentence says the rerouting was not selective).
    4. collapsed: retain EM < RETAIN_COLLAPSE x base retain EM (the model was destroyed, not unlearned).
    5. not forgotten: not forgot.
    6. cannot diagnose: it forgot but the restoration attack was not run (erased vs rerouted cannot be told).
    7. mixed: restoration recovers more than ERASED_RECOVERY (and less than REROUTED_RECOVERY).
    8. erased if forget EM < forget_target, else partially erased.
    """
    keys = ("base_forget_em", "forget_em", "base_retain_em", "retain_em", "retain_stability",
            "restoration_recovered", "forget_shift", "retain_shift", "retain_stability_router_only",
            "retain_stability_drift_only", "restored_forget_em")
    n = {k: _num(headline.get(k)) for k in keys}
    bf, f, br, r = n["base_forget_em"], n["forget_em"], n["base_retain_em"], n["retain_em"]
    stab, rec = n["retain_stability"], n["restoration_recovered"]
    target = float(forget_target)

    fem = f"forget EM {pct(bf)} → {pct(f)}"
    rem = f"retain EM {pct(br)} → {pct(r)}"
    bar = "" if stab is None else (" (meets the " if stab >= STABLE_RETAIN else " (below the ") + \
        f"{pct(STABLE_RETAIN)} bar)"
    stability = f"retained routing stability {pct(stab)}{bar}"
    restoration = f"restoring the original routers brings back {pct(rec)} of the forgotten answers"
    collapsed = r is not None and br is not None and r < RETAIN_COLLAPSE * br
    details = _details(n)

    def out(kind: VerdictKind, sentence: str) -> Verdict:
        return Verdict(kind, sentence, n, target, collapsed, details)

    if f is None:
        return out("cannot diagnose", f"Cannot diagnose: the report has no forget-set exact match ({rem}, "
                                      f"{stability}).")
    if bf is not None and bf < BASE_KNOWS_MIN:
        return out("cannot diagnose", f"Cannot diagnose: the base model answers only {pct(bf)} of the forget set "
                                      f"(at least {pct(BASE_KNOWS_MIN)} needed), so it never knew what was to be "
                                      f"forgotten and {fem} measures nothing; {rem}, {stability}.")
    forgot = f < target or (bf is not None and f <= (1 - FORGOT_EM_DROP) * bf)
    if forgot and rec is not None and rec >= REROUTED_RECOVERY:
        partial = "" if f < target else f" (still at or above the {pct(target)} target)"
        shift = "" if n["forget_shift"] is None else \
            f"; expert selection shifted on {pct(n['forget_shift'])} of forget-set routing slots"
        blunt = (f" Not selective either: {rem}, so retained answers were rerouted away too; {stability}."
                 if collapsed else f" Cost: {rem}, {stability}.")
        return out("rerouted", f"Rerouted, not erased: {fem}{partial}, but {restoration}{shift}. The knowledge is "
                               f"still in the experts; the unlearning moved the routers so that forget tokens no "
                               f"longer reach it (superficial forgetting).{blunt}")
    if collapsed:
        return out("collapsed", f"Collapsed: the run destroyed the model rather than unlearning it — {rem} (below "
                                f"{pct(RETAIN_COLLAPSE)} of the base's), so {fem} says nothing about selective "
                                f"forgetting; {stability}, {restoration}.")
    if not forgot:
        why = (f"did not fall to half the base's or below the {pct(target)} target, so the model still answers "
               f"most of the forget set" if bf is not None else
               f"did not fall below the {pct(target)} target (and without the base's forget EM no drop can be "
               f"shown)")
        return out("not forgotten", f"Not forgotten: {fem} {why}; {rem}, {stability}.")
    if rec is None:
        return out("cannot diagnose", f"Cannot tell erased from rerouted: {fem}, but the report has no "
                                      f"router-restoration attack; {rem}, {stability}.")
    if rec > ERASED_RECOVERY:
        return out("mixed", f"Mixed: {fem}, and {restoration} — part of the forgetting is rerouting, part is "
                            f"erased; {rem}, {stability}.")
    if f < target:
        return out("erased", f"Erased: {fem} (below the {pct(target)} target) and {restoration}, so the knowledge "
                             f"left the weights rather than hiding behind the routers; cost: {rem}, {stability}.")
    return out("partially erased", f"Partially erased: {fem}, still at or above the {pct(target)} target; what "
                                   f"was forgotten is erased ({restoration}); {rem}, {stability}.")

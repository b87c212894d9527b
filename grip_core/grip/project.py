"""The projection math of GRIP (docs/method.md#grip), vectorised over the E experts of a layer.

Notation, per MoE layer: E experts, d' = router input width (d, or d + 1 when the router
has a bias), M stored margin rows. A router update is u (E, d'): row j changes expert j's
score on input x by u_jᵀx.

Router bias (GPT-OSS): the logits are Θx + b. GRIP works on the augmented router
[Θ | b] (E, d+1) and augmented inputs x̃ = [x, 1], so "u_jᵀx̃ = 0" is exactly "the score
Θ_jx + b_j does not move": the bias is constrained together with the weight, not ignored.
When the bias does not train, the adapter uses the d-dim statistics instead (a nonzero
bias component of P(u) could not be written back).

Constraint 1 (equality):  u_j ← u_j − U_j(U_jᵀu_j)             U_j (d', r_j) orthonormal.
Constraint 2 (margin):    lo_ij ≤ u_jᵀx_i ≤ hi_ij  for non-selected j on stored rows i,
                          with lo ≤ 0 ≤ hi always, so u = 0 is always feasible.
"""
from __future__ import annotations

import torch

from ..moe.selection import SelectionRule

_INF = float("inf")
GROUP_TIE = 1e-6   # choice-score gap below which a grouped-top-k row is treated as a tie (frozen)


def augment(x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """x (N, d) -> (N, d + 1) with a trailing 1 where the router has a bias (see module doc)."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if has_bias else x


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def bounds_logit(l: torch.Tensor, selected: torch.Tensor, sel: torch.Tensor, rule: SelectionRule, eps: float,
                 hold_selected: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """"logit" rules (top-k of the logits): hi = max(τ − ε, 0), τ = the margin to the weakest selected expert.

    l (M, E) float64 reference scores. lo is None (−inf everywhere) unless hold_selected: then the row's
    smallest margin is split, β = max(τ_min − ε, 0)/2: selected experts may fall by at most β and
    non-selected ones rise by at most max(τ − ε − β, 0), so the top-k still holds.
    """
    hi = l.gather(1, selected.long()).amin(1, keepdim=True) - l - eps        # (M, E); min over the k selected
    if not hold_selected:
        return None, hi.clamp_min_(0.0).masked_fill_(sel, _INF)
    beta = 0.5 * hi.masked_fill(sel, _INF).amin(1, keepdim=True).clamp_min(0)   # (M, 1)
    lo = (-beta).expand_as(hi).where(sel, torch.full_like(hi, -_INF))
    return lo, (hi - beta).clamp_min_(0.0).masked_fill_(sel, _INF)


def bounds_sigmoid_bias(l: torch.Tensor, selected: torch.Tensor, sel: torch.Tensor, rule: SelectionRule, eps: float,
                        hold_selected: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """"sigmoid_bias" rules: the margin is taken in choice-score space c = sigmoid(l) + b and mapped EXACTLY
    back to logit space (sigmoid is monotone): c_j' ≤ m ⇔ l_j' ≤ logit(m − b_j); ε is then applied in logit
    space. Grouped top-k adds a sufficient condition: with Γ the gap between the last chosen and the first
    unchosen group score and δ = Γ/5, experts of unchosen groups may rise by at most δ and non-selected
    experts of chosen groups may fall by at most δ (in c), so no group score crosses (each moves ≤ 2δ).
    δ = Γ/5, not Γ/4, so the gap stays strictly positive (≥ Γ/5) when steps are chained. Rows whose group
    gap is a tie (< GROUP_TIE) are frozen. hold_selected is not supported (selected experts get ±inf).
    """
    M, E = l.shape
    b = rule.selection_bias.to(l).reshape(1, E)                              # (1, E)
    p = torch.sigmoid(l)
    c = p + b                                                                # (M, E) choice scores
    m = c.masked_fill(~sel, _INF).amin(1, keepdim=True)
    q = m - b                                                                # j ties m where sigmoid = q
    hi = torch.where(q >= 1, _INF, torch.where(q <= 0, 0.0, _logit(q.clamp(1e-300, 1)) - l - eps))
    lo = torch.full_like(l, -_INF)
    if rule.grouped:
        G, tk = rule.num_group, rule.topk_group
        gsz = E // G
        gs = c.view(M, G, gsz).topk(min(2, gsz), dim=-1).values.sum(-1)      # (M, G) group scores
        top = gs.topk(tk + 1, dim=-1)                                        # sorted, descending
        chosen_g = torch.zeros(M, G, dtype=torch.bool, device=l.device).scatter_(1, top.indices[:, :tk], True)
        chosen = chosen_g.repeat_interleave(gsz, dim=1)                      # (M, E)
        gap = top.values[:, tk - 1] - top.values[:, tk]                      # (M,)
        ok = (gap > GROUP_TIE) & (sel & ~chosen).sum(1).eq(0)                # rows we can reason about
        delta = (0.2 * gap).where(ok, torch.zeros_like(gap)).unsqueeze(1)
        up = torch.where(p + delta >= 1, _INF, _logit((p + delta).clamp(max=1 - 1e-16)) - l)
        down = torch.where(p - delta <= 0, -_INF, _logit((p - delta).clamp(min=1e-300)) - l)
        hi = torch.where(chosen, hi, up)
        lo = torch.where(chosen, down, lo)
        hi = torch.where(ok.unsqueeze(1), hi, 0.0)                           # ties: freeze the row
        lo = torch.where(ok.unsqueeze(1), lo, 0.0)
    return lo.clamp_max(0.0).masked_fill(sel, -_INF), hi.clamp_min(0.0).masked_fill(sel, _INF)


BOUNDS = {"logit": bounds_logit, "sigmoid_bias": bounds_sigmoid_bias}   # one function per SelectionRule kind


def margin_bounds(logits: torch.Tensor, selected: torch.Tensor, rule: SelectionRule, eps: float,
                  hold_selected: bool = False, sel: torch.Tensor | None = None,
                  lo_none: bool = False, cols: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Bounds (lo, hi), each (M, E) float32, on the logit change u_jᵀx_i that keep row i's top-k.

    logits (M, E) reference scores, selected (M, k) the reference top-k. Selected experts get
    (−inf, +inf) (constraint 1 holds them) unless hold_selected (relative threshold, where constraint 1
    is approximate; "logit" rules only). The rule's kind picks its function in BOUNDS (see each).
    sel (optional): the (M, E) bool mask of `selected`, for callers that cache it (it is constant per row).
    lo_none: return lo = None where it is −inf everywhere (the α-scaling then skips the lower test).
    cols (optional, long (C,)): the bounds of these experts only, (M, C).
    """
    l = logits.double()                                                      # (M, E)
    if sel is None:
        sel = torch.zeros(l.shape, dtype=torch.bool, device=l.device).scatter_(1, selected.long(), True)
    lo, hi = BOUNDS[rule.kind](l, selected, sel, rule, eps, hold_selected and rule.kind == "logit")
    if cols is not None:
        lo, hi = (None if lo is None else lo[:, cols]), hi[:, cols]
    if lo is None and not lo_none:
        lo = torch.full_like(hi, -_INF)
    return (None if lo is None else lo.float()), hi.float()


def threshold_ranks(evals: torch.Tensor, kind: str, eps_null: float, energy: float) -> torch.Tensor:
    """evals (..., d') eigenvalues σ² in DESCENDING order -> (...,) long rank r_j kept.

    absolute: #{σ² > eps_null}.  relative: the fewest leading directions whose σ² sum reaches
    `energy` of the total, never counting numerically-zero directions.
    """
    if kind == "absolute":
        return (evals > eps_null).sum(-1)
    ev = evals.clamp_min(0)
    total = ev.sum(-1, keepdim=True)
    r = (ev.cumsum(-1) < energy * total).sum(-1) + 1
    numerical = (ev > ev[..., :1] * ev.shape[-1] * 1e-13).sum(-1)
    return torch.where(total.squeeze(-1) > 0, torch.minimum(r, numerical), torch.zeros_like(r))


def project_equality(U: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u (E, d') -> u − U(Uᵀu) row by row; U (E, d', r_max), zero columns past each r_j."""
    if U.shape[-1] == 0:
        return u
    # Row-vector products (1 x d')(d' x r) then (1 x r)(r x d'): the same math as U(Uᵀu), but CPU bmm
    # streams U row-major this way; the column form (U @ (Uᵀ @ u[:, :, None])) is 5-10x slower on CPU.
    c = torch.bmm(u.unsqueeze(1), U)                                         # (E, 1, r) = (U_jᵀu_j)ᵀ
    return u - torch.bmm(c, U.transpose(1, 2)).squeeze(1)


def alpha_scale(V: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor,
                slack: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Largest α_j ∈ [0, 1] with lo ≤ αV ≤ hi on every row (rows off by ≤ slack count as met).

    V, lo, hi (M, E): V_ij = u_jᵀx_i. Because lo ≤ 0 ≤ hi, each violated row gives α ≤ bound/V,
    and α = 0 is always feasible. lo=None means no lower bound (−inf everywhere). Returns (E,).
    """
    if V.shape[0] == 0:
        return V.new_ones(V.shape[1])
    over = V > (hi if isinstance(slack, float) and slack == 0.0 else hi + slack)
    ratio = torch.where(over, hi / V, _INF)                                  # where() drops the unused quotients
    if lo is not None:
        under = V < lo - slack
        ratio = torch.where(under, lo / V, ratio)
    return ratio.amin(0).clamp(0.0, 1.0)


def alpha_logit_rows(ST: torch.Tensor, selected: torch.Tensor, selT: torch.Tensor, cols: torch.Tensor,
                     VT: torch.Tensor, eps: float) -> torch.Tensor:
    """α-scaling for "logit" rules (hold_selected off) in expert-major layout: the adapter's per-step fast path.

    ST (E, M) scores before the step, selected (M, k), selT (E, M) bool mask of it, cols (C,) long the
    experts that move, VT (C, M) = their u_jᵀx_i. Same numbers as alpha_scale(VT.T, None, margin_bounds(..)[1][:, cols])
    but every operand is a contiguous block of rows (column slices of (M, E) tensors are strided gathers on CPU).
    Returns α (C,).
    """
    m = ST.gather(0, selected.T.long()).amin(0, keepdim=True)               # (1, M) weakest selected score
    hi = (m - ST[cols] - eps).clamp_min_(0.0).masked_fill_(selT[cols], _INF)   # (C, M)
    return torch.where(VT > hi, hi / VT, _INF).amin(1).clamp(0.0, 1.0)


def margin_scale(u: torch.Tensor, X: torch.Tensor, lo: torch.Tensor | None,
                 hi: torch.Tensor, V: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form α-scaling: one (M, d') @ (d', E) product. Returns (α u, α (E,)).

    V (optional): X @ u.T already computed by the caller (the adapter fuses it with the scores' product).
    Scaling keeps constraint 1 (α P u is still in the null space), so no re-projection.
    """
    alpha = alpha_scale(X @ u.T if V is None else V, lo, hi)
    return u * alpha.unsqueeze(1), alpha


def margin_kaczmarz(u: torch.Tensor, X: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, U: torch.Tensor,
                    iters: int, generator: torch.Generator | None = None,
                    tol: float = 1e-6, XT: torch.Tensor | None = None,
                    frozen: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Randomized Kaczmarz on the violated margins, all E rows at once. Returns (u, α (E,), iterations).

    Each iteration every expert j samples one violated row i (∝ ‖x_i‖²) and projects u_j onto
    that half-space INSIDE its null space: with x̂ = P_j x_i, u_j ← u_j − (viol/‖x̂‖²) x̂ moves
    u_jᵀx_i exactly onto the bound and keeps u_jᵀX_j = 0. After ≤ `iters` iterations: re-project
    with P_j (rounding) and α-scale (the guard), so the result is feasible even at the cap.
    A row counts as violated only beyond tol·‖x_i‖·‖u_j‖ (float rounding is not a violation); the
    guard allows 10·tol, so rounding left by the loop and the re-projection never zeroes a row.
    XT (optional): X.T (a view is fine); (u @ XT).T is the same product as X @ u.T, 2-3x faster on CPU
    (the (E, d')(d', M) form streams X once per row of u; the (M, d')(d', E) form is a skinny-output GEMM).
    frozen (optional, (E,) bool): experts whose null space is EMPTY (r_j = d'); computed from U if None.
    Such a row can never move (P_j x̂ = 0, every step is masked), so its violations do not keep the loop
    running: before, one frozen expert with a rounding-level u and a near-tie row (bound 0) held every
    step at the iteration cap. The re-projection and the α-guard below treat it exactly as before.
    """
    E, M = u.shape[0], X.shape[0]
    scores = (lambda v: (v @ XT).T) if XT is not None else (lambda v: X @ v.T)
    if frozen is None:
        frozen = (U.abs().amax(1) > 0).sum(1) >= U.shape[1] if U.shape[-1] else torch.zeros(E, dtype=torch.bool,
                                                                                              device=u.device)
    movable = ~frozen.to(u.device).unsqueeze(0)                              # (1, E)
    w = X.pow(2).sum(1)                                                      # (M,)
    tx = tol * w.sqrt().unsqueeze(1)                                         # (M, 1)
    cols = torch.arange(E, device=u.device)
    it = 0
    for it in range(1, iters + 1):
        V = scores(u)                                                        # (M, E)
        viol = (V - hi).clamp_min(0) - (lo - V).clamp_min(0)                 # signed overshoot; inf bounds give 0
        bad_all = viol.abs() > tx * u.norm(dim=1)                            # (M, E) beyond rounding
        bad = bad_all & movable
        if not bool(bad.any()):
            if bool(bad_all.any()):
                # only frozen rows are left: the loop used to spin to the cap drawing E numbers an iteration;
                # draw them (cheap) so seeded runs keep the random stream, hence the numbers, they had before
                torch.rand((iters - it + 1) * E, generator=generator, device=u.device)
            it -= 1
            break
        cdf = (bad * w.unsqueeze(1)).cumsum(0)                               # (M, E) ∝ ‖x_i‖² over violated rows
        r = torch.rand(E, generator=generator, device=u.device) * cdf[-1]    # inverse-CDF sampling (multinomial
        rows = (cdf <= r).sum(0).clamp_max(M - 1)                            # costs ~0.3 ms a call on CPU)
        xh = project_equality(U, X[rows])                                    # (E, d') rows in each null space
        n2 = xh.pow(2).sum(1)
        step = viol[rows, cols] / n2.clamp_min(1e-30)                        # 0 for experts with no violation
        u = u - (step * (n2 > 1e-12 * w[rows])).unsqueeze(1) * xh
    u = project_equality(U, u)
    alpha = alpha_scale(scores(u), lo, hi, 10 * tx * u.norm(dim=1))      # guard: 10x looser than the loop
    return u * alpha.unsqueeze(1), alpha, it


def ridge_solve(theta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, tt: float, lam: float,
                form: str) -> tuple[torch.Tensor, float, float]:
    """Closed-form ridge correction from streamed sufficient statistics (float64).

    theta (E, d') current router Θ̃, A = Σ_n t_n x̃_nᵀ (E, d') with t_n = ΘX_n the ORIGINAL scores,
    B = Σ_n x̃_n x̃_nᵀ (d', d'), tt = Σ_n ‖t_n‖². Returns (Θ̃ + Δ, cos before, cos after), cos
    between the stacked original scores ΘX and the scores on the new inputs (Frobenius).
    """
    R = B + lam * torch.eye(B.shape[0], dtype=B.dtype, device=B.device)
    rhs = A if form == "paper" else A - theta @ B                            # (E, d')
    try:
        sol = torch.linalg.solve(R, rhs.T).T                                 # rhs R⁻¹ (R symmetric)
    except RuntimeError:                                                     # singular (λ = 0)
        sol = rhs @ torch.linalg.pinv(R, hermitian=True)
    new = sol if form == "paper" else theta + sol

    def cos(th: torch.Tensor) -> float:
        den = (tt * ((th @ B) * th).sum()).clamp_min(1e-300).sqrt()
        return float((th * A).sum() / den)

    return new, cos(theta), cos(new)

"""Fitting GRIP's retained statistics in ONE streaming pass (docs/method.md#grip).

Per MoE layer and expert j we accumulate the Gram matrix G_j = X_j X_jᵀ (d' x d', float64)
of the retained router inputs whose ORIGINAL top-k contains j, so memory grows with
E·d'², never with the number of tokens. After the pass, eigh(G_j) gives σ² and the left
singular vectors of X_j; U_j keeps those the threshold admits and is stored low-rank
(d' x r_j), never as a d' x d' projector. The eigh is the cost at real width (d' 2048: 64 of them a layer);
`fit_solver="auto"` runs it in float32 wherever the spectrum certifies float64's rank and span, and on
the model's GPU when there is one (benchmarks/bench_fit_real_width.py). Alongside, bounded samples are kept:
- margin rows: up to `max_margin_rows` tokens per layer (reservoir sample, seeded), with
  their original logits and selection, for constraint 2;
- the probe: the first batches up to `probe_tokens` tokens, with their original scores, for
  the ridge correction and drift-aware GRIP.

Footguns:
- Padding is excluded (the trace drops pad rows); every real token counts, prompt included.
- Selection-only biases (DeepSeek-V3's e_score_correction_bias) are SNAPSHOT at fit time;
  if a load balancer later moves them, refit.
- The selection rule (grip_core/moe/selection.py) comes from the family table via
  MoELayer.selection_rule(); softmax + selection bias (ERNIE-4.5) is approximate (a warning says so).
- Memory: L·E·d'²·8 bytes of Grams while fitting in one pass (OLMoE-1B-7B: 34 GB). With
  `fit_layers_per_pass=n` the batches are streamed ceil(L/n) times and only n layers' Grams
  live at once (OLMoE, n=1: 2.1 GB); the batches must then be re-iterable (a generator is
  materialised into a list). Every pass draws the same reservoir keys, so the margin rows are
  the same tokens in every layer, as in one pass. `basis_dtype="float16"` halves the stored U_j.
- Several processes (`reduce=`, see `FitAccumulators`): each process streams its own shard of
  the retain set; the hook sums Grams / counts and merges the samples across processes before
  the eigendecomposition (grip_core/runs/distributed.py, docs/distributed.md).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields

import torch

from .config import GRIPConfig
from ..moe.selection import SelectionRule
from .project import augment, threshold_ranks


@dataclass
class LayerStats:
    """GRIP's statistics for one MoE layer (CPU tensors). d' = hidden_size + has_bias."""

    layer_index: int                        # decoder layer index
    num_experts: int                        # E
    top_k: int                              # k
    hidden_size: int                        # d
    has_bias: bool                          # router adds a bias: inputs are augmented with a 1
    basis: list[torch.Tensor]               # E x (d', r_j) float32: U_j, kept directions of X_j
    spectrum: torch.Tensor                  # (E, d') float64: σ² of X_j, descending
    basis_weight: list[torch.Tensor] | None  # E x (d, r_j): U_j without the bias coordinate (bias frozen)
    spectrum_weight: torch.Tensor | None    # (E, d)
    tokens_per_expert: torch.Tensor         # (E,) long
    margin_x: torch.Tensor                  # (M, d') float32 retained inputs (augmented)
    margin_logits: torch.Tensor             # (M, E) float32 reference scores on them
    margin_selected: torch.Tensor           # (M, k) long reference top-k
    theta0: torch.Tensor                    # (E, d') float32 original router [Θ | b]
    rule: SelectionRule
    selection_agreement: float              # fraction of rows where the rule reproduces the router's top-k

    @property
    def input_dim(self) -> int:
        return self.hidden_size + int(self.has_bias)

    @property
    def ranks(self) -> torch.Tensor:
        return torch.tensor([b.shape[1] for b in self.basis], dtype=torch.long)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["rule"] = asdict(self.rule)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        return cls(**{**d, "rule": SelectionRule(**d["rule"])})


@dataclass
class GRIPState:
    """Everything GRIP fitted: save/load with torch.save (plain tensors and lists)."""

    config: dict
    layers: list[LayerStats]
    probe_batches: list[dict]               # {"input_ids", "attention_mask"} (B, T) CPU, in order
    probe_logits: list[torch.Tensor]        # L x (Np, E) original scores of the probe's real tokens
    probe_selected: list[torch.Tensor]      # L x (Np, k) original top-k
    num_tokens: int                         # retained real tokens seen by the fit
    fit_seconds: float
    accumulator_bytes: int                  # peak size of the Gram accumulators (independent of tokens)
    fit_solvers: dict = field(default_factory=dict)  # experts by eigh solver (see eig_basis); {} in older saves

    @property
    def null_space_rank(self) -> torch.Tensor:
        """(L, E) long: free dimensions d' − r_j of each router row (d' counts the bias coordinate)."""
        return torch.stack([l.input_dim - l.ranks for l in self.layers])

    @property
    def mean_free_dims(self) -> torch.Tensor:
        """(L,) float: mean null-space rank per layer (docs/method.md#null-space-rank)."""
        return self.null_space_rank.float().mean(1)

    def rank_table(self, kind: str, value: float) -> torch.Tensor:
        """(L, E) ranks another threshold WOULD keep (absolute: value = eps_null, relative: energy)."""
        return torch.stack([threshold_ranks(l.spectrum, kind, value, value) for l in self.layers])

    def nbytes(self) -> int:
        """Bytes of tensors held (bounded by the caps, not by the retain set's size)."""
        ts = [t for l in self.layers for t in (*l.basis, *(l.basis_weight or []), l.spectrum, l.margin_x,
                                               l.margin_logits, l.margin_selected, l.theta0)]
        ts += [t for b in self.probe_batches for t in b.values()] + self.probe_logits + self.probe_selected
        return sum(t.numel() * t.element_size() for t in ts)

    def save(self, path) -> None:
        torch.save({**{f.name: getattr(self, f.name) for f in fields(self)},
                    "layers": [l.to_dict() for l in self.layers]}, path)

    @classmethod
    def load(cls, path) -> "GRIPState":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(**{**data, "layers": [LayerStats.from_dict(d) for d in data["layers"]]})


def router_matrix(layer, with_bias: bool | None = None) -> torch.Tensor:
    """(E, d') float32 copy of [Θ | b] (just Θ when the router has no bias or with_bias=False)."""
    W = layer.router_weight.detach().float()
    b = layer.router_bias
    if b is None or with_bias is False:
        return W.clone()
    return torch.cat([W, b.detach().float().reshape(-1, 1)], dim=1)


# ---- the eigendecomposition of each expert's Gram (GRIPConfig.fit_solver) -------------------------------
# float32 eigh error, in units of eps32·σ²_max: |λ32 − λ64| measured ≤ 4 on d' 512–2048 Grams (low rank + a
# noise floor, and full rank with outlier features); 16 leaves a 4x margin. Weyl: every float64 eigenvalue
# lies within tol of its float32 twin, so a float32 eigenvalue farther than tol from the threshold is on the
# same side of it in both paths.
F32_EIG_TOL = 16.0
MAX_SPAN_ANGLE = 1e-3       # a float32 span is kept only if Davis-Kahan bounds its angle to float64's by this
# the float64 check that no eigenvalue inside the float32 error band exceeds eps_null (block Lanczos, see
# _complement_max_below): Krylov blocks of CERT_BLOCK random vectors, CERT_STEPS blocks, accept at (1 - δ)·eps
CERT_BLOCK, CERT_STEPS, CERT_DELTA = 16, 12, 0.1
AUTO_MIN_DIM = 512           # below this width float64 eigh is cheaper than float32's checks (measured at d' 128)


def _eigh_float64(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g (d', d') -> (σ² (d',) float64 descending, eigenvectors (d', d') float64): the reference path."""
    evals, evecs = torch.linalg.eigh(g.double())                             # ascending
    return evals.flip(-1), evecs.flip(-1)


def _complement_max_below(g: torch.Tensor, Q: torch.Tensor, bound: float, gen: torch.Generator) -> bool:
    """True if λ_max(P G P) ≤ bound, P = I − QQᵀ (g (d', d') float64, Q (d', r) orthonormal float64).

    By min-max, λ_{r+1}(G) ≤ λ_max(P G P): so True proves that G has at most r eigenvalues above `bound`.
    Small complements (dimension ≤ 2·CERT_BLOCK·CERT_STEPS) are checked exactly (dense eigvalsh). Larger ones
    by block Lanczos in float64 from CERT_BLOCK random starts (CERT_STEPS blocks, full reorthogonalisation):
    its largest Ritz value θ never exceeds λ_max, and we accept only θ ≤ (1 − δ)·bound. Kuczyński and
    Woźniakowski (1992): one Lanczos run of q steps from a uniform random start has
    P(θ < (1 − δ)λ_max) ≤ 1.648·√d'·exp(−(2q − 1)√δ); the block Krylov space holds each of its b starts'
    single-vector spaces, so a wrong acceptance has probability ≤ that^b (d' 2048, q 12, δ 0.1, b 16: 3e-21).
    Written by hand: torch.lobpcg and scipy's ARPACK report convergence, not this bound.
    """
    d, r = g.shape[0], Q.shape[1]
    proj = (lambda v: v - Q @ (Q.T @ v)) if r else (lambda v: v)
    if d - r <= 2 * CERT_BLOCK * CERT_STEPS:
        return bool(torch.linalg.eigvalsh(proj(proj(g).T)).max() <= bound)  # P G P, exactly
    blocks, images = [], []
    X = torch.linalg.qr(proj(torch.randn(d, CERT_BLOCK, generator=gen, dtype=torch.float64).to(g.device)))[0]
    for _ in range(CERT_STEPS):
        blocks.append(X)
        W = proj(g @ X)                                                      # (d', b) = P G P X (X ⟂ Q)
        images.append(W)
        K = torch.cat(blocks, 1)
        for _ in range(2):                                                   # twice is enough (Kahan)
            W = proj(W - K @ (K.T @ W))
        X = torch.linalg.qr(W)[0]
    K, AK = torch.cat(blocks, 1), torch.cat(images, 1)                       # (d', q·b) orthonormal, P G P K
    T = K.T @ AK
    theta = float(torch.linalg.eigvalsh(0.5 * (T + T.T)).max())
    return theta <= (1.0 - CERT_DELTA) * bound


def _eigh_float32_certified(g: torch.Tensor, config: GRIPConfig, gen: torch.Generator):
    """g (d', d') float64 -> (U (d', r), σ² (d',) descending, kind) from a float32 eigh, or None where float32
    cannot certify float64's rank and span (then the caller runs _eigh_float64). kind: "float32", or
    "float32_checked" where the float64 refinement and complement check were needed.

    Rank: tol = F32_EIG_TOL·eps32·σ²_max bounds every eigenvalue's error (Weyl).
      absolute: r = #{λ32 > eps + tol}. If no λ32 lies within tol of eps, r is float64's rank. Otherwise
        (typical: a noise floor far below eps but below the float32 resolution of a large σ²_max) the top-r
        span is refined by one float64 subspace-iteration step (Q = orth(G V_r)) and _complement_max_below
        proves λ_{r+1}(G) ≤ eps; λ_r(G) > eps holds by Weyl. The Ritz values of Q replace the top r of σ².
      relative: partial sums S_i of the top-i eigenvalues move by ≤ i·tol (Ky Fan); the total is trace(G) in
        float64. r is kept only if the energy cut and the numerical-rank cut are decided with that margin.
    Span: sin∠(U32, U64) ≤ ‖E‖ / gap (Davis-Kahan), with ‖E‖ ≤ tol and gap = λ_r − λ_{r+1} bounded from the
      float32 eigenvalues (or, after refinement, from the residual ‖GQ − QB‖ / (λ_min(B) − eps)); the span is
      kept only if that bound is ≤ MAX_SPAN_ANGLE.

    Footguns:
    - The returned σ² beyond the certified rank is float32-accurate (±tol), not float64's.
    - tol is an empirical constant times the float32 unit roundoff (LAPACK's bound has a p(d') factor that is
      far too pessimistic to be useful); F32_EIG_TOL holds a 4x margin over what was measured.
    """
    d = g.shape[0]
    lam, V = torch.linalg.eigh(g.float())
    lam, V = lam.double().flip(-1), V.flip(-1)                               # (d',), (d', d') descending
    tol = F32_EIG_TOL * torch.finfo(torch.float32).eps * max(float(lam[0]), 0.0)
    ev = lam.clamp_min(0)

    def span_ok(r: int, gap: float) -> bool:
        return r in (0, d) or (gap > 0 and tol / gap <= MAX_SPAN_ANGLE)

    if config.threshold_kind == "absolute":
        eps = config.eps_null
        r = int((lam > eps + tol).sum())
        unsure = int((lam > eps - tol).sum()) - r                            # float32 cannot say which side
        if unsure == 0:
            gap = (float(lam[r - 1]) - tol) - (float(lam[r]) + tol) if 0 < r < d else 0.0
            return (V[:, :r], lam, "float32") if span_ok(r, gap) else None
        if 2 * r > d:                                                        # refinement would cost a float64 eigh
            return None
        if r:
            Q = torch.linalg.qr(g @ V[:, :r].double())[0]                    # one float64 subspace-iteration step
            GQ = g @ Q
            B = Q.T @ GQ
            ritz, W = torch.linalg.eigh(0.5 * (B + B.T))
            ritz, W = ritz.flip(-1), W.flip(-1)
            gap = float(ritz[-1]) - eps
            res = float(torch.linalg.matrix_norm(GQ - Q @ B))              # Frobenius ≥ spectral: conservative
            if gap <= 0 or res / gap > MAX_SPAN_ANGLE:
                return None
            Q = Q @ W                                                        # Ritz vectors, descending
        else:
            Q, ritz = g.new_zeros(d, 0), lam[:0]
        if not _complement_max_below(g, Q, eps, gen):
            return None
        spectrum = torch.cat([ritz, lam[r:]])
        return Q, spectrum, "float32_checked"

    total = float(torch.diagonal(g).sum())                                   # trace(G) = ‖X_j‖²_F, float64
    if total <= 0:
        return V[:, :0], lam, "float32"
    cum = ev.cumsum(0)
    target = config.energy * total
    r = min(int((cum < target).sum()) + 1, d)
    # S_{r-1} < target ≤ S_r in float64 too: Ky Fan moves S_i by ≤ i·tol (and the clamp at 0 by ≤ tol each)
    below = r == 1 or float(cum[r - 2]) + 2 * (r - 1) * tol < target
    above = r == d or float(cum[r - 1]) - 2 * r * tol >= target
    # threshold_ranks' numerical cut (λ_i > λ_1·d'·1e-13) must not bind at r, in float64 too
    numerical = float(lam[r - 1]) - tol > (float(lam[0]) + tol) * d * 1e-13
    if not (below and above and numerical and config.energy < 1.0):
        return None
    gap = (float(lam[r - 1]) - tol) - (float(lam[r]) + tol) if r < d else 0.0
    return (V[:, :r], lam, "float32") if span_ok(r, gap) else None


def eig_basis(gram: torch.Tensor, config: GRIPConfig, device: torch.device | str | None = None,
              report: dict | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """gram (E, d', d') float64 -> (E x U_j (d', r_j) in config.basis_dtype, σ² (E, d') descending), on CPU.

    One expert at a time: the peak on top of the Grams is ONE d' x d' eigenvector matrix, not E.
    config.fit_solver "auto": float32 eigh where certified (_eigh_float32_certified) and d' ≥ AUTO_MIN_DIM, else float64;
    "float64": float64 eigh always. `device` (e.g. the model's CUDA device) runs the eigh there.
    `report` (optional dict) counts experts by solver: {"float32": n, "float32_checked": n, "float64": n}.
    """
    dtype = getattr(torch, config.basis_dtype)
    basis, spectrum = [], []
    gen = torch.Generator().manual_seed(config.seed)
    for j in range(gram.shape[0]):
        g = gram[j].to(device) if device is not None else gram[j]
        auto = config.fit_solver == "auto" and g.shape[0] >= AUTO_MIN_DIM
        out = _eigh_float32_certified(g, config, gen) if auto else None
        if out is None:
            evals, evecs = _eigh_float64(g)
            r = int(threshold_ranks(evals, config.threshold_kind, config.eps_null, config.energy))
            out = (evecs[:, :r], evals, "float64")
            del evecs
        U, evals, kind = out
        if report is not None:
            report[kind] = report.get(kind, 0) + 1
        basis.append(U.to("cpu", dtype).contiguous())
        spectrum.append(evals.to("cpu", torch.float64))
        del out, U
    return basis, torch.stack(spectrum)


def accumulate_gram(gram: torch.Tensor, x: torch.Tensor, chosen: torch.Tensor) -> None:
    """gram (E, d', d') += X_jᵀX_j per expert; x (n, d') float64, chosen (n, E) bool.

    One matmul per expert over its own tokens: cost k·n·d'², not E·n·d'².
    """
    for j in range(gram.shape[0]):
        xj = x[chosen[:, j]]
        if xj.shape[0]:
            gram[j] += xj.T @ xj


def bases_from_inputs(grams: torch.Tensor, has_bias: bool, config: GRIPConfig,
                      device: torch.device | str | None = None, report: dict | None = None):
    """(basis, spectrum, basis_weight, spectrum_weight) from augmented Grams (E, d', d'); see eig_basis."""
    basis, spectrum = eig_basis(grams, config, device, report)
    if not has_bias:
        return basis, spectrum, None, None
    bw, sw = eig_basis(grams[:, :-1, :-1], config, device, report)          # the weight block alone
    return basis, spectrum, bw, sw


class _Reservoir:
    """Keeps the `cap` tokens with the largest seeded random keys: deterministic, bounded, streaming.

    `stream` > 0 (process `stream` of a multi-process fit) draws independent keys, so the union of
    the processes' reservoirs contains the global top-`cap` keys of the whole retain set.
    """

    def __init__(self, cap: int, num_layers: int, seed: int, stream: int = 0):
        self.cap = cap
        self.gen = torch.Generator().manual_seed(seed if not stream else seed + 0x9E3779B97F4A7C15 * stream % 2**62)
        self.keys = torch.empty(0)
        self.parts: list[list[torch.Tensor] | None] = [None] * num_layers  # [x, logits, selected] per layer

    def add(self, n: int, per_layer: list[list[torch.Tensor]]) -> None:
        keys = torch.cat([self.keys, torch.rand(n, generator=self.gen)])
        keep = keys.topk(min(self.cap, keys.shape[0])).indices.sort().values
        self.keys = keys[keep]
        for l, new in enumerate(per_layer):
            old = self.parts[l]
            self.parts[l] = [torch.cat([o, t])[keep] for o, t in zip(old, new)] if old else [t[keep] for t in new]


@dataclass
class FitAccumulators:
    """[distributed hook] What one process accumulated in its pass, before the eigendecomposition.

    `fit_retain_statistics(..., reduce=f)` calls `f(acc)` once after EACH pass (one pass unless
    `fit_layers_per_pass`) and continues with the FitAccumulators it returns; the lists hold the
    pass's layers only, and the probe is filled in the first pass only (empty lists after).
    Sums (grams, counts, agree, num_tokens) must come back summed over processes; the samples
    (reservoir, probe) merged so that every process holds the same.
    Per layer of the pass: grams (E, d', d') float64, counts (E,) long; agree (n, 2) long [rule agrees, rows];
    reservoir_keys (m,), reservoir_parts per layer [x (m, d'), logits (m, E), selected (m, k)] or None
    (no tokens); probe_* as in GRIPState, but probe_logits / probe_selected still per batch
    (L lists of (n_b, E) / (n_b, k)).
    """

    grams: list[torch.Tensor]
    counts: list[torch.Tensor]
    agree: torch.Tensor
    num_tokens: int
    reservoir_keys: torch.Tensor
    reservoir_parts: list[list[torch.Tensor] | None]
    probe_batches: list[dict]
    probe_logits: list[list[torch.Tensor]]
    probe_selected: list[list[torch.Tensor]]
    max_margin_rows: int
    probe_tokens: int


def _stream_pass(moe, batches: Iterable[dict], positions: list[int], has_bias: list[bool], rules: list,
                 config: GRIPConfig, stream: int, with_probe: bool) -> FitAccumulators:
    """One pass over the batches, accumulating Grams / counts / margin rows for `positions` only."""
    layers = moe.layers
    grams = [torch.zeros(layers[p].num_experts, layers[p].hidden_size + has_bias[p],
                         layers[p].hidden_size + has_bias[p], dtype=torch.float64) for p in positions]
    counts = [torch.zeros(layers[p].num_experts, dtype=torch.long) for p in positions]
    agree = [[0, 0] for _ in positions]
    reservoir = _Reservoir(config.max_margin_rows, len(positions), config.seed, stream)
    probe_batches: list[dict] = []
    probe_logits: list[list[torch.Tensor]] = [[] for _ in layers] if with_probe else []
    probe_selected: list[list[torch.Tensor]] = [[] for _ in layers] if with_probe else []
    num_tokens = 0
    for batch in batches:
        tr = moe.trace(batch, keep_inputs=True)
        n = tr.num_tokens
        if n == 0:
            continue
        per_layer = []
        for i, pos in enumerate(positions):
            x = augment(tr.inputs[pos], has_bias[pos])                       # (n, d')
            chosen = tr.selection_mask(pos)                                  # (n, E)
            accumulate_gram(grams[i], x.double(), chosen)
            counts[i] += chosen.sum(0)
            agree[i][0] += int((rules[pos].select(tr.logits[pos], layers[pos].top_k) == chosen).all(1).sum())
            agree[i][1] += n
            per_layer.append([x.float(), tr.logits[pos], tr.selected[pos]])
        reservoir.add(n, per_layer)
        if with_probe and num_tokens < config.probe_tokens:
            probe_batches.append({k: batch[k].detach().cpu().clone() for k in ("input_ids", "attention_mask")
                                  if k in batch})
            for pos in range(len(layers)):
                probe_logits[pos].append(tr.logits[pos])
                probe_selected[pos].append(tr.selected[pos])
        num_tokens += n
    return FitAccumulators(grams, counts, torch.tensor(agree, dtype=torch.long).reshape(-1, 2), num_tokens,
                           reservoir.keys, reservoir.parts, probe_batches, probe_logits, probe_selected,
                           config.max_margin_rows, config.probe_tokens)


def fit_retain_statistics(moe, retain_batches: Iterable[dict], config: GRIPConfig | None = None,
                          reduce=None) -> GRIPState:
    """Streaming pass(es) over `retain_batches` (HF-style dicts) -> GRIPState. See module doc.

    reduce: None (one process) or a callable FitAccumulators -> FitAccumulators applied after each
    pass (e.g. grip_core.runs.distributed.FitReducer: all-reduce across processes); its optional
    int attribute `rank` decorrelates the margin-row sample between processes.
    """
    config = config or GRIPConfig()
    if isinstance(retain_batches, dict):                                     # one batch, not its keys
        retain_batches = [retain_batches]
    t0 = time.perf_counter()
    layers = moe.layers
    L = len(layers)
    per_pass = config.fit_layers_per_pass or L
    if per_pass < L and not isinstance(retain_batches, (list, tuple)):
        retain_batches = list(retain_batches)                                # several passes: re-iterable
    has_bias = [l.router_bias is not None for l in layers]
    rules = [l.selection_rule() for l in layers]
    stream = int(getattr(reduce, "rank", 0))
    # the eigh runs on the model's GPU when there is one (the Grams stay on CPU: bounded GPU memory)
    device = moe.device if getattr(moe.device, "type", "cpu") == "cuda" else None
    stats: list[LayerStats] = []
    solvers: dict[str, int] = {}
    probe = None
    accumulator_bytes = 0
    for first in range(0, L, per_pass):
        positions = list(range(first, min(first + per_pass, L)))
        acc = _stream_pass(moe, retain_batches, positions, has_bias, rules, config, stream, with_probe=first == 0)
        if reduce is not None:                                               # ---- [distributed hook] ----
            acc = reduce(acc)
        if acc.num_tokens == 0:
            raise ValueError("GRIP.fit: the retain batches hold no real (non-pad) tokens")
        if first == 0:
            probe = (acc.probe_batches, acc.probe_logits, acc.probe_selected, int(acc.num_tokens))
        accumulator_bytes = max(accumulator_bytes, sum(g.numel() * g.element_size() for g in acc.grams))
        for i, pos in enumerate(positions):
            layer = layers[pos]
            basis, spectrum, bw, sw = bases_from_inputs(acc.grams[i], has_bias[pos], config, device, solvers)
            acc.grams[i] = None                                              # free this layer's Gram now
            x, lg, sel = acc.reservoir_parts[i]
            agreement = int(acc.agree[i][0]) / max(int(acc.agree[i][1]), 1)
            if agreement < 1.0:
                warnings.warn(f"GRIP.fit: layer {layer.index}: the selection rule reproduces only {agreement:.1%} "
                              "of the router's choices; margins may be approximate", stacklevel=2)
            stats.append(LayerStats(layer.index, layer.num_experts, layer.top_k, layer.hidden_size, has_bias[pos],
                                    basis, spectrum, bw, sw, acc.counts[i], x, lg, sel,
                                    router_matrix(layer).cpu(), rules[pos], agreement))
        del acc
    probe_batches, probe_logits, probe_selected, num_tokens = probe
    return GRIPState(config.to_dict(), stats, probe_batches, [torch.cat(p) for p in probe_logits],
                     [torch.cat(s) for s in probe_selected], num_tokens, time.perf_counter() - t0,
                     accumulator_bytes, solvers)

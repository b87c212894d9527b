"""GRIP, the adapter: constrain router updates of ANY unlearning loop (docs/method.md#grip).

The canonical idiom (one code path for the job runner, a Trainer, user loops):

    grip = GRIP.fit(moe, retain_batches, GRIPConfig())
    optimizer = grip.wrap(optimizer)      # SAME optimizer object, with step pre/post hooks
    ...
    loss.backward(); optimizer.step()     # snapshot -> step -> project, every time

`wrap` registers `before_step` / `after_step` as torch optimizer step hooks, so schedulers,
GradScaler, accelerate and HF Trainer (`grip.wrap(trainer.optimizer)` after
`trainer.create_optimizer()`) all go through it untouched. `with grip.step(): optimizer.step()`
and explicit before_step()/after_step() calls are the same two methods, for loops that
cannot hand over their optimizer. GRIP never sees the loss.

Footguns:
- Use ONE of wrap / step() / manual calls per optimizer: a second before_step without an
  after_step raises (double snapshot) rather than silently projecting twice. If a wrapped
  optimizer.step() itself raises, call grip.abort_step() before stepping again.
- Gradient mode projects .grad in the pre-hook: optimizers that take a closure recompute the
  gradient after it, bypassing the projection, so gradient mode refuses closures.
- Anything that writes router weights OUTSIDE optimizer.step() (a manual edit, a second
  optimizer stepped without GRIP) is not constrained.
- bf16 router weights: Θ_old + P(ΔΘ) is rounded on write-back, a small leak the stats show.
- Families whose mixing weights use the full softmax (OLMoE, Qwen2-MoE with
  norm_topk_prob=False): holding the selection does not hold the mixing weights, so later
  layers' inputs still drift; GRIP's guarantee is on the recorded retained inputs.
- Drift-aware correction is one forward pass per call: all layers are corrected from the
  same capture, so a layer's correction is computed on inputs that earlier corrections
  then move a little (the next call picks that up).
"""
from __future__ import annotations

import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import GRIPConfig
from .fit import GRIPState, bases_from_inputs, fit_retain_statistics, router_matrix
from .project import (alpha_logit_rows, alpha_scale, augment, margin_bounds, margin_kaczmarz, project_equality,
                      ridge_solve)


@dataclass
class GRIPStepStats:
    """What one optimizer step did to the routers; every mode fills every field (lists are per layer)."""

    step: int
    mode: str
    update_norm: list[float]      # ‖ΔΘ‖ of the optimizer's raw step
    removed: list[float]          # ‖ΔΘ − P(ΔΘ)‖/‖ΔΘ‖: share GRIP removed (off: would remove; gradient: of .grad)
    leak: list[float]             # ‖Δ_applied − P_eq Δ_applied‖/‖ΔΘ‖: applied update outside the null spaces,
                                  # as a share of the RAW step (so a step GRIP shrank to ~0 reads ~0, not noise)
    alpha_min: list[float]        # margin scaling per layer (min / mean over experts; 1 = untouched)
    alpha_mean: list[float]
    kaczmarz_iters: list[int]
    t_project_ms: float           # equality projection (gradient mode: in before_step)
    t_margin_ms: float            # margin enforcement
    t_drift_ms: float = 0.0       # drift-aware correction + refit, on the steps it runs
    drift: dict | None = None


RESCORE_EVERY = 64        # steps between exact recomputations of the cached margin-row scores (float drift)


@dataclass
class _Projector:
    """A layer's constraints on the router's device. d' includes the bias coordinate iff `aug`.

    Margin-row scores ST = Θ X_fullᵀ (E, M) are cached (float32, like the product that made them) and advanced
    by the applied update's u Xᵀ each step, so a step costs one (C, d') x (d', M) product for the C experts that
    move (frozen experts never do), not a (2E, d') one; they are recomputed when the router no longer equals
    `theta_ref` (a write outside GRIP, a drift correction, a router stored in a low-precision dtype) and every
    RESCORE_EVERY steps. Expert-major (E, M) layout: the moving experts are contiguous row blocks.
    """

    X: torch.Tensor               # (M, d') margin rows
    XT: torch.Tensor              # (d', M) the same, transposed and contiguous (u @ XT streams it row-major)
    X_full: torch.Tensor          # (M, d + has_bias) the same rows with the bias coordinate (scores)
    selected: torch.Tensor        # (M, k) reference top-k of each row
    sel: torch.Tensor | None = None       # (M, E) bool mask of `selected` (constant: cached)
    selT: torch.Tensor | None = None      # (E, M) the same, expert-major
    frozen: torch.Tensor | None = None    # (E,) bool: null space empty (r_j = d'): P_j = 0
    free: torch.Tensor | None = None      # (F,) long: the other experts
    U_free: torch.Tensor | None = None    # (F, d', r_max over them) their zero-padded bases U_j
    ST: torch.Tensor | None = None        # (E, M) cached scores theta_ref X_fullᵀ
    theta_ref: torch.Tensor | None = None  # (E, d + has_bias) the router the cached scores belong to
    age: int = 0                          # steps since S was computed exactly
    _U: torch.Tensor | None = None        # (E, d', r) every expert's basis, built for Kaczmarz only

    @property
    def U(self) -> torch.Tensor:
        """(E, d', r) bases of every expert (Kaczmarz), built on first use: U_free itself when no expert is frozen
        (no copy: at real width one layer's bases are ~0.5 GB), else with the identity for frozen experts (any
        orthonormal basis of R^d' gives P_j = 0)."""
        if self._U is None:
            if not bool(self.frozen.any()):
                self._U = self.U_free
            else:
                E, d = self.frozen.shape[0], self.X.shape[1]
                self._U = self.X.new_zeros(E, d, d)
                self._U[self.free, :, :self.U_free.shape[-1]] = self.U_free
                self._U[self.frozen] = torch.eye(d, device=self.X.device, dtype=self.X.dtype)
        return self._U

    def project(self, u: torch.Tensor) -> torch.Tensor:
        """Constraint 1 on u (E, d'): P_j u_j per row; rows of frozen experts are exactly 0 (their null space is
        empty: projecting them would cost a full d' x d' product and leave rounding noise)."""
        out = torch.zeros_like(u)
        if self.free.numel():
            out[self.free] = project_equality(self.U_free, u[self.free])
        return out

    def leak(self, a: torch.Tensor) -> float:
        """‖a − P a‖ (Frobenius over rows): ‖U_jᵀa_j‖ for free experts (U_j orthonormal; one product instead of a
        projection's two), ‖a_j‖ for frozen ones."""
        free = float(torch.bmm(a[self.free].unsqueeze(1), self.U_free).pow(2).sum()) if self.free.numel() else 0.0
        return (free + float(a[self.frozen].pow(2).sum())) ** 0.5

    def advance(self, theta_old: torch.Tensor, u_full: torch.Tensor, cols: torch.Tensor,
                dV: torch.Tensor | None) -> None:
        """The router became theta_old + u_full: ST[cols] += dV (C, M) (the applied update's u Xᵀ on the experts
        that moved), or drop ST when dV is None (the next step recomputes it)."""
        if dV is None or self.ST is None:
            self.ST = self.theta_ref = None
            return
        if cols.numel():
            self.ST.index_add_(0, cols, dV)
        self.theta_ref = theta_old.to(u_full) + u_full
        self.age += 1


def _pad_bases(basis: list[torch.Tensor], dim: int) -> torch.Tensor:
    r = max([b.shape[1] for b in basis] + [0])
    U = torch.zeros(len(basis), dim, r)
    for j, b in enumerate(basis):
        U[j, :, :b.shape[1]] = b
    return U


def _ratio(a: torch.Tensor, b: torch.Tensor) -> float:
    nb = float(b.norm())
    return float(a.norm()) / nb if nb > 0 else 0.0


class GRIP:
    """Router constraint adapter. Build with `GRIP.fit`; attach with `grip.wrap(optimizer)`."""

    def __init__(self, moe, state: GRIPState, config: GRIPConfig | None = None):
        self.moe, self.state = moe, state
        self.config = config or GRIPConfig.from_dict(state.config)
        self.history: list[GRIPStepStats] = []
        self.num_steps = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._grad_stats: tuple[list[float], float] | None = None
        self._cache: dict[tuple[int, bool], _Projector] = {}
        self._hooks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # optimizer -> hook handles
        self._gen: torch.Generator | None = None

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def fit(cls, moe, retain_batches, config: GRIPConfig | None = None) -> "GRIP":
        """One streaming pass over the retain batches (see fit.py); the model is not changed."""
        config = config or GRIPConfig()
        return cls(moe, fit_retain_statistics(moe, retain_batches, config), config)

    @classmethod
    def load(cls, path, moe, config: GRIPConfig | None = None) -> "GRIP":
        return cls(moe, GRIPState.load(path), config)

    def save(self, path) -> None:
        self.state.save(path)

    @property
    def null_space_rank(self) -> torch.Tensor:
        return self.state.null_space_rank

    @property
    def mean_free_dims(self) -> torch.Tensor:
        return self.state.mean_free_dims

    # ---- the idiom ----------------------------------------------------------------------------
    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """THE canonical idiom: hooks before_step/after_step around `optimizer.step()`; returns it."""
        if optimizer not in self._hooks:
            def pre(opt, args, kwargs):
                closure = args[1] if len(args) > 1 else kwargs.get("closure")     # args[0] is the optimizer
                if self.config.mode == "gradient" and closure is not None:
                    raise ValueError("GRIP gradient mode cannot project gradients recomputed by a closure")
                self.before_step()
            self._hooks[optimizer] = (optimizer.register_step_pre_hook(pre),
                                          optimizer.register_step_post_hook(lambda opt, a, k: self.after_step()))
        return optimizer

    def unwrap(self, optimizer: torch.optim.Optimizer) -> None:
        for handle in self._hooks.pop(optimizer, ()):
            handle.remove()

    @contextmanager
    def step(self):
        """`with grip.step(): optimizer.step()` — the same before/after pair as wrap()."""
        self.before_step()
        try:
            yield self
        except BaseException:
            self.abort_step()
            raise
        self.after_step()

    def abort_step(self) -> None:
        """Drop a pending snapshot (an optimizer.step() that raised after the pre-hook ran)."""
        self._snapshot = None

    def before_step(self) -> None:
        """Snapshot every router [Θ | b] (E x d' clone); gradient mode also projects .grad here."""
        if self._snapshot is not None:
            raise RuntimeError("GRIP.before_step called twice without after_step (wrap() AND step() used?)")
        self._snapshot = [router_matrix(l) for l in self.moe.layers]
        if self.config.mode == "gradient":
            self._project_grads()

    def after_step(self) -> GRIPStepStats:
        """Project ΔΘ = Θ_new − Θ_old and write Θ_old + P(ΔΘ) back (update mode); record stats."""
        if self._snapshot is None:
            raise RuntimeError("GRIP.after_step called without before_step")
        cfg, mode = self.config, self.config.mode
        snap, self._snapshot = self._snapshot, None
        norms, removed, leak, amin, amean, iters = [], [], [], [], [], []
        t_proj = t_marg = 0.0
        for pos, layer in enumerate(self.moe.layers):
            aug = self._bias_trains(pos)
            old = snap[pos] if aug or layer.router_bias is None else snap[pos][:, :layer.hidden_size]
            delta = router_matrix(layer, aug) - old                          # (E, d')
            P = self._projector(pos, aug)
            u, alpha, it = delta, torch.ones(delta.shape[0], device=delta.device), 0
            if mode != "gradient":
                t0 = self._tick()
                u = P.project(delta)
                t1 = self._tick()
                if cfg.margin and P.X.shape[0]:
                    E = u.shape[0]
                    ST = self._scores(P, snap[pos])                                 # (E, M) scores before this step
                    cols = (u != 0).any(1).nonzero().squeeze(1)                     # experts that move at all
                    if cfg.margin_method == "scale":
                        u, alpha, dV = self._scale(pos, P, ST, u, cols)
                    else:
                        lo, hi = self._bounds(pos, P, snap[pos], logits=ST.T)
                        u, alpha, it = margin_kaczmarz(u, P.X, lo, hi, P.U, cfg.kaczmarz_iters, self._generator(u),
                                                       XT=P.XT, frozen=P.frozen)
                        dV = None
                    if mode == "update":                                            # the scores after the write
                        P.advance(snap[pos], u if u.shape[1] == P.X_full.shape[1] else
                                  torch.cat([u, u.new_zeros(E, 1)], 1), cols, dV)
                t_proj, t_marg = t_proj + t1 - t0, t_marg + self._tick() - t1
            if mode == "update":
                self._write(layer, old + u, aug)
            applied = u if mode == "update" else delta
            dn = float(delta.norm())
            norms.append(dn)
            removed.append(self._grad_stats[0][pos] if mode == "gradient" else _ratio(delta - u, delta))
            leak.append(P.leak(applied) / dn if dn > 0 else 0.0)
            amin.append(float(alpha.min()))
            amean.append(float(alpha.mean()))
            iters.append(it)
        if mode == "gradient":
            t_proj = self._grad_stats[1]
        self.num_steps += 1
        stats = GRIPStepStats(self.num_steps, mode, norms, removed, leak, amin, amean, iters,
                              1e3 * t_proj, 1e3 * t_marg)
        if cfg.drift_every and mode != "off" and self.num_steps % cfg.drift_every == 0:
            t0 = time.perf_counter()
            stats.drift = self.drift_correct()
            stats.t_drift_ms = 1e3 * (time.perf_counter() - t0)
        self.history.append(stats)
        return stats

    # ---- corrections --------------------------------------------------------------------------
    @torch.no_grad()
    def post_training_correction(self, moe=None, retain_batches=None, reference=None) -> dict:
        """Closed-form ridge toward the ORIGINAL scores (docs/method.md#drift-aware-grip), kept per layer if cos ≥ min_cos.

        Default: the stored probe and its original scores. With `retain_batches`, pass
        `reference` (the original MoEModel) to score them. One streaming pass; d' x d' solves.
        """
        moe = moe or self.moe
        if retain_batches is not None and reference is None:
            raise ValueError("post_training_correction(retain_batches=...) needs reference= (the original model)")
        t0 = time.perf_counter()
        A, B, tt, _ = self._capture(moe, retain_batches, reference, keep_inputs=False)
        out = self._apply_ridge(moe, A, B, tt, lambda pos: moe.layers[pos].router_bias is not None)
        return {**out, "seconds": time.perf_counter() - t0}

    @torch.no_grad()
    def drift_correct(self) -> dict:
        """Drift-aware GRIP: re-capture the probe's router inputs from the CURRENT model, ridge-steer
        every router toward the ORIGINAL scores on them, then refit U_j and the margin rows on the
        new inputs with the ORIGINAL selections as reference. Cost: one forward pass over the probe,
        E + 1 eigendecompositions (d' x d') and one solve per layer."""
        t0 = time.perf_counter()
        A, B, tt, xs = self._capture(self.moe, None, None, keep_inputs=True)
        out = self._apply_ridge(self.moe, A, B, tt, self._bias_trains)
        t1 = time.perf_counter()
        gen = torch.Generator().manual_seed(self.config.seed + self.num_steps)
        for pos, (layer, st) in enumerate(zip(self.moe.layers, self.state.layers)):
            x, sel = xs[pos], self.state.probe_selected[pos]                 # (Np, d'), (Np, k) original top-k
            chosen = torch.zeros(x.shape[0], st.num_experts, dtype=torch.bool).scatter_(1, sel, True)
            gram = torch.stack([x[chosen[:, j]].double().T @ x[chosen[:, j]].double()
                                for j in range(st.num_experts)])             # (E, d', d')
            st.basis, st.spectrum, st.basis_weight, st.spectrum_weight = bases_from_inputs(
                gram, st.has_bias, self.config)
            st.tokens_per_expert = chosen.sum(0)
            keep = torch.randperm(x.shape[0], generator=gen)[:self.config.max_margin_rows].sort().values
            st.margin_x, st.margin_selected = x[keep].float(), sel[keep]
            st.margin_logits = st.margin_x @ router_matrix(layer).cpu().T    # corrected router, new inputs
        self._cache.clear()
        return {**out, "seconds_ridge": t1 - t0, "seconds_refit": time.perf_counter() - t1}

    # ---- internals ----------------------------------------------------------------------------
    def _capture(self, moe, batches, reference, keep_inputs: bool):
        """One pass: per layer A = Σ t x̃ᵀ (E, d'), B = Σ x̃x̃ᵀ (d', d'), tt = Σ‖t‖² (float64), x̃ augmented."""
        L = len(moe.layers)
        use_probe = batches is None
        batches = self.state.probe_batches if use_probe else batches
        A = [0.0] * L
        B = [0.0] * L
        tt = [0.0] * L
        xs: list[list[torch.Tensor]] = [[] for _ in range(L)]
        offset = 0
        for batch in batches:
            tr = moe.trace(batch, keep_inputs=True)
            n = tr.num_tokens
            ref = None if use_probe else reference.trace(batch)
            for pos, layer in enumerate(moe.layers):
                x = augment(tr.inputs[pos], layer.router_bias is not None).double()       # (n, d')
                t = (self.state.probe_logits[pos][offset:offset + n] if use_probe else ref.logits[pos]).double()
                if t.shape[0] != n:
                    raise ValueError("the probe no longer matches its stored scores (batches changed?)")
                A[pos] = A[pos] + t.T @ x
                B[pos] = B[pos] + x.T @ x
                tt[pos] += float((t * t).sum())
                if keep_inputs:
                    xs[pos].append(x.float())
            offset += n
        return A, B, tt, [torch.cat(x) for x in xs] if keep_inputs else None

    def _apply_ridge(self, moe, A, B, tt, use_bias) -> dict:
        cos0, cos1, applied = [], [], []
        for pos, layer in enumerate(moe.layers):
            a, bb, t2 = A[pos], B[pos], tt[pos]
            aug = bool(use_bias(pos))
            if layer.router_bias is not None and not aug:                    # bias stays: fit t − b on x
                b = layer.router_bias.detach().double().cpu()
                d = layer.hidden_size
                t2 = t2 - 2 * float((b * a[:, -1]).sum()) + float(bb[-1, -1]) * float(b @ b)
                a, bb = a[:, :d] - b[:, None] * bb[-1, :d][None], bb[:d, :d]
            theta = router_matrix(layer, aug).cpu().double()
            new, c0, c1 = ridge_solve(theta, a, bb, t2, self.config.ridge_lambda, self.config.ridge_form)
            ok = c1 >= self.config.correction_min_cos
            if ok:
                self._write(layer, new, aug)
            cos0.append(c0)
            cos1.append(c1)
            applied.append(ok)
        return {"cos_before": cos0, "cos_after": cos1, "applied": applied}

    def _bounds(self, pos: int, P: _Projector, theta_old: torch.Tensor,
                logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Margin bounds (M, E) from the CURRENT scores on the stored rows, ORIGINAL selections as reference.

        Margins are re-read every step: bounds taken once at fit time would let each step spend
        the whole margin again, so non-selected experts would creep past in a few steps.
        `logits` (M, E): the scores X_full @ theta_oldᵀ when the caller already has them.
        """
        if logits is None:
            logits = (theta_old.to(P.X_full) @ P.X_full.T).T                 # (M, E) scores before this step
        return margin_bounds(logits, P.selected, self.state.layers[pos].rule, self.config.margin_eps,
                             hold_selected=self.config.threshold_kind == "relative", sel=P.sel)

    def _scores(self, P: _Projector, theta_old: torch.Tensor) -> torch.Tensor:
        """(E, M) scores theta_old X_fullᵀ on the margin rows: P's cache when it is still exact."""
        if P.ST is None or P.age >= RESCORE_EVERY or not torch.equal(P.theta_ref, theta_old.to(P.theta_ref)):
            P.ST = theta_old.to(P.X_full) @ P.X_full.T
            P.theta_ref, P.age = theta_old.to(P.X_full).clone(), 0
        return P.ST

    def _scale(self, pos: int, P: _Projector, ST: torch.Tensor, u: torch.Tensor,
               cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """α-scaling of u (already in the null spaces) on the experts `cols` that move (the others keep α = 1 and
        cost nothing): returns (α u, α (E,), the applied update's (α u) Xᵀ on `cols` (C, M))."""
        alpha = torch.ones(u.shape[0], dtype=u.dtype, device=u.device)
        if not cols.numel():
            return u, alpha, ST.new_zeros(0, ST.shape[1])
        VT = u[cols] @ P.XT                                                  # (C, M) = u_jᵀx_i of the moving experts
        rule, hold = self.state.layers[pos].rule, self.config.threshold_kind == "relative"
        if rule.kind == "logit" and not hold:
            a = alpha_logit_rows(ST, P.selected, P.selT, cols, VT, self.config.margin_eps)
        else:
            lo, hi = margin_bounds(ST.T, P.selected, rule, self.config.margin_eps, hold_selected=hold, sel=P.sel,
                                   lo_none=True, cols=cols)
            a = alpha_scale(VT.T, lo, hi)
        alpha[cols] = a
        return u * alpha.unsqueeze(1), alpha, VT * a.unsqueeze(1)

    def _bias_trains(self, pos: int) -> bool:
        b = self.moe.layers[pos].router_bias
        return b is not None and b.requires_grad

    def _projector(self, pos: int, aug: bool) -> _Projector:
        """Device tensors for layer `pos`; the weight-only variant when the bias does not train."""
        key = (pos, aug)
        if key not in self._cache:
            st, layer = self.state.layers[pos], self.moe.layers[pos]
            dev = layer.router_weight.device
            weight_only = st.has_bias and not aug
            basis = st.basis_weight if weight_only else st.basis
            X = st.margin_x[:, :st.hidden_size] if weight_only else st.margin_x
            X_full, selected = st.margin_x.to(dev), st.margin_selected.to(dev)
            sel = torch.zeros(X_full.shape[0], st.num_experts, dtype=torch.bool, device=dev)
            sel.scatter_(1, selected.long(), True)
            frozen = torch.tensor([b.shape[1] >= X.shape[1] for b in basis], dtype=torch.bool, device=dev)
            X = X.contiguous().to(dev)
            free = (~frozen).nonzero().squeeze(1)
            U_free = _pad_bases([basis[j] for j in free.tolist()], X.shape[1]).to(dev)
            self._cache[key] = _Projector(X, X.T.contiguous(), X_full, selected, sel, sel.T.contiguous(), frozen, free,
                                          U_free)
        return self._cache[key]

    @torch.no_grad()
    def _write(self, layer, theta: torch.Tensor, aug: bool) -> None:
        W = layer.router_weight
        if not W.requires_grad and layer.router_bias is not None and layer.router_bias.requires_grad:
            raise NotImplementedError("GRIP: a router bias that trains while its weight is frozen")
        W.copy_(theta[:, :layer.hidden_size].to(W.device, W.dtype))
        if aug:
            layer.router_bias.copy_(theta[:, -1].to(layer.router_bias.device, layer.router_bias.dtype))

    @torch.no_grad()
    def _project_grads(self) -> None:
        t0 = self._tick()
        removed = []
        for pos, layer in enumerate(self.moe.layers):
            W, b, aug = layer.router_weight, layer.router_bias, self._bias_trains(pos)
            if W.grad is None:
                removed.append(0.0)
                continue
            g = W.grad.float()
            if aug:
                gb = b.grad if b.grad is not None else torch.zeros_like(b)
                g = torch.cat([g, gb.float().reshape(-1, 1)], dim=1)         # (E, d + 1)
            pg = self._projector(pos, aug).project(g)
            removed.append(_ratio(g - pg, g))
            W.grad.copy_(pg[:, :layer.hidden_size])
            if aug and b.grad is not None:
                b.grad.copy_(pg[:, -1])
        self._grad_stats = (removed, self._tick() - t0)

    def _generator(self, like: torch.Tensor) -> torch.Generator:
        if self._gen is None or self._gen.device != like.device:
            self._gen = torch.Generator(device=like.device).manual_seed(self.config.seed)
        return self._gen

    def _tick(self) -> float:
        if self.moe.layers[0].router_weight.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

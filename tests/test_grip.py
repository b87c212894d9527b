"""GRIP adapter (grip_core/grip): the core promise, modes, near ties, bias, thresholds, correction, memory.

Tiny random models (d 64, 2 MoE layers, 8 experts, top-2); routers trained alone with Adam
on gradient ascent, as in docs/method.md#grip. Expected numbers are computed here, never hard-coded.
"""
import copy
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from grip_core import MoEModel
from grip_core.grip import GRIP, GRIPConfig, GRIPState
from grip_core.grip.project import augment, margin_bounds, margin_kaczmarz, margin_scale, project_equality
from grip_core.moe.selection import SelectionRule
from grip_core.moe.tiny import build_tiny_model


def _batch(seed, B=4, T=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _padded_batch(seed):
    b = _batch(seed, B=4, T=10)
    b["attention_mask"][1, 6:] = 0
    b["attention_mask"][3, 4:] = 0
    return b


RETAIN = [_batch(100)]            # 32 retained tokens


@lru_cache(maxsize=None)
def _tiny(family):
    return build_tiny_model(family, seed=0)


def _model(family):
    """A fresh copy of the family's tiny model (built once per family: building is the slow part)."""
    return MoEModel(copy.deepcopy(_tiny(family)))


def _routers_only(moe, bias=True):
    for p in moe.model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in moe.layers:
        params.append(layer.router_weight.requires_grad_(True))
        if bias and layer.router_bias is not None:
            params.append(layer.router_bias.requires_grad_(True))
    return params


def _ga(moe, optimizer, steps=10, seed=0):
    """Gradient ascent on next-token CE of random batches (the loss GRIP never sees)."""
    moe.model.train()
    for s in range(steps):
        b = _batch(seed + s)
        loss = -moe.model(**b, labels=b["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moe.model.eval()


def _run(family, config, steps=10, lr=1e-2, bias=True, opt="adam"):
    moe = _model(family)
    base = moe.trace(RETAIN[0], keep_inputs=True)
    with torch.no_grad():
        base_out = moe.model(**RETAIN[0]).logits
    grip = GRIP.fit(moe, RETAIN, config)
    params = _routers_only(moe, bias)
    optim = torch.optim.Adam(params, lr=lr) if opt == "adam" else torch.optim.SGD(params, lr=lr)
    _ga(moe, grip.wrap(optim), steps)
    return moe, grip, base, base_out


def _router_view(moe, grip, base):
    """New routers on the ORIGINAL retained inputs: per layer (logits (N, E), selection mask (N, E))."""
    out = []
    for layer, st, x in zip(moe.layers, grip.state.layers, base.inputs):
        b = None if layer.router_bias is None else layer.router_bias.detach()
        logits = F.linear(x, layer.router_weight.detach(), b)
        out.append((logits, st.rule.select(logits, layer.top_k)))
    return out


def _stability(base, new_masks):
    return torch.cat([(base.selection_mask(l) == m).all(1).float() for l, m in enumerate(new_masks)]).mean().item()


# ---- 1. the core promise --------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_core_promise_routers_only_gradient_ascent(family):
    results = {}
    for name, cfg in {"off": GRIPConfig(mode="off"), "equality": GRIPConfig(margin=False),
                      "scale": GRIPConfig(), "kaczmarz": GRIPConfig(margin_method="kaczmarz")}.items():
        moe, grip, base, base_out = _run(family, cfg)
        view = _router_view(moe, grip, base)
        trace = moe.trace(RETAIN[0])
        results[name] = (_stability(base, [m for _, m in view]), _stability(base, [trace.selection_mask(l)
                                                                                  for l in range(2)]))
        sel_drift = max(float((lg - base.logits[l])[base.selection_mask(l)].abs().max()) for l, (lg, _) in enumerate(view))
        moved = max(s.update_norm[0] for s in grip.history)
        assert moved > 0                                                     # the optimizer did act
        if name == "off":
            assert sel_drift > 1e-2                                          # vanilla moves selected scores
        else:
            assert sel_drift < 1e-5                                          # constraint 1 holds
        if name in ("scale", "kaczmarz") and family == "mixtral":            # normalised top-k: outputs too
            with torch.no_grad():
                assert torch.allclose(moe.model(**RETAIN[0]).logits, base_out, atol=1e-5)
    assert results["off"][0] < 1.0 and results["off"][1] < 1.0
    assert results["equality"][0] < 1.0                                      # non-selected experts overtake
    assert results["scale"] == (1.0, 1.0) and results["kaczmarz"] == (1.0, 1.0)


def test_core_promise_deepseek_sigmoid_selection_bias_grouped():
    def build():
        m = _model("deepseek_v3")
        with torch.no_grad():                                                # make the selection bias matter
            for layer in m.layers:
                layer.selection_bias.copy_(torch.linspace(-0.05, 0.05, layer.num_experts))
        return m
    base = build().trace(RETAIN[0], keep_inputs=True)
    stab = {}
    for mode in ("off", "update"):
        moe = build()
        grip = GRIP.fit(moe, RETAIN, GRIPConfig(mode=mode))
        assert grip.state.layers[0].rule.kind == "sigmoid_bias" and grip.state.layers[0].selection_agreement == 1.0
        _ga(moe, grip.wrap(torch.optim.Adam(_routers_only(moe), lr=1e-2)))
        stab[mode] = _stability(base, [m for _, m in _router_view(moe, grip, base)])
        stab[mode + " model"] = _stability(base, [moe.trace(RETAIN[0]).selection_mask(l) for l in range(2)])
    assert stab["off"] < 1.0 and stab["off model"] < 1.0
    assert stab["update"] == 1.0 and stab["update model"] == 1.0


# ---- 2. gradient mode leaks under Adam ------------------------------------------------------------
def test_gradient_mode_leaks_under_adam_but_not_sgd():
    leak = {}
    for mode in ("gradient", "update"):
        _, grip, _, _ = _run("mixtral", GRIPConfig(mode=mode, margin=False))
        leak[mode] = max(max(s.leak) for s in grip.history)
        assert len(grip.history) == 10 and all(len(s.removed) == 2 for s in grip.history)
    assert leak["gradient"] > 10 * leak["update"]
    assert leak["gradient"] > 1e-2
    _, grip, _, _ = _run("mixtral", GRIPConfig(mode="gradient", margin=False), lr=1.0, opt="sgd")
    assert max(max(s.leak) for s in grip.history) < 1e-4                     # exact for plain SGD


def test_idioms_share_one_code_path():
    moe, grip, _, _ = _run("olmoe", GRIPConfig(), steps=2)
    opt = torch.optim.Adam(_routers_only(moe), lr=1e-2)
    grip.wrap(opt)
    with pytest.raises(RuntimeError):                                        # wrap() AND step(): refused
        with grip.step():
            opt.step()
    grip.unwrap(opt)
    with grip.step():                                                        # the context manager alone works
        opt.step()
    assert grip.history[-1].step == grip.num_steps
    with pytest.raises(RuntimeError):
        grip.after_step()


# ---- 3. near ties ---------------------------------------------------------------------------------
def test_near_tie_projection_is_feasible_and_finite():
    g = torch.Generator().manual_seed(3)
    M, E, d, k, eps = 40, 6, 10, 2, 1e-2
    X = torch.randn(M, d, generator=g)
    X[5] = 0.0                                                               # a zero row (no NaN allowed)
    X[6] = X[7]                                                              # a duplicate
    logits = torch.randn(M, E, generator=g)
    sel = logits.topk(k, dim=1).indices
    weakest = logits.gather(1, sel).min(1).values
    ties = torch.arange(0, M, 3)                                             # every third row: τ < ε
    runner_up = logits.scatter(1, sel, -torch.inf).argmax(1)
    logits[ties, runner_up[ties]] = weakest[ties] - 0.3 * eps
    lo, hi = margin_bounds(logits, sel, SelectionRule(), eps)
    tau = logits.gather(1, sel).min(1, keepdim=True).values - logits
    chosen = torch.zeros(M, E, dtype=torch.bool).scatter_(1, sel, True)
    assert torch.allclose(hi[~chosen], (tau - eps).clamp_min(0)[~chosen], atol=1e-6)
    assert (hi[ties, runner_up[ties]] == 0).all()
    U = torch.linalg.qr(torch.randn(E, d, 3, generator=g)).Q                 # (E, d, 3) orthonormal bases
    u = project_equality(U, 5 * torch.randn(E, d, generator=g))
    for hold in (False, True):                                               # hold: relative-threshold bounds
        lo, hi = margin_bounds(logits, sel, SelectionRule(), eps, hold_selected=hold)
        assert (lo <= 0).all() and (hi >= 0).all()                           # zero is always feasible
        for method in ("scale", "kaczmarz"):
            if method == "scale":
                out, alpha = margin_scale(u, X, lo, hi)
            else:
                out, alpha, _ = margin_kaczmarz(u, X, lo, hi, U, 100, torch.Generator().manual_seed(0))
            V = X @ out.T
            assert torch.isfinite(out).all() and torch.isfinite(alpha).all()
            assert (V <= hi + 1e-5 * (1 + V.abs())).all(), method            # never beyond max(τ − ε, 0)
            assert (V >= lo - 1e-5 * (1 + V.abs())).all(), method
            assert torch.allclose(torch.bmm(U.transpose(1, 2), out.unsqueeze(2)), torch.zeros(E, 3, 1), atol=1e-5)
            new = logits + V                                                 # the update applied to the scores
            assert torch.equal(new.topk(k, dim=1).indices.sort(1).values, sel.sort(1).values) or not hold
    zero = torch.zeros(E, d)
    assert torch.equal(margin_scale(zero, X, lo, hi)[0], zero)


# ---- 4. shared expert, router bias ----------------------------------------------------------------
def _expected_ranks(trace, has_bias, eps):
    """(L, E) from an SVD of each X_j (independent of the Gram path)."""
    out = []
    for l in range(trace.num_layers):
        x, mask = augment(trace.inputs[l], has_bias).double(), trace.selection_mask(l)
        out.append([int((torch.linalg.svdvals(x[mask[:, j]]) ** 2 > eps).sum()) if mask[:, j].any() else 0
                    for j in range(mask.shape[1])])
    return torch.tensor(out)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_fit_shapes_and_ranks(family, tmp_path):
    moe = _model(family)
    retain = [_padded_batch(7), _batch(8)]
    trace = moe.trace(retain, keep_inputs=True)
    has_bias = moe.layers[0].router_bias is not None
    assert has_bias == (family == "gpt_oss") and (moe.layers[0].shared_experts is not None) == (family == "qwen2_moe")
    grip = GRIP.fit(moe, retain, GRIPConfig(max_margin_rows=20))
    st = grip.state
    d = moe.layers[0].hidden_size + int(has_bias)
    assert st.num_tokens == trace.num_tokens                                 # padding excluded
    assert torch.equal(torch.stack([l.ranks for l in st.layers]), _expected_ranks(trace, has_bias, 1e-2))
    assert torch.equal(grip.null_space_rank, d - _expected_ranks(trace, has_bias, 1e-2))
    for l in st.layers:
        assert l.input_dim == d and l.spectrum.shape == (8, d) and l.margin_x.shape == (20, d)
        assert all(b.shape == (d, int(r)) for b, r in zip(l.basis, l.ranks))
        assert torch.equal(l.tokens_per_expert.sum(), torch.tensor(trace.num_tokens * 2))
    st.save(tmp_path / "grip.pt")
    again = GRIPState.load(tmp_path / "grip.pt")
    assert torch.equal(again.null_space_rank, st.null_space_rank) and again.config == st.config


@pytest.mark.parametrize("train_bias", [True, False])
def test_router_bias_constraint_covers_theta_x_plus_b(train_bias):
    moe, grip, base, _ = _run("gpt_oss", GRIPConfig(), bias=train_bias)
    view = _router_view(moe, grip, base)
    for l, (logits, mask) in enumerate(view):
        assert float((logits - base.logits[l])[base.selection_mask(l)].abs().max()) < 1e-5
        assert torch.equal(mask, base.selection_mask(l))
    b0 = grip.state.layers[0].theta0[:, -1]
    moved = float((moe.layers[0].router_bias.detach() - b0).abs().max())
    assert (moved > 0) == train_bias                                         # the bias really trained (or not)


# ---- 5. thresholds --------------------------------------------------------------------------------
def test_threshold_absolute_vs_relative_and_freezing():
    moe = _model("mixtral")
    trace = moe.trace(RETAIN[0], keep_inputs=True)
    absolute = GRIP.fit(moe, RETAIN, GRIPConfig())
    relative = GRIP.fit(moe, RETAIN, GRIPConfig(threshold_kind="relative", energy=0.9))
    want = []
    for l in range(2):
        x, mask = trace.inputs[l].double(), trace.selection_mask(l)
        row = []
        for j in range(8):
            s2 = torch.linalg.svdvals(x[mask[:, j]]) ** 2
            row.append(int(((s2.cumsum(0) / s2.sum()) < 0.9 - 1e-12).sum()) + 1 if mask[:, j].any() else 0)
        want.append(row)
    want = torch.tensor(want)
    assert torch.equal(relative.null_space_rank, 64 - want)
    assert torch.equal(relative.state.rank_table("relative", 0.9), want)
    assert not torch.equal(absolute.null_space_rank, relative.null_space_rank)
    moved, grip, base, _ = _run("mixtral", GRIPConfig(threshold_kind="relative", energy=0.9))
    view = _router_view(moved, grip, base)                                   # selected scores may move, but
    assert _stability(base, [m for _, m in view]) == 1.0                     # the margins still hold the top-k
    assert max(float((lg - base.logits[l])[base.selection_mask(l)].abs().max()) for l, (lg, _) in enumerate(view)) > 1e-4
    assert torch.allclose(absolute.mean_free_dims, absolute.null_space_rank.float().mean(1))
    # a retain set that spans R^d: the absolute threshold freezes every row (equality alone)
    big = [_batch(200 + i, B=8, T=16) for i in range(4)]                     # 512 tokens
    spanning = GRIP.fit(moe, big, GRIPConfig(margin=False))
    assert torch.equal(torch.stack([l.ranks for l in spanning.state.layers]),
                       _expected_ranks(moe.trace(big, keep_inputs=True), False, 1e-2))
    assert (spanning.null_space_rank == 0).all()
    before = [l.router_weight.detach().clone() for l in moe.layers]
    _ga(moe, spanning.wrap(torch.optim.Adam(_routers_only(moe), lr=1e-2)), steps=2)
    assert all(torch.allclose(l.router_weight, w, atol=1e-6) for l, w in zip(moe.layers, before))


# ---- 6. post-training correction and drift-aware GRIP ---------------------------------------------
def test_post_training_correction_restores_retained_topk():
    moe = _model("mixtral")
    retain = [_batch(100), _batch(101)]
    base = moe.trace(retain)
    grip = GRIP.fit(moe, retain, GRIPConfig())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in moe.layers:
            layer.router_weight.add_(0.05 * torch.randn(layer.router_weight.shape, generator=g))
    stab = lambda: _stability(base, [moe.trace(retain).selection_mask(l) for l in range(2)])
    perturbed = stab()
    out = grip.post_training_correction()
    assert all(out["applied"]) and min(out["cos_after"]) >= 0.95 > max(out["cos_before"])
    assert stab() > perturbed


def test_drift_aware_grip_beats_plain_grip_when_everything_trains():
    stab, cost = {}, {}
    for every in (0, 1):
        moe = _model("mixtral")
        base = moe.trace(RETAIN[0])
        grip = GRIP.fit(moe, RETAIN, GRIPConfig(drift_every=every))
        _ga(moe, grip.wrap(torch.optim.Adam(moe.model.parameters(), lr=3e-3)), steps=6)
        stab[every] = _stability(base, [moe.trace(RETAIN[0]).selection_mask(l) for l in range(2)])
        cost[every] = sum(s.t_drift_ms for s in grip.history)
    assert stab[1] > stab[0] and cost[1] > 0 == cost[0]


# ---- 7. memory ------------------------------------------------------------------------------------
def test_fit_memory_does_not_grow_with_tokens():
    moe = _model("olmoe")
    cfg = GRIPConfig(max_margin_rows=16, probe_tokens=16)
    small = GRIP.fit(moe, [_batch(1)], cfg).state
    large = GRIP.fit(moe, [_batch(10 + i) for i in range(8)], cfg).state
    assert large.num_tokens == 8 * small.num_tokens
    assert large.accumulator_bytes == small.accumulator_bytes == 2 * 8 * 64 * 64 * 8
    L, E, d, k = 2, 8, 64, 2                                                 # state bound: caps, not tokens
    bound = L * (E * d * d * 4 + E * d * 8 + 16 * (d * 4 + E * 4 + k * 8) + E * d * 4 + E * 8) \
        + 2 * 32 * 8 + L * 32 * (E * 4 + k * 8)                              # + one probe batch (32 tokens)
    assert small.nbytes() <= bound and large.nbytes() <= bound
    assert all(l.margin_x.shape[0] == 16 for l in large.layers)


def test_layer_at_a_time_fit_equals_one_pass_with_one_layer_of_grams():
    moe = _model("qwen2_moe")                                                # router bias: augmented Grams
    batches = [_padded_batch(3), _batch(4), _batch(5)]
    cfg = GRIPConfig(max_margin_rows=24, probe_tokens=40)
    one = GRIP.fit(moe, batches, cfg).state
    per_layer = GRIP.fit(moe, iter(batches), GRIPConfig(**{**cfg.to_dict(), "fit_layers_per_pass": 1})).state
    assert per_layer.accumulator_bytes * len(moe.layers) == one.accumulator_bytes
    assert per_layer.num_tokens == one.num_tokens
    for a, b in zip(one.layers, per_layer.layers):
        assert torch.equal(a.ranks, b.ranks) and torch.equal(a.margin_x, b.margin_x)
        assert torch.equal(a.margin_selected, b.margin_selected) and torch.equal(a.tokens_per_expert, b.tokens_per_expert)
        assert all(torch.equal(u, v) for u, v in zip(a.basis, b.basis))
    assert all(torch.equal(x, y) for x, y in zip(one.probe_logits, per_layer.probe_logits))


def test_float16_bases_halve_their_bytes_and_still_hold_selection():
    moe32, grip32, base32, _ = _run("olmoe", GRIPConfig())
    moe16, grip16, base16, _ = _run("olmoe", GRIPConfig(basis_dtype="float16"))
    bytes_of = lambda st: sum(b.numel() * b.element_size() for l in st.layers for b in l.basis)
    assert {b.dtype for l in grip16.state.layers for b in l.basis} == {torch.float16}
    assert 2 * bytes_of(grip16.state) == bytes_of(grip32.state) > 0
    view16 = _router_view(moe16, grip16, base16)
    assert _stability(base16, [m for _, m in view16]) == 1.0                 # margins still enforced
    drift = lambda view, base: max(float((lg - base.logits[l])[base.selection_mask(l)].abs().max())
                                   for l, (lg, _) in enumerate(view))
    # float16 rounding of U_j lets ~1e-3 of the removed component through: small, but not float32's ~1e-7
    assert drift(view16, base16) < 1e-2
    assert drift(_router_view(moe32, grip32, base32), base32) < 1e-5

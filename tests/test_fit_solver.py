"""GRIP fit at real width: the float32 eigh path (`fit_solver="auto"`) keeps float64's ranks and spans.

Principal angles between the two paths' U_j, per expert, must be ≈ 0 and the ranks equal, on:
- synthetic Grams at d' 1024 (low-rank signal + a noise floor under eps_null: the case where float32 alone
  gets the rank WRONG and the float64 complement check is needed),
- the demo model (d 256), and a random OLMoE built from a real transformers config at d 512.
Expected values are computed here by the float64 path, never hard-coded.
"""
import math

import pytest
import torch

from grip_core import MoEModel
from grip_core.grip import GRIP, GRIPConfig
from grip_core.grip.fit import MAX_SPAN_ANGLE, eig_basis
from grip_core.moe.tiny import build_tiny_model


def max_principal_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (rad) between span(A) and span(B), both (d, r); small angles resolved by the sine."""
    if A.shape[1] == 0:
        return 0.0
    qa, qb = torch.linalg.qr(A.double())[0], torch.linalg.qr(B.double())[0]
    return math.asin(min(1.0, float(torch.linalg.matrix_norm(qb - qa @ (qa.T @ qb), ord=2))))


def _lowrank_gram(n: int, d: int, r_sig: int, noise: float, seed: int) -> torch.Tensor:
    """(d, d) float64 Gram of n inputs: a rank-r_sig signal with a decaying spectrum + isotropic noise."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, r_sig, generator=g))[0]
    s = (torch.arange(r_sig, dtype=torch.float32) + 1).pow(-0.5)
    s = s * math.sqrt(d / float(s.pow(2).sum()))
    x = ((torch.randn(n, r_sig, generator=g) * s) @ basis.T + noise * torch.randn(n, d, generator=g)).double()
    return x.T @ x


def _compare(bases64, bases_auto, bound=MAX_SPAN_ANGLE):
    """Same ranks; every span within `bound` rad (the solver's Davis-Kahan guard; float16 storage rounds by 5e-4)."""
    assert [b.shape for b in bases64] == [b.shape for b in bases_auto]
    angles = [max_principal_angle(a, b) for a, b in zip(bases64, bases_auto)]
    assert max(angles) <= bound, angles
    return max(angles)


def test_float32_path_needs_and_passes_the_float64_check_on_a_noise_floor():
    d = 1024
    grams = torch.stack([_lowrank_gram(768, d, 96, 1e-3, seed) for seed in range(2)])
    lam32 = torch.linalg.eigvalsh(grams[0].float()).double()
    lam64 = torch.linalg.eigvalsh(grams[0])
    # the premise: float32 alone would keep noise directions (its error ~ eps32·σ²_max >> eps_null)
    assert int((lam32 > 1e-2).sum()) != int((lam64 > 1e-2).sum()) == 96
    report = {}
    b64, s64 = eig_basis(grams, GRIPConfig(fit_solver="float64"))
    b32, s32 = eig_basis(grams, GRIPConfig(fit_solver="auto"), report=report)
    assert report == {"float32_checked": 2}
    assert _compare(b64, b32, 1e-8) <= 1e-8                     # refined in float64: angles ~1e-9
    top = [b.shape[1] for b in b64]
    for j, r in enumerate(top):                                  # certified eigenvalues: float64-accurate Ritz values
        assert torch.allclose(s32[j, :r], s64[j, :r], rtol=1e-9)


def test_float32_path_falls_back_where_the_spectrum_does_not_allow_it():
    d = 256
    gram = _lowrank_gram(512, d, 64, 1e-3, 0)[None]
    report = {}
    # eps_null inside the signal spectrum, next to an eigenvalue: float32 cannot decide, float64 runs
    lam = torch.linalg.eigvalsh(gram[0]).flip(-1)
    eps = float(lam[40]) * (1 - 1e-9)
    b64, _ = eig_basis(gram, GRIPConfig(fit_solver="float64", eps_null=eps))
    b, _ = eig_basis(gram, GRIPConfig(fit_solver="auto", eps_null=eps), report=report)
    assert report == {"float64": 1} and torch.equal(b[0], b64[0])
    with pytest.raises(ValueError, match="fit_solver"):
        GRIPConfig(fit_solver="float16")


def _batches(vocab: int, n: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, T), generator=g)
    return [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones_like(ids[i:i + 8])} for i in range(0, n, 8)]


def _fit_both(moe, batches, **cfg):
    old = GRIP.fit(moe, batches, GRIPConfig(fit_solver="float64", **cfg)).state
    new = GRIP.fit(moe, batches, GRIPConfig(fit_solver="auto", **cfg)).state
    for a, b in zip(old.layers, new.layers):
        assert torch.equal(a.ranks, b.ranks)
        _compare(a.basis, b.basis)
        assert torch.equal(a.margin_x, b.margin_x) and torch.equal(a.tokens_per_expert, b.tokens_per_expert)
    assert torch.equal(old.null_space_rank, new.null_space_rank)
    return old, new


def test_demo_model_bases_match_the_float64_path():
    from grip_core import load_model

    moe = load_model("demo")
    vocab = moe.model.config.vocab_size
    old, new = _fit_both(moe, _batches(vocab, 16, 24, 0), max_margin_rows=64, probe_tokens=64)
    assert old.fit_solvers == {"float64": sum(l.num_experts for l in old.layers)}
    assert sum(new.fit_solvers.values()) == sum(old.fit_solvers.values())


@pytest.mark.parametrize("kind", ["absolute", "relative"])
def test_wide_random_olmoe_bases_match_the_float64_path(kind):
    model = build_tiny_model("olmoe", seed=0, hidden_size=512, num_hidden_layers=1, num_experts=4,
                             num_experts_per_tok=2, intermediate_size=64, num_attention_heads=4,
                             num_key_value_heads=4)
    moe = MoEModel(model)
    # 640 tokens, top-2 of 4: ~320 per expert < d = 512, so every X_j is rank-deficient (numerical zeros)
    old, new = _fit_both(moe, _batches(128, 32, 20, 1), threshold_kind=kind, energy=0.99,
                         max_margin_rows=64, probe_tokens=64)
    assert sum(new.fit_solvers.values()) == 4
    if kind == "absolute":                                       # rank-deficient X_j: the float64 check certifies
        assert new.fit_solvers.get("float64", 0) < 4

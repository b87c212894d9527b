"""GRIP modes are defined once (grip_core.grip.config.MODES), and the step's cached margin scores stay exact."""
from typing import get_args

import pytest
import torch

from grip_core import MoEModel
from grip_core.cli import build_parser
from grip_core.grip import GRIP, GRIPConfig
from grip_core.grip.config import MODES, Mode
from grip_core.grip.fit import router_matrix
from grip_core.grip.project import alpha_logit_rows, alpha_scale, margin_bounds
from grip_core.moe.selection import SelectionRule
from grip_core.moe.tiny import build_tiny_model
from grip_core.runs.compare import GRIP_MODES, grip_config


def test_registry_is_the_one_source():
    for base in get_args(Mode):                                              # every base mode is an entry
        assert MODES[base].overrides["mode"] == base
    for name, m in MODES.items():
        assert m.description and "\n" not in m.description
        assert GRIPConfig(**m.overrides).mode in get_args(Mode)             # every entry is a valid config
        assert GRIP_MODES[name] == dict(m.overrides)                         # the runner's table is the registry
    with pytest.raises(ValueError, match="unknown GRIP mode 'nope'"):
        grip_config("nope")
    sub = build_parser()._subparsers._group_actions[0].choices              # the CLI's help lists every mode
    for command in ("compare", "run"):
        text = sub[command].format_help()
        assert all(f"{name}: {m.description.split()[0]}" in " ".join(text.split()) for name, m in MODES.items())


def test_alpha_fast_path_equals_general_bounds():
    g = torch.Generator().manual_seed(0)
    M, E, k, eps = 300, 8, 2, 1e-2
    S = torch.randn(M, E, generator=g)
    selected = S.topk(k, dim=1).indices
    sel = torch.zeros(M, E, dtype=torch.bool).scatter_(1, selected, True)
    cols = torch.tensor([1, 4, 6])
    V = 0.5 * torch.randn(M, len(cols), generator=g)
    _, hi = margin_bounds(S, selected, SelectionRule(), eps, cols=cols, lo_none=True)
    want = alpha_scale(V, None, hi)
    got = alpha_logit_rows(S.T.contiguous(), selected, sel.T.contiguous(), cols, V.T.contiguous(), eps)
    torch.testing.assert_close(got, want)
    assert (want < 1).any() and (want > 0).any()                             # the case binds, not trivially 1


def test_cached_margin_scores_track_the_router():
    """Scores advanced step by step equal a fresh product; a write outside GRIP is noticed (recomputed)."""
    moe = MoEModel(build_tiny_model("olmoe", seed=0))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (8, 16), generator=g)
    grip = GRIP.fit(moe, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}],
                    GRIPConfig(threshold_kind="relative", energy=0.9))           # free directions: rows move
    opt = grip.wrap(torch.optim.AdamW([l.router_weight for l in moe.layers], lr=1e-2))
    for _ in range(5):
        for l in moe.layers:
            l.router_weight.grad = torch.randn(l.router_weight.shape, generator=g)
        opt.step()
    for pos, l in enumerate(moe.layers):
        P = grip._projector(pos, False)
        exact = router_matrix(l) @ P.X_full.T
        assert torch.equal(P.theta_ref, router_matrix(l)) and P.age == 5          # never recomputed
        torch.testing.assert_close(P.ST, exact, rtol=0, atol=1e-4)
    with torch.no_grad():
        moe.layers[0].router_weight.add_(0.1)                                # outside GRIP
    assert torch.equal(grip._scores(grip._projector(0, False), router_matrix(moe.layers[0])),
                       router_matrix(moe.layers[0]) @ grip._projector(0, False).X_full.T)

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


def test_input_anchor_is_validated():
    from grip_core.moe.errors import ConfigError

    with pytest.raises(ConfigError, match="input_anchor must be >= 0"):
        GRIPConfig(input_anchor=-1.0)
    with pytest.raises(ConfigError, match="input_anchor needs a GRIP mode other than 'off'"):
        GRIPConfig(mode="off", input_anchor=1.0)
    with pytest.raises(ConfigError, match="input_anchor_layers must be >= 0"):
        GRIPConfig(input_anchor_layers=-1)
    from types import SimpleNamespace

    from grip_core.integrations import check_trainer_supported

    moe = MoEModel(build_tiny_model("olmoe", seed=0))             # the Trainer computes the loss: refused there
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(0))
    grip = GRIP.fit(moe, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], GRIPConfig(input_anchor=1.0))
    with pytest.raises(ValueError, match="input_anchor"):
        check_trainer_supported(SimpleNamespace(deepspeed=None, fsdp=None, distributed_state=None), grip, moe.model)


def _retained_input_drift(work: MoEModel, base_trace) -> float:
    """Mean over MoE layers of Σ‖h − h_base‖² / Σ‖h_base‖² on the traced retained tokens."""
    drift = [(h - h0).pow(2).sum() / h0.pow(2).sum() for h, h0 in zip(work.trace(
        base_trace.meta["batches"], keep_inputs=True).inputs, base_trace.inputs)]
    return float(torch.stack(drift).mean())


def test_input_anchor_holds_retained_router_inputs(demo, data):
    """The anchor is exactly 0 on the first step (the job's copy is the base), positive after; the retained
    tokens' router inputs drift less with it than without; GA (no retain forward) gets the same value."""
    import copy
    import dataclasses

    from grip_core.data import encode_qa
    from grip_core.grip.anchor import RouterInputAnchor
    from grip_core.runs.compare import make_config
    from grip_core.runs.job import Job

    batches = [encode_qa(demo.tokenizer, data.retain_eval, max_length=64)]
    base_trace = demo.trace(batches, keep_inputs=True)
    base_trace.meta["batches"] = batches
    drift, logs = {}, {}
    baseline = None
    for lam in (0.0, 1000.0):
        config = make_config("graddiff", "update", "shortcut", 0, 6, eval_every=0, eval_examples=8,
                             final_eval_examples=8, grip_fit_examples=64)
        config.scope = dataclasses.replace(config.scope, lr=1e-3)
        config.grip = dataclasses.replace(config.grip, input_anchor=lam)
        job = Job(demo, config, data, baseline=baseline, save=False)
        with job.guard():
            job.prepare()
            job.fit()
            while job.step():
                pass
        baseline = job.baseline
        drift[lam], logs[lam] = _retained_input_drift(job.work, base_trace), job.step_log
    assert logs[1000.0][0]["input_anchor"] == 0.0 and logs[1000.0][-1]["input_anchor"] > 0
    assert "input_anchor" not in logs[0.0][0]
    assert 0 < drift[1000.0] < 0.5 * drift[0.0], drift

    work = copy.deepcopy(demo.model)                           # GA's path (an extra forward) = the method's path
    with torch.no_grad():
        for layer in MoEModel(work).layers[:-1]:
            layer.experts.down_proj.mul_(1.1)
    anchor = RouterInputAnchor(MoEModel(work).layers, demo.model, 1.0, last_layers=2)
    own = anchor.loss(work, batches[0], {})
    with anchor.watch(work, batches[0]) as seen:
        work(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    assert own > 0 and len(seen) == 2 and torch.equal(anchor.loss(work, batches[0], seen), own)

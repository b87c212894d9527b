"""Trainable scopes: the exact set of trainable parameter names per kind, and the LR groups.

Expected sets are written from parameter-name patterns of each family, not from
grip_core.scope's own classification.
"""
import pytest
import torch
import transformers

from grip_core import MoEModel
from grip_core.moe.tiny import build_tiny_model
from grip_core.scope import SCOPE_KINDS, ScopeConfig, build_param_groups, scope_parameter_names

LR = 1e-3


@pytest.fixture(scope="module")
def olmoe():
    cfg = transformers.OlmoeConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=100,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(cfg).eval()
    return model, MoEModel(model)


@pytest.fixture(scope="module")
def qwen():  # shared expert + shared-expert gate inside the MoE block
    model = build_tiny_model("qwen2_moe")
    return model, MoEModel(model)


@pytest.fixture(scope="module")
def granite():  # shared experts beside the MoE block, in the decoder layer
    model = build_tiny_model("granitemoeshared")
    return model, MoEModel(model)


def names(model):
    return {n for n, _ in model.named_parameters()}


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def olmoe_sets(model):
    routers = {n for n in names(model) if n.endswith(".mlp.gate.weight")}
    experts = {n for n in names(model) if ".mlp.experts." in n}
    return routers, experts, names(model) - routers - experts


def check_groups(model, groups, scope, expected_by_group):
    """Groups are disjoint, cover exactly the trainable set, carry names, and have the scope's LRs."""
    got = {g["name"]: set(g["param_names"]) for g in groups}
    assert got == {k: v for k, v in expected_by_group.items() if v}
    params = dict(model.named_parameters())
    for g in groups:
        assert [params[n] for n in g["param_names"]] == g["params"]  # same order, same tensors
        mult = {"routers": scope.router_lr_mult, "experts": scope.expert_lr_mult, "other": scope.other_lr_mult}
        assert g["lr"] == pytest.approx(scope.lr * mult[g["name"]])
    assert trainable(model) == set().union(*got.values())


def test_olmoe_each_kind(olmoe):
    model, moe = olmoe
    routers, experts, rest = olmoe_sets(model)
    assert len(routers) == 2 and len(experts) == 4 and "lm_head.weight" in rest and "model.embed_tokens.weight" in rest
    layer1 = {n for n in names(model) if n.startswith("model.layers.1.")}
    expected = {
        "all": (routers, experts, rest),
        "moe": (routers, experts, set()),
        "experts+routers": (routers, experts, set()),
        "routers-only": (routers, set(), set()),
        "all-but-routers": (set(), experts, rest),
        "layers": (routers & layer1, experts & layer1, rest & layer1),
    }
    assert set(expected) == set(SCOPE_KINDS)
    for kind, (r, e, o) in expected.items():
        scope = ScopeConfig(kind=kind, layers=[1] if kind == "layers" else None, lr=LR,
                            router_lr_mult=30.0, expert_lr_mult=2.0, other_lr_mult=0.5)
        groups = build_param_groups(model, moe, scope)
        check_groups(model, groups, scope, {"routers": r, "experts": e, "other": o})
        assert set(scope_parameter_names(model, moe, scope)) == r | e | o
    assert [g["name"] for g in build_param_groups(model, moe, ScopeConfig(lr=LR))] == ["routers", "experts", "other"]


def test_layer_filters_and_negative_indices(olmoe):
    model, moe = olmoe
    routers, experts, _ = olmoe_sets(model)
    build_param_groups(model, moe.layers, ScopeConfig("routers-only", layers=[0], lr=LR))  # a plain list works too
    assert trainable(model) == {"model.layers.0.mlp.gate.weight"}
    build_param_groups(model, moe, ScopeConfig("moe", layers=[-1], lr=LR))
    assert trainable(model) == {n for n in routers | experts if n.startswith("model.layers.1.")}
    build_param_groups(model, moe, ScopeConfig("layers", layers=[0, 1], lr=LR))
    assert trainable(model) == {n for n in names(model) if n.startswith("model.layers.")}


def test_shared_experts_inside_block(qwen):
    model, moe = qwen
    routers = {n for n in names(model) if n.endswith(".mlp.gate.weight")}
    routed = {n for n in names(model) if ".mlp.experts." in n}
    shared = {n for n in names(model) if ".mlp.shared_expert" in n}  # shared_expert.* and shared_expert_gate
    assert shared and routed and routers
    for kind, want in [("moe", routers | routed | shared), ("experts+routers", routers | routed)]:
        scope = ScopeConfig(kind, lr=LR, router_lr_mult=10.0)
        groups = build_param_groups(model, moe, scope)
        check_groups(model, groups, scope, {"routers": routers, "experts": want - routers, "other": set()})
    scope = ScopeConfig("all", lr=LR, router_lr_mult=10.0)
    check_groups(model, build_param_groups(model, moe, scope), scope,
                 {"routers": routers, "experts": routed | shared, "other": names(model) - routers - routed - shared})


def test_shared_experts_beside_block(granite):
    model, moe = granite
    routers = {n for n in names(model) if n.endswith(".block_sparse_moe.router.weight")}
    routed = {n for n in names(model) if ".block_sparse_moe.experts." in n}
    shared = {n for n in names(model) if ".shared_mlp." in n}
    assert shared
    build_param_groups(model, moe, ScopeConfig("moe", lr=LR))
    assert trainable(model) == routers | routed | shared
    build_param_groups(model, moe, ScopeConfig("experts+routers", lr=LR))
    assert trainable(model) == routers | routed


def test_optimizer_moves_only_the_scope(olmoe):
    model, moe = olmoe
    scope = ScopeConfig("experts+routers", lr=LR, router_lr_mult=30.0)
    opt = torch.optim.AdamW(build_param_groups(model, moe, scope))
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(LR * 30), pytest.approx(LR)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(3, 100, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable(model)
    with torch.no_grad():  # leave the shared fixture as it was
        for n, p in model.named_parameters():
            p.copy_(before[n])


def test_invalid_scopes(olmoe):
    model, moe = olmoe
    with pytest.raises(ValueError, match="unknown scope kind"):
        ScopeConfig("attention", lr=LR)
    with pytest.raises(ValueError, match="layers"):
        ScopeConfig("layers", lr=LR)
    with pytest.raises(ValueError, match="no `layers`"):
        ScopeConfig("all", layers=[0], lr=LR)
    with pytest.raises(ValueError, match="lr"):
        ScopeConfig("all", lr=0.0)
    with pytest.raises(ValueError, match="out of range"):
        build_param_groups(model, moe, ScopeConfig("layers", layers=[2], lr=LR))

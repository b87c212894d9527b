"""Discovery and tracing on tiny random models built from each family's real config class."""
import json

import pytest
import torch
from torch import nn

from grip_core import MoEModel, ModelLoadError, NotAnMoEModelError, UnsupportedRouterError, load_model
from grip_core.moe.tiny import TINY_CONFIGS, build_tiny_model

FAMILIES = sorted(TINY_CONFIGS)


def _batch(seed=0, B=3, T=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0   # right padding on two rows
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _router_outputs(moe: MoEModel, batch):
    """What each router itself returned, captured by an independent hook (the test's own)."""
    seen = {}
    handles = [l.router.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
               for i, l in enumerate(moe.layers)]
    try:
        with torch.no_grad():
            out = moe.model(**batch, output_router_logits=True)
    finally:
        for h in handles:
            h.remove()
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_and_trace_match_router(family):
    moe = MoEModel(build_tiny_model(family, seed=1))
    assert len(moe.layers) == 2
    assert [l.index for l in moe.layers] == [0, 1]
    for l in moe.layers:
        assert (l.num_experts, l.top_k, l.hidden_size) == (8, 2, 64)
        assert tuple(l.router_weight.shape) == (8, 64)
    batch = _batch()
    trace = moe.trace(batch)
    real = batch["attention_mask"].reshape(-1).bool()
    assert trace.num_tokens == int(real.sum())
    assert trace.sequence_index.tolist() == [0] * 7 + [1] * 5 + [2] * 3
    seen, out = _router_outputs(moe, batch)
    for i, layer in enumerate(moe.layers):
        o = seen[i]
        if layer.family.output == "scores_logits":   # Llama4: (scores, logits), scores 0 where unselected
            scores, logits = o
            want_sets = [set(r.nonzero().flatten().tolist()) for r in scores.reshape(-1, 8)[real]]
        else:
            logits, _, idx = o
            want_sets = [set(r.tolist()) for r in idx.reshape(-1, 2)[real]]
        got_sets = [set(r.tolist()) for r in trace.selected[i]]
        assert got_sets == want_sets
        torch.testing.assert_close(trace.logits[i], logits.reshape(-1, 8).float()[real])
        if getattr(out, "router_logits", None) is not None:
            torch.testing.assert_close(trace.logits[i], out.router_logits[i].reshape(-1, 8).float()[real])
        # the family row's selection rule (MoELayer.selection_rule) reproduces the router's own top-k
        rule = layer.selection_rule()
        assert rule.kind == layer.family.selection
        if layer.family.grouped_topk:
            assert (rule.num_group, rule.topk_group) == (layer.router.num_group, layer.router.topk_group)
        assert torch.equal(rule.select(trace.logits[i], layer.top_k), trace.selection_mask(i))


def test_selection_bias_is_respected_deepseek():
    """DeepSeek-V3 chooses with sigmoid + a selection-only bias: a large bias must force its expert."""
    moe = MoEModel(build_tiny_model("deepseek_v3", seed=2))
    layer = moe.layers[0]
    assert layer.score_fn == "sigmoid" and layer.family.grouped_topk
    with torch.no_grad():
        layer.selection_bias.zero_()
        layer.selection_bias[5] = 10.0
    trace = moe.trace(_batch())
    assert (trace.selected[0] == 5).any(dim=1).all()
    # the logits themselves do not contain the bias: selection differs from top-k of logits
    assert not torch.equal(torch.topk(trace.logits[0], 2).indices.sort().values, trace.selected[0].sort().values)


def test_router_bias_and_shared_experts_reported():
    gpt = MoEModel(build_tiny_model("gpt_oss")).layers[0]
    assert gpt.router_bias is not None and gpt.router_bias.shape == (8,)
    qwen = MoEModel(build_tiny_model("qwen2_moe")).layers[0]
    assert qwen.shared_experts == "model.layers.0.mlp.shared_expert"
    assert MoEModel(build_tiny_model("mixtral")).layers[0].shared_experts is None


def test_trace_texts_keep_inputs_and_batching():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(100)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    moe = MoEModel(build_tiny_model("olmoe"), tok)
    texts = ["w1 w2 w3", "w4", "w5 w6", "w7 w8 w9 w10"]
    whole = moe.trace(texts, keep_inputs=True, batch_size=4)
    parts = moe.trace(texts, keep_inputs=True, batch_size=2)
    assert whole.num_tokens == parts.num_tokens == 10
    assert torch.equal(whole.sequence_index, parts.sequence_index)
    for a, b, x in zip(whole.selected, parts.selected, whole.inputs):
        assert torch.equal(a, b)
        assert x.shape == (10, 64)
    # router inputs reproduce the logits: logits = x @ W^T
    torch.testing.assert_close(whole.inputs[0] @ moe.layers[0].router_weight.detach().T, whole.logits[0],
                               rtol=1e-4, atol=1e-5)


def test_hooks_removed_even_on_error():
    moe = MoEModel(build_tiny_model("mixtral"))
    with pytest.raises(Exception):
        moe.trace({"input_ids": torch.full((1, 4), 10_000)})   # out-of-vocabulary id -> forward raises
    assert all(len(l.router._forward_hooks) == 0 for l in moe.layers)


def test_not_an_moe_model_names_class():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32))
    with pytest.raises(NotAnMoEModelError, match="LlamaForCausalLM"):
        MoEModel(dense)


class _OddRouter(nn.Module):
    """A router from an unknown remote-code family: returns (weights, indices) only."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.weight = inner.weight
        self.top_k = inner.top_k

    def forward(self, x):
        _, w, i = self.inner(x)
        return w, i


def test_unreadable_router_output_is_an_error_naming_family_and_module():
    model = build_tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = type("MixtralOddTopKRouter", (_OddRouter,), {})(layer.mlp.gate)
    moe = MoEModel(model)
    with pytest.raises(UnsupportedRouterError, match=r"Mixtral.*model\.layers\.0\.mlp\.gate"):
        moe.trace(_batch())


def test_unknown_router_class_is_an_error_not_an_empty_trace():
    model = build_tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = nn.Linear(64, 8, bias=False)
    with pytest.raises(UnsupportedRouterError, match="model.layers.0.mlp"):
        MoEModel(model)


def test_load_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path / "empty")
    corrupt = tmp_path / "corrupt"
    build_tiny_model("olmoe").save_pretrained(corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="could not load|unreadable safetensors header"):
        load_model(corrupt)


def test_load_model_roundtrip_local_dir(tmp_path):
    model = build_tiny_model("qwen3_moe", seed=3)
    model.save_pretrained(tmp_path / "ckpt")
    moe = load_model(tmp_path / "ckpt")
    assert moe.family == "Qwen3-MoE" and len(moe.layers) == 2
    torch.testing.assert_close(moe.layers[1].router_weight, model.model.layers[1].mlp.gate.weight)
    assert json.loads(json.dumps(moe.describe()))["num_moe_layers"] == 2


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "mixtral", "gpt_oss"])
def test_cpu_experts_forward_is_bitwise_eager(family):
    """load_model's CPU experts path (fast_experts) = transformers' eager: same loss, same gradients.

    OLMoE and Qwen2-MoE take the unbind path; Mixtral and GPT-OSS (other layouts) must fall back to their own eager code."""
    import copy

    from grip_core.moe.fast_experts import register

    eager = build_tiny_model(family, seed=1)
    eager.set_experts_implementation("eager")
    fast = copy.deepcopy(eager)
    fast.set_experts_implementation(register())
    batch = _batch(seed=2)
    grads = []
    for m in (eager, fast):
        m.train()
        loss = m(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 0
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert load_model("demo").model.config._experts_implementation == register()

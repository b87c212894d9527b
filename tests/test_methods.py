"""Each unlearning loss against a hand computation on a tiny OLMoE with fixed inputs.

The hand versions take logits / hidden states straight from the model and apply
the formulas of docs/method.md#unlearning-methods token by token with explicit torch ops, sharing no
code with grip_core.methods.
"""
import copy
import math
import pathlib

import pytest
import torch
import transformers

import grip_core.methods as M
from grip_core.methods import answer_nll, available_methods, get_method, register_method, sequence_logprob

TOL = 1e-5
METHODS = {"ga", "graddiff", "npo", "simnpo", "rmu"}


@pytest.fixture(scope="module")
def models():
    """(model, ref): ref is the 'original', model a perturbed copy so log-ratios are non-zero."""
    cfg = transformers.OlmoeConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=100,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    ref = transformers.OlmoeForCausalLM(cfg).eval()
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    for p in ref.parameters():
        p.requires_grad_(False)
    return model, ref


def make_batch(seed, lengths, prompt_lens, T=9):
    """Right-padded batch; labels are the tokens after the prompt (answer), -100 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(3, 100, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100)
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        mask[b, :n] = 1
        ids[b, n:] = 0
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def forget():
    return make_batch(10, lengths=[9, 7, 5], prompt_lens=[4, 3, 2])


@pytest.fixture(scope="module")
def retain():
    return make_batch(11, lengths=[8, 9], prompt_lens=[5, 3])


# ------------------------------------------------------------------ hand computations


def hand_token_logprobs(model, batch):
    """Per sequence: the list of log p(y_t | y_<t) over its answer tokens, read off the logits."""
    with torch.no_grad():
        logp = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.log_softmax(-1)
    out = []
    for b in range(batch["labels"].shape[0]):
        lab = batch["labels"][b]
        out.append([logp[b, t - 1, lab[t]].item() for t in range(1, lab.shape[0]) if lab[t] != -100])
    return out


def hand_nll_mean(model, batch):
    lps = hand_token_logprobs(model, batch)
    return -sum(sum(s) for s in lps) / sum(len(s) for s in lps)


def log_sigmoid(x):
    return math.log(1.0 / (1.0 + math.exp(-x)))


def hook_ids(model):
    """Forward hooks on the decoder layers (transformers installs its own output-capture hooks once)."""
    return [list(l._forward_hooks) for l in model.model.layers]


def close(a, b):
    a = a.item() if torch.is_tensor(a) else a
    return abs(a - b) <= TOL * max(1.0, abs(b))


# ------------------------------------------------------------------ helpers


def test_answer_nll_reductions(models, forget):
    model, _ = models
    lps = hand_token_logprobs(model, forget)
    with torch.no_grad():
        assert close(answer_nll(model, forget), hand_nll_mean(model, forget))
        # HF's own label loss is the token mean too
        assert close(answer_nll(model, forget), model(**forget).loss.item())
        sums = answer_nll(model, forget, reduction="seq_sum")
        means = answer_nll(model, forget, reduction="seq_mean")
        lp_sum, lp_norm = sequence_logprob(model, forget), sequence_logprob(model, forget, normalize=True)
    assert sums.shape == means.shape == lp_sum.shape == (3,)
    for b, s in enumerate(lps):
        assert close(sums[b], -sum(s)) and close(means[b], -sum(s) / len(s))
        assert close(lp_sum[b], sum(s)) and close(lp_norm[b], sum(s) / len(s))
    with pytest.raises(ValueError, match="reduction"):
        answer_nll(model, forget, reduction="bogus")


# ------------------------------------------------------------------ each method


def test_ga(models, forget):
    model, _ = models
    out = get_method("ga").loss(model, forget)
    assert close(out.total, -hand_nll_mean(model, forget))
    assert out.total.requires_grad and out.total.dim() == 0
    assert close(out.parts["forget_loss"], out.total.item())


def test_graddiff_nll(models, forget, retain):
    model, _ = models
    m = get_method("graddiff", gamma=0.7, alpha=1.3)
    assert not m.needs_reference
    out = m.loss(model, forget, retain)
    want = -0.7 * hand_nll_mean(model, forget) + 1.3 * hand_nll_mean(model, retain)
    assert close(out.total, want)
    assert close(out.parts["retain_loss"], hand_nll_mean(model, retain))


def test_graddiff_kl(models, forget, retain):
    model, ref = models
    m = get_method("graddiff", gamma=0.5, alpha=2.0, retain_loss="kl")
    assert m.needs_reference
    with torch.no_grad():
        lp = model(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits.log_softmax(-1)
        lq = ref(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits.log_softmax(-1)
    kls = []
    for b in range(retain["labels"].shape[0]):
        for t in range(1, retain["labels"].shape[1]):
            if retain["labels"][b, t] != -100:  # position t-1 predicts answer token t
                kls.append((lq[b, t - 1].exp() * (lq[b, t - 1] - lp[b, t - 1])).sum().item())
    kl = sum(kls) / len(kls)
    assert kl > 0
    out = m.loss(model, forget, retain, ref_model=ref)
    assert close(out.total, -0.5 * hand_nll_mean(model, forget) + 2.0 * kl)
    with pytest.raises(ValueError, match="reference"):
        m.loss(model, forget, retain)


def test_npo(models, forget, retain):
    model, ref = models
    m = get_method("npo")
    assert m.needs_reference and m.args.beta == 0.1
    beta = 0.1
    ratios = [sum(a) - sum(r) for a, r in zip(hand_token_logprobs(model, forget), hand_token_logprobs(ref, forget))]
    assert all(abs(x) > 1e-3 for x in ratios)  # the perturbation made the test non-trivial
    lf = -(2 / beta) * sum(log_sigmoid(-beta * x) for x in ratios) / len(ratios)
    out = m.loss(model, forget, retain, ref_model=ref)
    assert close(out.parts["forget_loss"], lf)
    assert close(out.total, 1.0 * lf + 1.0 * hand_nll_mean(model, retain))
    # the reference really is used: against itself the log-ratio is 0 and L_f = (2/β)·log 2
    assert close(m.loss(ref, forget, retain, ref_model=ref).parts["forget_loss"], (2 / beta) * math.log(2))
    with pytest.raises(ValueError, match="reference"):
        m.loss(model, forget, retain)


def test_simnpo(models, forget, retain):
    model, _ = models
    d = M.SimNPOArgs()
    assert (d.beta, d.delta, d.gamma, d.alpha) == (4.5, 0.0, 0.125, 1.0)  # docs/method.md#unlearning-methods
    beta, delta, gamma, alpha = 4.5, 0.3, 0.125, 0.8
    m = get_method("simnpo", delta=delta, alpha=alpha)
    assert not m.needs_reference
    avg_nll = [-sum(s) / len(s) for s in hand_token_logprobs(model, forget)]
    lf = -(2 / beta) * sum(log_sigmoid(beta * x - delta) for x in avg_nll) / len(avg_nll)
    out = m.loss(model, forget, retain)
    assert close(out.parts["forget_loss"], lf)
    assert close(out.total, gamma * lf + alpha * hand_nll_mean(model, retain))


def test_rmu(models, forget, retain):
    model, ref = models
    c, alpha, gamma, layer = 3.0, 2.0, 0.9, 0
    m = get_method("rmu", layer=layer, c=c, alpha=alpha, gamma=gamma, seed=7)
    assert m.needs_reference

    def hidden(mod, batch):  # hidden_states[ℓ+1] is the output of decoder layer ℓ
        with torch.no_grad():
            return mod(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=True).hidden_states[layer + 1]

    def msd(a, b, labels):  # mean over sequences of the per-answer-token mean over d of (a-b)²
        per_seq = []
        for i in range(a.shape[0]):
            toks = [((a[i, t] - b[i, t]) ** 2).mean().item() for t in range(a.shape[1]) if labels[i, t] != -100]
            per_seq.append(sum(toks) / len(toks))
        return sum(per_seq) / len(per_seq)

    h_f = hidden(model, forget)
    cu = c * m.direction(h_f.shape[-1])
    lf = msd(h_f, cu.expand_as(h_f), forget["labels"])
    lr = msd(hidden(model, retain), hidden(ref, retain), retain["labels"])
    assert lr > 0
    hooks = hook_ids(model)
    out = m.loss(model, forget, retain, ref_model=ref)
    assert close(out.parts["forget_loss"], lf) and close(out.parts["retain_loss"], lr)
    assert close(out.total, gamma * lf + alpha * lr)

    # the forward stops after layer ℓ: nothing above it gets a gradient; no hook is left behind
    model.zero_grad()
    out.total.backward()
    assert model.lm_head.weight.grad is None and model.model.layers[1].self_attn.q_proj.weight.grad is None
    assert model.model.layers[0].mlp.gate.weight.grad is not None
    model.zero_grad()
    assert hook_ids(model) == hooks


def test_rmu_hook_removed_on_error(models, forget):
    model, ref = models
    hooks = hook_ids(model)
    bad = dict(forget, input_ids=forget["input_ids"] + 1000)  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        get_method("rmu", layer=0).loss(model, bad, forget, ref_model=ref)
    assert hook_ids(model) == hooks


def test_rmu_direction_fixed_by_seed():
    a, b, other = (get_method("rmu", seed=s) for s in (3, 3, 4))
    u = a.direction(64)
    assert u.shape == (64,) and close(u.norm(), 1.0)
    assert torch.equal(u, b.direction(64))
    assert not torch.allclose(u, other.direction(64))
    assert torch.equal(a.direction(64), u)  # stable across calls (cached)


@pytest.mark.parametrize("name", ["ga", "graddiff", "npo", "simnpo"])
def test_one_step_raises_forget_nll(models, forget, name):
    """Sign check: a small SGD step on the forget term alone makes the forget answers less likely."""
    model, ref = models
    model = copy.deepcopy(model)
    kwargs = {"ga": {}, "simnpo": {"alpha": 0.0, "beta": 0.5}}.get(name, {"alpha": 0.0})  # β=4.5 saturates at NLL≈4.6
    m = get_method(name, **kwargs)
    with torch.no_grad():
        before = answer_nll(model, forget).item()
    m.loss(model, forget, None, ref_model=ref).total.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-2 * p.grad
        after = answer_nll(model, forget).item()
    assert after > before


# ------------------------------------------------------------------ registry


def test_registry_lookup():
    assert METHODS <= set(available_methods())
    assert available_methods() == sorted(available_methods())
    for name, cls in [("ga", M.GA), ("graddiff", M.GradDiff), ("npo", M.NPO), ("simnpo", M.SimNPO), ("rmu", M.RMU)]:
        m = get_method(name)
        assert type(m) is cls and cls.name == name and isinstance(m.args, cls.args_cls)
    assert type(get_method("SimNPO")) is M.SimNPO  # case-insensitive
    assert get_method("npo", beta=0.5).args.beta == 0.5
    assert get_method("npo", args=M.NPOArgs(beta=0.2)).args.beta == 0.2
    assert [get_method(n).needs_reference for n in ("ga", "graddiff", "npo", "simnpo", "rmu")] == \
        [False, False, True, False, True]


def test_unknown_method_lists_available():
    with pytest.raises(ValueError) as e:
        get_method("unlearn-harder")
    assert "unlearn-harder" in str(e.value) and all(n in str(e.value) for n in METHODS)


def test_bad_arguments_are_clear():
    with pytest.raises(TypeError, match="beta"):
        get_method("ga", beta=1.0)
    with pytest.raises(ValueError, match="retain_loss"):
        get_method("graddiff", retain_loss="mse")
    with pytest.raises(ValueError, match="beta"):
        get_method("npo", beta=0.0)
    with pytest.raises(ValueError, match="retain"):
        get_method("graddiff").retain_term(None, None, None)


def test_register_new_method_and_duplicates():
    @register_method("zz_test_method")
    class Dummy(M.UnlearningMethod):
        def loss(self, model, forget_batch, retain_batch=None, ref_model=None):
            return M.MethodLoss(torch.zeros(()))

    try:
        assert "zz_test_method" in available_methods() and isinstance(get_method("zz_test_method"), Dummy)
        with pytest.raises(ValueError, match="already registered"):
            register_method("ga")(Dummy)
    finally:
        M.base._REGISTRY.pop("zz_test_method", None)


def test_every_module_of_the_package_is_imported():
    """Adding a method is one new file: the package imports each module, and each registers a class."""
    pkg = pathlib.Path(M.__file__).parent
    files = {p.stem for p in pkg.glob("*.py") if not p.stem.startswith("_") and p.stem != "base"}
    modules = {cls.__module__.rsplit(".", 1)[-1] for cls in M.base._REGISTRY.values()}
    assert files <= modules

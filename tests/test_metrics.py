"""grip_core.metrics: definitions on hand-made traces, attribution / restoration / ablation on tiny models
where the answer is known by construction."""
import copy
import json
import math

import pytest
import torch

from grip_core import MoEModel, RoutingTrace
from grip_core.metrics import (ablate_experts, attribute_models, compare_traces, domain_expert_nmi,
                               expert_by_label_matrix, experts_by_label, full_router_state, membership_auc,
                               routing_shift_attribution)
from grip_core.moe.tiny import build_tiny_model


def _trace(selected_per_layer, logits_per_layer=None, E=4, seq=None):
    """A RoutingTrace built by hand: selected_per_layer is a list of (N, k) lists."""
    sel = [torch.tensor(s) for s in selected_per_layer]
    N = sel[0].shape[0]
    logits = [torch.tensor(l, dtype=torch.float32) for l in logits_per_layer] if logits_per_layer else \
        [torch.zeros(N, E).scatter_(1, s, torch.arange(s.shape[1], 0, -1, dtype=torch.float32).expand_as(s).clone())
         for s in sel]   # first listed expert gets the largest logit
    seq = torch.tensor(seq) if seq is not None else torch.zeros(N, dtype=torch.long)
    return RoutingTrace(list(range(len(sel))), sel, logits, torch.arange(N) + 10, seq, torch.arange(N),
                        [E] * len(sel), meta={"num_sequences": int(seq.max()) + 1})


# ----------------------------------------------------------------------------- routing metrics by hand

BASE_L0 = [[0, 1], [2, 3], [0, 2], [1, 3]]   # counts per expert 2, 2, 2, 2
NEW_L0 = [[1, 0], [2, 1], [3, 1], [1, 3]]    # same set, 1 shared of 3, nothing shared, same; counts 1, 4, 1, 2


def test_compare_traces_hand_computed():
    r = compare_traces(_trace([BASE_L0, BASE_L0]), _trace([NEW_L0, BASE_L0]))
    l0, l1 = r.layers
    assert l0.stability == 2 / 4                                   # tokens 0 and 3 keep their SET (order ignored)
    assert l0.overlap == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert l0.jaccard == pytest.approx((1 + 1 / 3 + 0 + 1) / 4)
    assert l0.shift == pytest.approx(1 - (1 + 0.5 + 0 + 1) / 4)
    # f_base uniform; f_new = (1, 4, 1, 2) / 8: H = 1.75 ln 2, normalised by ln 4
    assert l0.entropy_base == pytest.approx(1.0)
    assert l0.entropy_new == pytest.approx(1.75 * math.log(2) / math.log(4))
    assert l0.freq_change == pytest.approx([1 / 8 - 1 / 4, 4 / 8 - 1 / 4, 1 / 8 - 1 / 4, 0.0])
    # Jeffreys pseudo-count 0.5: p = 2.5/10 each, q = (1.5, 4.5, 1.5, 2.5)/10
    assert l0.freq_kl == pytest.approx(0.25 * math.log(125 / 81))
    assert (l1.stability, l1.overlap, l1.jaccard, l1.shift, l1.freq_kl) == (1.0, 1.0, 1.0, 0.0, 0.0)
    assert r.stability == pytest.approx((0.5 + 1.0) / 2)
    assert r.freq_kl == pytest.approx(0.25 * math.log(125 / 81) / 2)
    assert r.freq_change_matrix()[1] == [0.0] * 4
    json.dumps(r.to_dict())


def test_kl_without_smoothing_and_mask():
    r = compare_traces(_trace([BASE_L0]), _trace([NEW_L0]), kl_pseudo_count=0.0)
    assert r.freq_kl == pytest.approx(0.25 * (2 * math.log(2) - math.log(2)))
    m = compare_traces(_trace([BASE_L0]), _trace([NEW_L0]), mask=torch.tensor([False, True, True, False]))
    assert m.num_tokens == 2 and m.stability == 0.0 and m.overlap == pytest.approx(0.25)


def test_compare_traces_refuses_different_tokens():
    other = _trace([BASE_L0])
    other.token_ids = other.token_ids + 1
    with pytest.raises(ValueError, match="same tokens"):
        compare_traces(_trace([BASE_L0]), other)


def test_domain_nmi_and_label_matrix():
    # sequence 0 = domain "a", sequence 1 = domain "b"; 3 tokens each
    seq = [0, 0, 0, 1, 1, 1]
    specialised = [[0, 1], [0, 3], [0, 2], [2, 1], [2, 3], [2, 0]]    # top-1 is 0 for a, 2 for b
    mixed = [[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [1, 0]]          # top-1 alternates, nearly label-free
    t = _trace([specialised, mixed], seq=seq)
    nmi = domain_expert_nmi(t, ["a", "b"])                            # per-sequence labels
    assert nmi.nmi[0] == pytest.approx(1.0)
    from sklearn.metrics import normalized_mutual_info_score
    assert nmi.nmi[1] == pytest.approx(normalized_mutual_info_score(list("aaabbb"), [0, 1, 0, 1, 0, 1]))
    assert nmi.nmi[1] < 0.2
    m = expert_by_label_matrix(t, list("aaabbb"), layer=0)
    assert m.labels == ["a", "b"]
    assert m.counts == [[3, 1, 1, 1], [1, 1, 3, 1]]
    assert m.matrix[0] == pytest.approx([3 / 6, 1 / 6, 1 / 6, 1 / 6])
    assert expert_by_label_matrix(t, list("aaabbb"), 0, top1_only=True).counts == [[3, 0, 0, 0], [0, 0, 3, 0]]
    assert experts_by_label(t, list("aaabbb"), per_layer=1, layers=[0]) == {"a": {0: [0]}, "b": {0: [2]}}
    json.dumps(nmi.to_dict()), json.dumps(m.to_dict())


def test_top1_is_the_selected_expert_with_the_largest_logit_not_the_first_listed():
    t = _trace([[[1, 0], [3, 2]]], logits_per_layer=[[[5.0, 1.0, 0, 0], [0, 0, 0.1, 0.2]]], seq=[0, 1])
    assert expert_by_label_matrix(t, ["x", "y"], top1_only=True).counts == [[1, 0, 0, 0], [0, 0, 0, 1]]


def test_membership_auc_by_hand():
    # score -nll: members -1, -2; non-members -1.5, -3 -> 3 of 4 pairs ordered correctly
    assert membership_auc([1.0, 2.0], [1.5, 3.0]) == pytest.approx(0.75)
    assert membership_auc([1.0], []) is None


# ----------------------------------------------------------------------------- attribution on tiny models

def _ids(seed=0, B=4, T=12):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, 128, (B, T), generator=g)}


def _pair(family, seed=1):
    base = MoEModel(build_tiny_model(family, seed=seed))
    return base, MoEModel(copy.deepcopy(base.model))


def test_attribution_router_change_only_layer0():
    base, new = _pair("olmoe")
    with torch.no_grad():
        new.layers[0].router_weight.add_(torch.randn_like(new.layers[0].router_weight))
    r = attribute_models(base, new, _ids())
    l0, l1 = r.layers
    assert l0.stability_drift_only == 1.0                  # layer 0 inputs did not move
    assert l0.stability_router_only < 1.0
    assert l0.stability_actual == l0.stability_router_only
    assert l0.router_share == pytest.approx(1.0) and l0.drift_contribution == pytest.approx(0.0)
    assert l1.stability_router_only == 1.0                 # layer 1's router did not move ...
    assert l1.router_contribution == 0.0                   # ... so none of its shift is the router's
    assert l1.stability_actual == l1.stability_drift_only
    assert all(l.trace_agreement_base == 1.0 and l.trace_agreement_new == 1.0 for l in r.layers)
    assert r.router_contribution + r.drift_contribution == pytest.approx(r.shift_actual)
    json.dumps(r.to_dict())


def test_attribution_embedding_change_only():
    base, new = _pair("olmoe")
    with torch.no_grad():
        emb = new.model.get_input_embeddings().weight
        emb.add_(0.5 * emb.std() * torch.randn_like(emb))
    r = attribute_models(base, new, _ids())
    assert r.stability_actual < 1.0
    for l in r.layers:
        assert l.stability_router_only == 1.0
        assert l.stability_actual == l.stability_drift_only
        assert l.router_contribution == 0.0
    assert r.drift_share == pytest.approx(1.0)


def test_attribution_respects_deepseek_selection_bias():
    """Only the selection-only bias changes: logits are identical, selection is not. Top-k of logits would miss it."""
    base, new = _pair("deepseek_v3")
    with torch.no_grad():
        new.layers[0].selection_bias.zero_()
        new.layers[0].selection_bias[3] = 10.0
    tb, tn = base.trace(_ids(), keep_inputs=True), new.trace(_ids(), keep_inputs=True)
    torch.testing.assert_close(tb.logits[0], tn.logits[0])
    r = routing_shift_attribution(base, full_router_state(base), full_router_state(new), tb, tn)
    assert r.layers[0].stability_drift_only == 1.0 and r.layers[0].stability_router_only < 1.0
    assert r.layers[0].trace_agreement_new == 1.0


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text", "hunyuan_v1_moe", "dots1"])
def test_recomputed_selection_matches_trace(family):
    base, new = _pair(family, seed=2)
    with torch.no_grad():
        for l in new.layers:
            l.router_weight.mul_(-1.0)
    r = attribute_models(base, new, _ids(seed=3))
    assert all(l.trace_agreement_base == 1.0 and l.trace_agreement_new == 1.0 for l in r.layers)


# ----------------------------------------------------------------------------- ablation on tiny models

@pytest.mark.parametrize("family", ["olmoe", "gpt_oss", "llama4_text", "qwen2_moe"])
def test_ablation_zeroes_and_restores_exactly(family):
    moe = MoEModel(build_tiny_model(family, seed=4))
    before = {k: v.clone() for k, v in moe.model.state_dict().items()}
    batch = _ids(seed=5)
    with torch.no_grad():
        ref = moe.model(**batch).logits
    with ablate_experts(moe, {0: list(range(moe.layers[0].num_experts))}):
        for p in moe.layers[0].experts.parameters():
            assert torch.count_nonzero(p) == 0
        assert any(torch.count_nonzero(p) for p in moe.layers[1].experts.parameters())
        with torch.no_grad():
            assert not torch.allclose(moe.model(**batch).logits, ref)
    after = moe.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ablated_experts_output_exactly_zero_and_restored_after_error():
    moe = MoEModel(build_tiny_model("olmoe", seed=6))   # OLMoE: no shared expert, block output = Σ w·expert
    outs = {}
    h = moe.layers[0].block.register_forward_hook(lambda m, a, o: outs.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    w = moe.layers[0].experts.down_proj
    w_before = w.detach().clone()
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with ablate_experts(moe, {0: range(8)}):
                with torch.no_grad():
                    moe.model(**_ids())
                assert torch.count_nonzero(outs["y"]) == 0
                raise RuntimeError("boom")
    finally:
        h.remove()
    assert torch.equal(w, w_before)
    with pytest.raises(ValueError, match="out of range"):
        with ablate_experts(moe, {0: [8]}):
            pass


# ----------------------------------------------------------------------------- probes / attacks on a tiny QA model

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy"]
COLORS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "navy", "plum", "rust"]


def _qa(i, domain):
    from grip_core.data import QAExample
    q, a = f"what color does {NAMES[i]} like?", COLORS[i]
    return QAExample(id=f"q{i}", question=q, answer=a, domain=domain, entity=NAMES[i], text=f"{NAMES[i]} likes {a}.",
                     paraphrase=f"which color is liked by {NAMES[i]}?")


@pytest.fixture(scope="module")
def qa_world():
    """A tiny OLMoE that memorised 8 facts (forget = 0-3, retain = 4-7); facts 8-9 are never seen (holdout).

    Only the EXPERTS train (attention, embeddings, routers, head stay at random init), so the
    knowledge is known to live in the experts and to be reached through the routers.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from grip_core.data import encode_qa

    words = ["<pad>", "<eos>", "<bos>", "<unk>", "Question", "Answer", ":", "?", ".", "what", "which", "color", "does",
             "like", "likes", "is", "liked", "by"] + NAMES + COLORS
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  bos_token="<bos>")
    examples = [_qa(i, "people" if i % 2 else "pets") for i in range(10)]
    forget, retain, holdout = examples[:4], examples[4:8], examples[8:]
    model = build_tiny_model("olmoe", seed=0, vocab_size=len(words), hidden_size=32, intermediate_size=32).train()
    experts = [p for n, p in model.named_parameters() if ".experts." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in experts:
        p.requires_grad_(True)
    batch = encode_qa(tok, forget + retain, 32)
    opt = torch.optim.Adam(experts, lr=1e-2)
    for _ in range(60):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return MoEModel(model, tok), {"forget": forget, "retain": retain, "holdout": holdout}


def test_probes_on_memorised_facts(qa_world):
    from grip_core.data import encode_qa
    from grip_core.metrics import answer_nll, run_probes

    moe, splits = qa_world
    r = run_probes(moe, splits, keep_details=True, batch_size=3)
    assert r.splits["forget"].exact_match == 1.0 and r.splits["retain"].exact_match == 1.0
    assert r.splits["holdout"].exact_match == 0.0
    assert r.splits["forget"].mean_nll < r.splits["holdout"].mean_nll
    # AUC = fraction of (member, non-member) pairs where the member has the lower loss
    f_nll, h_nll = [d["nll"] for d in r.details["forget"]], [d["nll"] for d in r.details["holdout"]]
    pairs = [(a < b) + 0.5 * (a == b) for a in f_nll for b in h_nll]
    assert r.membership_auc == pytest.approx(sum(pairs) / len(pairs)) and r.membership_auc > 0.5
    assert r.membership_pair == ("forget", "holdout")
    # per-example NLL == HF's own loss on that example alone (mean over answer tokens)
    nll = answer_nll(moe, splits["retain"], batch_size=2)
    for i, ex in enumerate(splits["retain"]):
        b = encode_qa(moe.tokenizer, [ex], 32)
        with torch.no_grad():
            assert nll[i].item() == pytest.approx(moe.model(**b).loss.item(), rel=1e-4)
    assert r.splits["retain"].mean_prob == pytest.approx(torch.exp(-nll).mean().item(), rel=1e-4)
    # domain breakdown adds up
    for split, probe in r.splits.items():
        doms = r.by_domain[split].values()
        assert sum(d.n for d in doms) == probe.n
        assert sum(d.n * d.exact_match for d in doms) / probe.n == pytest.approx(probe.exact_match)
    assert len(r.details["forget"]) == 4
    json.dumps(r.to_dict())
    # a paraphrase split, and a text-only row that has nothing to answer (judged for NLL only)
    from grip_core.data import QAExample
    from grip_core.metrics import paraphrased
    para = paraphrased(splits["forget"])
    assert [p.question for p in para] == [ex.paraphrase for ex in splits["forget"]]
    passage = QAExample(id="t0", question="", answer="", text="alice likes red .")
    m = run_probes(moe, {"mixed": splits["retain"] + [passage], "paraphrase": para}, by_domain=False)
    assert m.splits["mixed"].n == 5 and m.splits["mixed"].exact_match == 1.0 and m.membership_auc is None
    assert m.splits["paraphrase"].n == 4


def _perturbed(moe, what):
    new = MoEModel(copy.deepcopy(moe.model), moe.tokenizer)
    with torch.no_grad():
        for l in new.layers:
            if what == "routers":
                l.router_weight.copy_(l.router_weight.flip(0))          # every expert gets another expert's row
            else:
                for p in l.experts.parameters():
                    p.add_(3 * p.std() * torch.randn_like(p))
    return new


def test_restoration_recovers_router_only_forgetting(qa_world):
    from grip_core.metrics import exact_match_accuracy, router_restoration_attack, router_transplant

    moe, splits = qa_world
    original = moe.router_state()
    for what in ("routers", "experts"):
        unlearned = _perturbed(moe, what)
        state_before = {k: v.clone() for k, v in unlearned.model.state_dict().items()}
        r = router_restoration_attack(unlearned, original, splits["forget"], base=moe)
        assert r.em_base == 1.0 and r.em_unlearned < r.em_base       # the perturbation did break answers
        if what == "routers":                                        # restored = the base model exactly
            assert r.em_restored == r.em_base and r.recovered_raw == pytest.approx(1.0) and r.recovered == 1.0
        else:                                                        # routers never moved: nothing to restore
            assert r.em_restored == r.em_unlearned and r.recovered == 0.0
        assert all(torch.equal(v, unlearned.model.state_dict()[k]) for k, v in state_before.items())
        t = router_transplant(moe, unlearned.router_state(), splits["forget"], unlearned=unlearned)
        assert t.forgot == (1.0 if what == "routers" else 0.0)
        assert t.em_transplant == (r.em_unlearned if what == "routers" else r.em_base)
        json.dumps(r.to_dict()), json.dumps(t.to_dict())
    assert exact_match_accuracy(moe, splits["forget"]) == 1.0        # the base model was never touched


def test_ablation_table_on_memorised_facts(qa_world):
    from grip_core.metrics import ablation_table, exact_match_accuracy

    moe, splits = qa_world
    all_experts = {pos: list(range(l.num_experts)) for pos, l in enumerate(moe.layers)}
    t = ablation_table(moe, {"forget": splits["forget"], "retain": splits["retain"]},
                       {"everything": all_experts, "nothing": {}})
    assert t.ablated == ["none", "everything", "nothing"] and t.evaluated == ["forget", "retain"]
    assert t.accuracy[0] == [1.0, 1.0] and t.accuracy[2] == [1.0, 1.0]
    assert t.accuracy[1][0] < 1.0 and t.drop()[1][0] > 0
    assert exact_match_accuracy(moe, splits["retain"]) == 1.0        # restored after the table
    json.dumps(t.to_dict())

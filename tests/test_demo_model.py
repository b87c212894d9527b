"""The shipped demo model (data/demo_model/): loads fast, knows its world, and its experts hold domains.

Every figure is recomputed here from the weights on a fixed sample, never read from
MODEL_CARD.md. A reduced rebuild runs end to end so the recipe cannot rot.
"""
import json
import random
import time
from pathlib import Path

import pytest
import torch

from grip_core.data import generate_answers, load_demo_world
from grip_core.demo import verify
from grip_core.demo.build import build
from grip_core.demo.train import ModelSpec, TrainSpec, build_model, build_tokenizer, train_model
from grip_core.demo.world import DOMAINS, WorldConfig, generate_world, trained_facts

MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "demo_model"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()          # 1 thread: 2 spinning threads collapse when the cores are shared
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def demo():
    verify.load_demo(MODEL_DIR)          # first load pays the one-off imports
    t = time.process_time()              # CPU time: wall time depends on who else shares the cores
    model, tok = verify.load_demo(MODEL_DIR)
    return model, tok, time.process_time() - t


@pytest.fixture(scope="module")
def worlds():
    return {sc: load_demo_world(sc) for sc in ("entities", "domain")}


def sample(xs, n, seed=0):
    return list(xs) if len(xs) <= n else random.Random(seed).sample(list(xs), n)


def test_files_size_and_loading(demo):
    model, tok, seconds = demo
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
                 "training_log.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 2**20
    assert seconds < 3, f"loading took {seconds:.1f} s of CPU"
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["model_type"] == "olmoe" and cfg["num_experts"] == 2 * len(DOMAINS)
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>" and tok.unk_token == "<unk>"
    assert len(tok) <= model.config.vocab_size


def test_grip_core_load_model_demo():
    grip_core = pytest.importorskip("grip_core")
    if not hasattr(grip_core, "load_model"):
        pytest.skip("grip_core.load_model not available")
    grip_core.load_model("demo")
    t = time.process_time()
    moe = grip_core.load_model("demo")
    assert time.process_time() - t < 3 and len(moe.layers) == 4


@pytest.mark.parametrize("scenario", ["entities", "domain"])
def test_accuracy_bar(demo, worlds, scenario):
    model, tok, _ = demo
    w = worlds[scenario]
    for split in ("forget", "retain"):
        acc = verify.accuracy(model, tok, sample(getattr(w, split), 200, seed=1))
        assert acc >= 0.95, f"{scenario}/{split}: {acc:.3f}"
    assert verify.accuracy(model, tok, sample(w.holdout, 60, seed=1)) <= 0.10


def test_batched_generation_matches_one_by_one(demo, worlds):
    model, tok, _ = demo
    xs = sample(worlds["entities"].retain, 12, seed=2) + sample(worlds["entities"].holdout, 4, seed=2)
    assert len({len(tok(x.question)["input_ids"]) for x in xs}) > 1          # really left-padded
    batched = generate_answers(model, tok, xs, max_new_tokens=12)
    single = [generate_answers(model, tok, [x], max_new_tokens=12)[0] for x in xs]
    assert batched == single


def probe_by_domain(world, n: int, seed: int = 3) -> dict:
    """{domain: n trained questions of the world (forget + retain), a fixed sample}: the NMI / ablation probe."""
    by_domain = {}
    for ex in sorted(world.forget + world.retain, key=lambda e: e.id):
        by_domain.setdefault(ex.domain, []).append(ex)
    return {d: sample(xs, n, seed=seed) for d, xs in by_domain.items()}


@pytest.fixture(scope="module")
def probe(worlds):
    return probe_by_domain(worlds["entities"], 30)


def test_specialisation_nmi(demo, probe):
    model, tok, _ = demo
    xs = [ex for v in probe.values() for ex in v]
    nmi = verify.nmi_per_layer(model, tok, xs, answers_only=True)
    assert len(nmi) == model.config.num_hidden_layers
    assert min(nmi) >= 0.5, nmi
    # a random routing of the same tokens carries no domain information
    model_rand = build_model(ModelSpec(vocab_size=model.config.vocab_size), model.config.vocab_size, seed=0)
    assert max(verify.nmi_per_layer(model_rand.eval(), tok, xs[:60])) < 0.3


def test_expert_ablation_hits_its_domain(demo, probe):
    model, tok, _ = demo
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts" in k}
    used = verify.experts_used(model, tok, [ex for v in probe.values() for ex in v])
    small = {d: v[:12] for d, v in probe.items()}
    table = verify.ablation_table(model, tok, small, used)
    base = table["none"]
    for d in DOMAINS:
        own_drop = base[d] - table[d][d]
        other_drop = max(base[o] - table[d][o] for o in DOMAINS if o != d)
        assert own_drop >= 0.4 and other_drop <= 0.2, (d, table[d])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "ablate_experts must restore the weights"


def test_training_is_deterministic():
    facts = trained_facts(generate_world(WorldConfig.quick(), 0))[:40]
    spec, ts = ModelSpec.quick(), TrainSpec(steps=4, batch_size=8, warmup=2, eval_every=10**6, threads=1)
    states = []
    for _ in range(2):
        tok = build_tokenizer(facts, 400)
        m = build_model(spec, len(tok), seed=0)
        train_model(m, tok, facts, spec, ts, progress=False)
        states.append((tok.backend_tokenizer.to_str(), m.state_dict()))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(v, states[1][1][k]) for k, v in states[0][1].items())


def test_quick_rebuild(tmp_path):
    t = time.process_time()
    s = build(tmp_path, quick=True, progress=False)
    assert time.process_time() - t < 60, "the reduced rebuild must stay test-sized (CPU seconds)"
    model_dir = tmp_path / "demo_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md", "training_log.json"):
        assert (model_dir / name).is_file()
    assert (tmp_path / "world" / "entities_forget.jsonl").is_file() and (tmp_path / "world" / "README.md").is_file()
    log = s["log"]
    assert log["loss"][-1] < log["loss"][0] / 4 and log["aux_weight"][0] > 0 and log["aux_weight"][-1] == 0
    model, tok = verify.load_demo(model_dir)
    w = load_demo_world("entities", tmp_path / "world")
    assert verify.accuracy(model, tok, w.retain[:60]) >= 0.5      # the small recipe learns, too
    assert verify.accuracy(model, tok, w.holdout) <= 0.2
    assert min(s["report"]["nmi_answer_tokens"]) > 0.3

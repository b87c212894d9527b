"""The second shipped demo (data/demo_fine_model/, `load_model("demo-fine")`): a Qwen2-MoE with 32
fine-grained experts (top-4) and a shared expert. It loads through grip_core, knows its world, its
routed experts hold domains, and the study's regimes really differ on it (the shared expert).

Every figure is recomputed from the weights on a fixed sample, never read from MODEL_CARD.md.
Load time is measured in benchmarks/bench_demo_load.py, not here.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch

from grip_core.data import load_demo_world
from grip_core.demo import verify
from grip_core.demo.build import rewrite_card
from grip_core.demo.train import ModelSpec, build_model, domain_experts
from grip_core.demo.world import DOMAINS
from test_demo_model import probe_by_domain, sample

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "data" / "demo_fine_model"

pytestmark = pytest.mark.skipif(not (MODEL_DIR / "model.safetensors").is_file(),
                                reason="data/demo_fine_model/ not built (python -m grip_core.demo.build --preset fine)")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def moe():
    from grip_core.moe import load_model

    return load_model("demo-fine")


@pytest.fixture(scope="module")
def worlds():
    return {sc: load_demo_world(sc) for sc in ("entities", "domain")}


@pytest.fixture(scope="module")
def probe(worlds):
    return probe_by_domain(worlds["entities"], 24)


def test_load_model_demo_fine(moe):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
                 "training_log.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 20 * 10**6          # bf16, <= 20 MB
    cfg = json.loads((MODEL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    assert cfg["num_experts"] >= 32 and cfg["num_experts_per_tok"] >= 4
    assert moe.name == "demo-fine" and moe.tokenizer is not None
    info = moe.describe()
    assert info["family"] == "Qwen2-MoE" and len(info["layers"]) == cfg["num_hidden_layers"]
    for layer in info["layers"]:
        assert layer["num_experts"] == cfg["num_experts"] and layer["top_k"] == cfg["num_experts_per_tok"]
        assert layer["shared_experts"], layer                       # the shared expert is found, per layer
    assert next(moe.model.parameters()).dtype == torch.float32   # CPU "auto": float32


@pytest.mark.parametrize("scenario", ["entities", "domain"])
def test_exact_match_on_a_sample(moe, worlds, scenario):
    w = worlds[scenario]
    for split in ("forget", "retain"):
        acc = verify.accuracy(moe.model, moe.tokenizer, sample(getattr(w, split), 100, seed=1))
        assert acc >= 0.95, f"{scenario}/{split}: {acc:.3f}"
    assert verify.accuracy(moe.model, moe.tokenizer, sample(w.holdout, 40, seed=1)) <= 0.10


def test_nmi_per_layer_above_floor(moe, probe):
    """32 experts, 6 per domain: a perfect domain -> expert-group map still has NMI well below 1
    (H(expert) > H(domain)), so the floor is lower than the first demo's; a random router is far under it."""
    xs = [ex for v in probe.values() for ex in v]
    nmi = verify.nmi_per_layer(moe.model, moe.tokenizer, xs, answers_only=True)
    assert len(nmi) == moe.model.config.num_hidden_layers
    assert min(nmi) >= 0.4, nmi
    spec = ModelSpec.fine()
    rand = build_model(ModelSpec(**{**spec.__dict__, "vocab_size": moe.model.config.vocab_size}),
                       moe.model.config.vocab_size, seed=0)
    assert max(verify.nmi_per_layer(rand.eval(), moe.tokenizer, xs[:60])) < 0.3


def test_expert_ablation_hurts_its_domain_most(moe, worlds):
    """Each domain's 6 most-used experts per layer (counted over 80 facts per domain, as the card does:
    on fewer, a domain's top 6 picks up other domains' experts), zeroed in every layer."""
    model, tok = moe.model, moe.tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items() if "experts" in k or "shared_expert" in k}
    by_domain = {}
    for ex in sorted(worlds["entities"].forget + worlds["entities"].retain, key=lambda e: e.id):
        by_domain.setdefault(ex.domain, []).append(ex)
    probe = {d: sample(xs, 80, seed=0) for d, xs in by_domain.items()}
    used = verify.experts_used(model, tok, [ex for v in probe.values() for ex in v], per_layer=6)
    small = {d: v[:10] for d, v in probe.items()}
    table = verify.ablation_table(model, tok, small, used)
    base = table["none"]
    for d in DOMAINS:
        own_drop = base[d] - table[d][d]
        other_drop = max(base[o] - table[d][o] for o in DOMAINS if o != d)
        assert own_drop >= 0.4 and own_drop > other_drop, (d, table[d])
    assert "shared expert" in table                               # the shared expert's own row
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "ablation must restore the weights"


def test_regimes_differ_on_the_shared_expert(moe):
    """`shortcut` (scope moe) trains the shared expert and its gate; `experts+routers` does not, so the
    study runs both (on the OLMoE demo they are one parameter set and the study aliases them)."""
    from grip_core.runs.presets import get_preset
    from grip_core.runs.study import regime_aliases
    from grip_core.scope import scope_parameter_names

    names = {r: set(scope_parameter_names(moe.model, moe, get_preset(r).scope)) for r in ("shortcut", "experts+routers")}
    extra = names["shortcut"] - names["experts+routers"]
    assert extra and all("shared_expert" in n for n in extra), sorted(extra)[:4]
    assert names["experts+routers"] < names["shortcut"]
    assert regime_aliases(moe, ("shortcut", "full", "experts+routers")) == {}


def test_recipe_assigns_experts_per_domain():
    spec = ModelSpec.fine()
    assigned = domain_experts(spec)
    assert [len(v) for v in assigned.values()] == [6] * len(DOMAINS)
    flat = [e for v in assigned.values() for e in v]
    assert len(set(flat)) == len(flat) and max(flat) < spec.num_experts
    assert spec.num_experts - len(flat) == spec.spare_experts == 2
    assert ModelSpec().num_experts == 10 and domain_experts(ModelSpec())["animals"] == [8, 9]   # the first demo's


def test_cards_render_from_their_logs(tmp_path):
    """Both cards are re-rendered from training_log.json exactly as shipped (the first demo's card unchanged)."""
    for folder in ("demo_model", "demo_fine_model"):
        shutil.copytree(ROOT / "data" / folder, tmp_path / folder, ignore=shutil.ignore_patterns("*.safetensors"))
        rewrite_card(tmp_path / folder)
        assert (tmp_path / folder / "MODEL_CARD.md").read_text() == (ROOT / "data" / folder / "MODEL_CARD.md").read_text()
    card = (tmp_path / "demo_fine_model" / "MODEL_CARD.md").read_text()
    assert "Qwen2MoeForCausalLM" in card and "shared expert" in card and "shared with other jobs" in card


def test_load_heatmap_shows_the_shared_expert(moe, probe):
    """The figure from a real trace: 32 routed columns summing to 100 % per layer, then a grey
    "shared" column that holds no routing share ("always on")."""
    from grip_core import viz

    trace = moe.trace([f"Question: {ex.question}\nAnswer: {ex.answer}" for ex in probe["animals"][:8]])
    fig = viz.load_heatmap(viz.routing_summary(trace), shared=1)
    routed, shared = fig.data
    assert list(routed.x) == [f"E{e}" for e in range(32)] and set(shared.x) == {"shared"}
    assert len(shared.y) == len(routed.y) == 4                   # one hover point per layer
    assert abs(float(sum(routed.z[0])) - 100.0) < 1e-6
    assert [a.text for a in fig.layout.annotations] == ["always on"]
    assert abs(fig.layout.shapes[0].x0 - 31.55) < 1e-9            # the grey band sits on the 33rd category
    assert len(viz.load_heatmap(viz.routing_summary(trace)).data) == 1        # shared=0: no extra column


def test_every_dashboard_page_on_demo_fine(tmp_path, monkeypatch):
    """Pick the fine demo on the Model page (AppTest), load it, then every page renders without an error."""
    from streamlit.testing.v1 import AppTest
    from test_app_pages import MAIN, TIMEOUT, assert_clean, decode, figure

    monkeypatch.setenv("GRIP_STUDIO_RUNS_DIR", str(tmp_path))
    monkeypatch.delenv("GRIP_STUDIO_MODEL", raising=False)
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    radio = at.radio(key="model_kind")
    fine = next(o for o in radio.options if o.startswith("Fine-grained demo MoE"))
    radio.set_value(fine).run()
    at.button(key="load_model").click().run()
    assert_clean(at)
    assert at.session_state["model_source"] == "demo-fine"
    text = " ".join(m.value for m in at.markdown)
    assert "Qwen2-MoE" in text and "Qwen2MoeForCausalLM" in " ".join(s.value for s in at.subheader)
    glance = figure(at, "Expert load per layer — retain split")
    assert decode(glance["data"][0]["z"]).shape == (4, 32) and set(glance["data"][1]["x"]) == {"shared"}
    for page in ("routing", "embeddings", "unlearn", "compare", "diagnose", "findings"):
        at.switch_page(f"views/{page}.py").run()
        assert_clean(at)
        assert at.session_state["model_source"] == "demo-fine", page
    at.switch_page("views/routing.py").run()
    dom = figure(at, "Which experts each domain uses")
    assert decode(dom["data"][0]["z"]).shape[1] == 32 and set(dom["data"][1]["x"]) == {"shared"}

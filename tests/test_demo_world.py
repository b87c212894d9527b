"""The demo world generator: deterministic, big enough, and every scenario's splits disjoint.

The shipped data/world/*.jsonl must be exactly what the generator writes, so the
files cannot drift from the recipe.
"""
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from grip_core.data import load_demo_world, read_qa_file
from grip_core.demo.world import (DOMAINS, FORGET_DOMAIN, SCENARIOS, WorldConfig, fact_dicts, generate_world,
                                  scenario_rows, trained_facts, write_world)

WORLD_DIR = Path(__file__).resolve().parents[1] / "data" / "world"


@pytest.fixture(scope="module")
def world():
    return generate_world(WorldConfig(), seed=0)


def test_generator_is_deterministic():
    a, b = generate_world(WorldConfig(), 0), generate_world(WorldConfig(), 0)
    assert fact_dicts(a) == fact_dicts(b)
    c = generate_world(WorldConfig(), 1)
    assert [f.entity for f in a] != [f.entity for f in c]
    assert fact_dicts(generate_world(WorldConfig.quick(), 3)) == fact_dicts(generate_world(WorldConfig.quick(), 3))


def test_world_size_and_shape(world):
    assert len(DOMAINS) >= 5 and {f.domain for f in world} == set(DOMAINS)
    assert len(trained_facts(world)) >= 2000
    per_entity = Counter(f.entity for f in world)
    assert set(per_entity.values()) == {5}
    # an entity belongs to one domain; names are unique world-wide
    dom_of = defaultdict(set)
    for f in world:
        dom_of[f.entity.lower()].add(f.domain)
    assert all(len(d) == 1 for d in dom_of.values())
    assert len({f.id for f in world}) == len(world)
    assert len({f.question for f in world}) == len(world), "every question must have exactly one answer"
    for f in world:
        assert f.question != f.paraphrased_question and f.question.endswith(("?", "."))
        assert f.answer and f.answer in f.text and f.entity in f.question and f.entity in f.paraphrased_question


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_splits_are_disjoint(world, scenario):
    rows = scenario_rows(world, scenario)
    ids = {k.split("_", 1)[1]: {r["id"] for r in v} for k, v in rows.items()}
    qs = {k.split("_", 1)[1]: {r["question"] for r in v} for k, v in rows.items()}
    for a, b in [("forget", "retain"), ("forget", "holdout"), ("retain", "holdout")]:
        assert not ids[a] & ids[b] and not qs[a] & qs[b], (a, b)
    assert ids["forget"] | ids["retain"] == {f.id for f in trained_facts(world)}
    assert ids["paraphrase"] == ids["forget"] | ids["retain"]
    assert not qs["paraphrase"] & (qs["forget"] | qs["retain"])
    ents = {k: {r["entity"] for r in rows[f"{scenario}_{k}"]} for k in ("forget", "retain", "holdout")}
    assert not ents["forget"] & ents["retain"] and not ents["holdout"] & (ents["forget"] | ents["retain"])
    forget_domains = Counter(r["domain"] for r in rows[f"{scenario}_forget"])
    if scenario == "entities":                    # ~10 % of each domain's entities, every domain
        assert set(forget_domains) == set(DOMAINS)
        n_ent = len(ents["forget"]) / (len(ents["forget"]) + len(ents["retain"]))
        assert 0.08 <= n_ent <= 0.12
    else:                                         # one whole domain
        assert set(forget_domains) == {FORGET_DOMAIN}
        assert FORGET_DOMAIN not in {r["domain"] for r in rows[f"{scenario}_retain"]}
        assert {r["domain"] for r in rows[f"{scenario}_holdout"]} == {FORGET_DOMAIN}


def test_shipped_files_match_the_generator(tmp_path, world):
    counts = write_world(world, tmp_path)
    for name in counts:
        assert (WORLD_DIR / name).read_bytes() == (tmp_path / name).read_bytes(), f"data/world/{name} is stale"
    assert (WORLD_DIR / "README.md").is_file()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_load_demo_world(scenario):
    w = load_demo_world(scenario)
    assert w.forget and w.retain and w.holdout and w.paraphrase_forget and w.paraphrase_retain
    assert len(w.paraphrase_forget) == len(w.forget) and len(w.paraphrase_retain) == len(w.retain)
    fq = {ex.id: ex for ex in w.forget}
    for p in w.paraphrase_forget:
        assert p.answer == fq[p.id].answer and p.question == fq[p.id].paraphrase != fq[p.id].question
    ex = w.forget[0]
    assert ex.domain in DOMAINS and ex.entity and ex.text and ex.meta["split"] == "forget"
    assert ex.meta["scenario"] == scenario
    with pytest.raises(ValueError, match="unknown demo scenario"):
        load_demo_world("nope")


def test_world_rows_are_plain_jsonl():
    first = json.loads((WORLD_DIR / "entities_forget.jsonl").read_text().splitlines()[0])
    assert {"id", "question", "answer", "domain", "entity", "text", "scenario", "split"} <= set(first)
    assert len(read_qa_file(WORLD_DIR / "domain_holdout.jsonl")) > 0

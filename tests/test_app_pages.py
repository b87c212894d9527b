"""Every dashboard page through Streamlit's AppTest: renders on the demo, widgets drive it, figure data are right.

Figures are checked from the element's proto (`json.loads(el.proto.spec)`); plotly encodes numpy
arrays as typed buffers ({"dtype", "bdata", "shape"}), decoded by `decode`. Falls back to the tiny
random OLMoE (and a generated quick world) only while the demo model / world files are not built.
"""
from __future__ import annotations

import base64
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")
TIMEOUT = 180

pytestmark = pytest.mark.timeout(600)


def decode(value):
    """A plotly JSON array (typed buffer or list) as a numpy array."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        if value.get("shape"):
            arr = arr.reshape([int(s) for s in str(value["shape"]).split(",")])
        return arr
    return np.asarray(value)


def figures(at) -> list[dict]:
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def figure(at, title_part: str) -> dict:
    found = [f for f in figures(at) if title_part in (f["layout"].get("title", {}).get("text") or "")]
    assert found, f"no figure titled *{title_part}*: {[f['layout'].get('title', {}).get('text') for f in figures(at)]}"
    return found[0]


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """Environment of the app under test: demo model (or the tiny one), demo world (or a quick one), temp runs."""
    from grip_core.data import WORLD_DIR
    from grip_core.moe.load import DEMO_MODEL_DIR

    env = {"GRIP_STUDIO_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    if not (DEMO_MODEL_DIR / "config.json").is_file() and not os.environ.get("GRIP_STUDIO_MODEL"):
        env["GRIP_STUDIO_MODEL"] = "tiny:olmoe"
    if not (Path(WORLD_DIR) / "domain_forget.jsonl").is_file() and not os.environ.get("GRIP_STUDIO_WORLD_DIR"):
        from grip_core.demo.world import WorldConfig, generate_world, write_world

        world = tmp_path_factory.mktemp("world")
        write_world(generate_world(WorldConfig.quick()), world)
        env["GRIP_STUDIO_WORLD_DIR"] = str(world)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    return at


def _source(studio) -> str:
    return os.environ.get("GRIP_STUDIO_MODEL") or studio.get("GRIP_STUDIO_MODEL", "demo")


def _model(studio):
    from app.lib.state import _load

    return _load(_source(studio))


# ----------------------------------------------------------------------------- 1 model


def test_model_page_describes_the_model_and_data(studio):
    at = app()
    assert_clean(at)
    text = " ".join(m.value for m in at.markdown)
    moe = _model(studio)
    info = moe.describe()
    assert info["family"] in text and f"{info['num_parameters'] / 1e6:.2f} M" in text
    sizes = [df.value for df in at.dataframe if "examples" in df.value.columns]
    assert sizes and set(sizes[0]["split"]) >= {"forget", "retain", "holdout"}
    # the landing page already shows the routing explorer's default heatmap (same numbers)
    glance = decode(figure(at, "Expert load per layer — retain split")["data"][0]["z"])
    routing = decode(figure(app("routing"), "Expert load per layer — retain")["data"][0]["z"])
    assert glance.shape == (len(moe.layers), moe.layers[0].num_experts)
    np.testing.assert_array_equal(glance, routing)

    at.radio(key="data_kind").set_value(at.radio(key="data_kind").options[1]).run()
    assert_clean(at)
    assert at.session_state["data_key"] == "demo:entities"

    at.radio(key="model_kind").set_value("Local checkpoint directory").run()
    at.text_input(key="model_path").input("/nonexistent/checkpoint").run()
    at.button(key="load_model").click().run()
    assert not at.exception
    assert any("not a readable checkpoint directory" in e.value for e in at.error), [e.value for e in at.error]
    assert not any("does not exist" in e.value for e in at.error)   # never reveals which server paths exist
    assert at.session_state["model_source"] != "/nonexistent/checkpoint"


def test_model_page_rejects_a_dense_model(studio, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    dense.save_pretrained(tmp_path / "dense")
    at = app()
    at.radio(key="model_kind").set_value("Local checkpoint directory").run()
    at.text_input(key="model_path").input(str(tmp_path / "dense")).run()
    at.button(key="load_model").click().run()
    assert not at.exception
    assert any("not a Mixture-of-Experts model" in e.value for e in at.error), [e.value for e in at.error]


# ----------------------------------------------------------------------------- 2 routing


def test_routing_page_heatmap_matches_the_trace(studio):
    from app.lib.state import sample, splits_for, trace_examples
    from grip_core.metrics.routing import slot_counts

    at = app("routing")
    assert_clean(at)
    n = at.select_slider(key="rx_n").value
    fig = figure(at, "Expert load per layer — retain")
    z = decode(fig["data"][0]["z"])
    moe = _model(studio)
    L, E = len(moe.layers), moe.layers[0].num_experts
    assert z.shape == (L, E)
    np.testing.assert_allclose(z.sum(1), 100.0, atol=1e-6)
    # independent recomputation from the same n retain examples
    examples = sample(splits_for("demo:domain")["retain"], n)
    trace = trace_examples(_source(studio), examples)
    for l in range(L):
        c = slot_counts(trace.selected[l], E).numpy()
        np.testing.assert_allclose(z[l], 100 * c / c.sum(), atol=1e-6)

    entropy = figure(at, "Expert-load entropy")
    assert [d["name"] for d in entropy["data"]] == ["forget", "retain", "holdout"]
    assert all(0 <= v <= 1 for d in entropy["data"] for v in decode(d["y"]).astype(float))

    at.selectbox(key="rx_split").set_value("forget").run()
    assert_clean(at)
    figure(at, "Expert load per layer — forget")

    prompt = "Question: Who wrote it?\nAnswer: Nobody"
    at.text_area(key="rx_prompt").input(prompt).run()
    assert_clean(at)
    table = figure(at, "Experts chosen per token")["data"][0]
    n_tokens = len(moe.tokenizer(prompt)["input_ids"])
    assert np.asarray(table["text"]).shape == (n_tokens, L)
    assert all(len(cell.split()) == moe.layers[0].top_k for row in table["text"] for cell in row)


def test_routing_page_domain_heatmap(studio):
    at = app("routing")
    fig = figure(at, "Which experts each domain uses")
    assert "answer tokens only" in fig["layout"]["title"]["text"]    # the NMI the docs quote, by default
    z = decode(fig["data"][0]["z"])
    assert len(fig["data"][0]["y"]) >= 2
    np.testing.assert_allclose(z.sum(1), 100.0, atol=1e-6)          # each domain's row sums to 100 %
    captions = " ".join(c.value for c in at.caption)
    assert "NMI per layer, answer tokens only:" in captions and "NMI per layer, all tokens:" in captions
    assert "**·** is a space" in captions and "**⏎** a newline" in captions
    at.radio(key="rx_dom_tokens").set_value("all tokens").run()
    assert_clean(at)
    assert "all tokens" in figure(at, "Which experts each domain uses")["layout"]["title"]["text"]


# ----------------------------------------------------------------------------- 3 embeddings


def test_embeddings_page_points_and_colours(studio):
    at = app("embeddings")
    assert_clean(at)
    fig = figure(at, "Router inputs at layer")
    n = sum(len(decode(d["x"])) for d in fig["data"])
    assert n > 0 and all(d["name"].startswith("expert ") for d in fig["data"])
    idx = np.sort(np.concatenate([decode(d["customdata"]).astype(int) for d in fig["data"]]))
    np.testing.assert_array_equal(idx, np.arange(n))                   # lasso rows map back to tokens

    at.radio(key="em_color").set_value("split").run()
    assert_clean(at)
    fig = figure(at, "Router inputs at layer")
    assert {d["name"] for d in fig["data"]} <= {"forget", "retain", "holdout"}
    assert sum(len(decode(d["x"])) for d in fig["data"]) == n

    at.radio(key="em_method").set_value("UMAP").run()
    assert_clean(at)
    assert any("UMAP is not computed" in i.value for i in at.info)


# ----------------------------------------------------------------------------- 4 + 5 unlearn -> compare


def test_compare_page_without_runs(studio):
    at = app("compare")
    assert_clean(at)
    assert any("No runs" in i.value for i in at.info)


@pytest.fixture(scope="module")
def finished_runs(studio):
    from app.lib.state import base_model

    source = _source(studio)
    before = {k: v.clone() for k, v in base_model(source).model.state_dict().items()}
    at = app("unlearn")
    assert_clean(at)
    for key, value in (("ul_steps", 2), ("ul_eval_every", 2), ("ul_eval_n", 8), ("ul_final_n", 8), ("ul_bs", 8),
                       ("ul_fit_n", 64)):
        at.number_input(key=key).set_value(value)
    at.run()
    at.button(key="ul_start").click().run()
    assert_clean(at)
    pair = at.session_state["job_pair"]
    deadline = time.time() + 300
    while not pair.done and time.time() < deadline:
        time.sleep(1.0)
    assert pair.done, pair.progress_text()
    at.run()
    assert_clean(at)
    # the shared, cached base model was never modified and carries no leftover hooks
    base = base_model(source)
    after = base.model.state_dict()
    assert all(torch_equal(before[k], after[k]) for k in before)
    assert all(not l.router._forward_hooks for l in base.layers)
    return at, pair


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_unlearn_cancel_stops_both_jobs(studio):
    at = app("unlearn")
    for key, value in (("ul_steps", 500), ("ul_eval_n", 8), ("ul_final_n", 8), ("ul_bs", 4), ("ul_fit_n", 64)):
        at.number_input(key=key).set_value(value)
    at.run()
    at.button(key="ul_start").click().run()
    pair = at.session_state["job_pair"]
    assert pair.running
    at.button(key="ul_cancel").click().run()
    assert not at.exception
    deadline = time.time() + 240
    while not pair.done and time.time() < deadline:
        time.sleep(0.5)
    assert [s.status for s in pair.slots.values()] == ["cancelled", "cancelled"], pair.progress_text()
    assert all(len(s.rows) < 500 for s in pair.slots.values())
    at.run()
    assert_clean(at)
    assert len(at.warning) >= 2                                        # "cancelled: ..." per job


def test_unlearn_page_runs_vanilla_and_grip(finished_runs):
    at, pair = finished_runs
    assert [s.status for s in pair.slots.values()] == ["completed", "completed"], \
        [(s.status, s.reason) for s in pair.slots.values()]
    assert pair.slots["vanilla"].config.grip.mode == "off" and pair.slots["GRIP"].config.grip.mode == "update"
    assert {k: v for k, v in pair.slots["vanilla"].config.to_dict().items() if k != "grip"} == \
        {k: v for k, v in pair.slots["GRIP"].config.to_dict().items() if k != "grip"}
    for s in pair.slots.values():
        assert (Path(s.run_dir) / "summary.json").is_file() and len(s.rows) == 2
    curves = figure(at, "Unlearning, live")
    assert {d["name"] for d in curves["data"]} >= {"vanilla: loss", "GRIP: loss"}
    summary = at.dataframe[-1].value
    assert list(summary["run"]) == ["vanilla", "GRIP"]
    assert at.session_state["compare_runs"] == [str(s.run_dir) for s in pair.slots.values()]


def test_compare_page_shows_both_runs(finished_runs):
    from html import escape

    from grip_core import viz
    from grip_core.runs.store import load_run

    at, pair = finished_runs
    at.switch_page("views/compare.py").run()
    assert_clean(at)
    summaries = {name: json.loads((Path(s.run_dir) / "summary.json").read_text()) for name, s in pair.slots.items()}
    heat = [f for f in figures(at) if f["data"] and f["data"][0]["type"] == "heatmap"
            and "Δ pp" in json.dumps(f["data"][0].get("colorbar", {}), ensure_ascii=False)]
    assert len(heat) == 4                                               # retain and forget tokens, both runs
    for which, row in (("retain", heat[:2]), ("forget", heat[2:])):
        for fig, name in zip(row, ("vanilla", "GRIP")):
            title = fig["layout"]["title"]
            assert name in title["text"] and title["subtitle"]["text"].startswith(f"{which} tokens")
            tr = fig["data"][0]
            assert tr["zmid"] == 0 and tr["zmin"] == -tr["zmax"]
            want = np.array([l["freq_change"] for l in summaries[name][f"routing_{which}"]["layers"]]) * 100
            np.testing.assert_allclose(decode(tr["z"]), want, atol=1e-9)
        assert row[0]["data"][0]["zmax"] == row[1]["data"][0]["zmax"]     # one colour scale per row

    stab = figure(at, "Retained routing stability per layer")
    for d, name in zip(stab["data"], ("vanilla", "GRIP")):
        want = [100 * l["stability"] for l in summaries[name]["routing_retain"]["layers"]]
        np.testing.assert_allclose(decode(d["y"]).astype(float), want)
    probes = [df.value for df in at.dataframe if "measure" in df.value.columns][0]
    assert {"base"} <= set(probes.columns) and any("vanilla" in c for c in probes.columns)
    em = probes[(probes.split == "forget") & (probes.measure == "exact match")]
    want = summaries["vanilla"]["probes"]["splits"]["forget"]["exact_match"]
    vcol = [c for c in probes.columns if "vanilla" in c][0]
    assert em[vcol].item() == pytest.approx(want)
    rest = [df.value for df in at.dataframe if "routers restored" in df.value.columns][0]
    assert list(rest["verdict"]) == [viz.run_verdict(summaries[n]).kind for n in ("vanilla", "GRIP")]

    # the headline is each run's verdict sentence (it names forget EM, retain EM, stability, restoration)
    sentence = " ".join(m.value for m in at.markdown)
    for name in ("vanilla", "GRIP"):
        v = viz.run_verdict(summaries[name])
        assert v.title in sentence and escape(v.sentence) in sentence
    assert "Trade-off (" not in sentence

    # run labels say what the run was (method, GRIP mode, regime, seed, steps), not when it ran
    runs = [load_run(s.run_dir) for s in pair.slots.values()]
    names = viz.run_names(runs)
    assert names[0].startswith("GradDiff · vanilla · ") and names[1].startswith("GradDiff · GRIP update")
    assert all(f"seed {r.config['seed']} · {r.config['steps']} steps" in n for n, r in zip(names, runs))
    labels = [at.selectbox(key=k).format_func(at.selectbox(key=k).value) for k in ("cmp_a", "cmp_b")]
    assert sorted(labels) == sorted(f"{n} · completed" for n in names)

    # ONE list of figures: the page shows exactly compare_figures, as does the HTML export
    page = [re.sub("</?b>", "", f["layout"]["title"]["text"]) for f in figures(at)]
    listed = [f.title for f in viz.compare_figures(runs)]
    html = viz.runs_html(runs)
    exported = [re.sub("</?b>", "", json.loads(f'"{t}"'))
                for t in re.findall(r'"text":"(\\u003cb\\u003e.*?)"', html)]      # only titles are bold
    assert page == listed == exported and len(listed) >= 7

    at.radio(key="cmp_mode").set_value("base vs one run").run()
    assert_clean(at)


def test_embeddings_before_and_after_share_axes(finished_runs):
    at, pair = finished_runs
    at.switch_page("views/embeddings.py").run()
    assert_clean(at)
    run_id = Path(pair.slots["vanilla"].run_dir).name
    at.selectbox(key="em_after").set_value(run_id).run()
    assert_clean(at)
    fig = figure(at, "Router inputs at layer")
    xaxes = sorted(k for k in fig["layout"] if k.startswith("xaxis"))
    assert xaxes == ["xaxis", "xaxis2"] and fig["layout"]["xaxis2"].get("matches") == "x"
    idx = np.sort(np.concatenate([decode(d["customdata"]).astype(int) for d in fig["data"]]))
    n = len(idx) // 2
    np.testing.assert_array_equal(idx, np.arange(2 * n))            # before rows 0..n-1, after rows n..2n-1
    # one legend entry per expert of EITHER panel (where forget tokens went after unlearning is the point)
    legend = [d["name"] for d in fig["data"] if d.get("showlegend", True)]
    assert sorted(legend) == sorted({d["name"] for d in fig["data"]}) and len(legend) == len(set(legend))
    assert any("legend lists the experts of both panels" in c.value for c in at.caption)


# ----------------------------------------------------------------------------- 6 findings, 7 diagnose


def test_findings_page(studio, tmp_path, monkeypatch):
    """The Findings page on a study folder that is still filling (real committed cells, a subset): coverage,
    the three figures, narrow one-line tables; a cell that lands shows up on the next refresh."""
    import shutil

    from grip_core.moe.load import REPO_ROOT

    src = REPO_ROOT / "docs" / "study"
    (tmp_path / "cells").mkdir()
    shutil.copy(src / "manifest.json", tmp_path)
    cells = sorted((src / "cells").glob("domain__shortcut__*--*.json"))
    for p in cells[:-1] + sorted((src / "cells").glob("lr__*.json")):
        shutil.copy(p, tmp_path / "cells")
    monkeypatch.setenv("GRIP_STUDIO_STUDY", str(tmp_path))
    at = app("findings")
    assert_clean(at)
    n = len(cells) - 1
    aliased = n                                           # experts+routers: shortcut's cells under a second name
    from grip_core.runs.study import read_study

    total = read_study(tmp_path)["grid"].size                      # the committed study's grid (its manifest)
    (bar,) = at.get("progress")
    assert f"{n + aliased} of {total} cells" in bar.proto.text
    for title in ("Restoring the original routers", "Retained stability vs forgetting", "Steps to forget"):
        figure(at, title)
    stab = figure(at, "Retained stability")
    assert any(s.get("y0") == 0.95 or s.get("y1") == 0.95 for s in stab["layout"].get("shapes", []))
    assert any("Coverage:" in m.value for m in at.markdown)
    tables = [t.value for t in at.dataframe]
    assert len(tables) == 2 and all(len(t.columns) <= 9 for t in tables)
    assert all(" " not in v for v in tables[0]["forget EM"])          # "0.048±0.033": one line, no wrapping
    shutil.copy(cells[-1], tmp_path / "cells")                         # a cell lands
    at.button(key="fd_refresh").click().run()
    assert f"{n + 1 + aliased + 1} of {total} cells" in at.get("progress")[0].proto.text
    empty = tmp_path / "empty"
    (empty / "cells").mkdir(parents=True)
    shutil.copy(src / "manifest.json", empty)
    at.text_input(key="fd_folder").set_value(str(empty)).run()
    assert_clean(at)
    assert any("No cells" in i.value for i in at.info)
    at.text_input(key="fd_folder").set_value(str(tmp_path / "nowhere")).run()
    assert any("not a study folder" in e.value for e in at.error)


def test_findings_page_opens_the_committed_robustness_and_demo_fine_studies(studio):
    """The committed robustness study shows its sentences and one attack heatmap per (scenario, regime); the
    demo-fine study shows its rows side by side with the demo's."""
    at = app("findings")
    at.text_input(key="fd_folder").set_value(str(_committed("robustness"))).run()
    assert_clean(at)
    heat = figure(at, "shortcut regime: recovered by each attack")
    assert "INT4" in heat["data"][0]["x"] and any("GRIP update" in y for y in heat["data"][0]["y"])
    assert any("recovered share of the forgotten answers" in m.value for m in at.markdown)
    at.text_input(key="fd_folder").set_value(str(_committed("demo-fine"))).run()
    assert_clean(at)
    assert any("demo-fine / demo" in m.value for m in at.markdown)


def _committed(name: str) -> Path:
    from grip_core.moe.load import REPO_ROOT
    from grip_core.runs.study import COMMITTED_STUDIES

    return REPO_ROOT / "docs" / COMMITTED_STUDIES[name]


def test_diagnose_page_reports_a_verdict(studio, tmp_path):
    """Base and a copy with scrambled routers saved as checkpoints -> the report and its figures."""
    import copy

    import torch

    moe = _model(studio)
    base_dir, new_dir = tmp_path / "base", tmp_path / "unlearned"
    moe.model.save_pretrained(base_dir)
    moe.tokenizer.save_pretrained(base_dir)
    other = copy.deepcopy(moe.model)
    with torch.no_grad():
        for layer in moe.layers:
            p = other.get_parameter(f"{layer.router_path}.{layer.family.weight_attr}")
            p.copy_(p.flip(0))                                        # experts swapped: routing moves
    other.save_pretrained(new_dir)
    moe.tokenizer.save_pretrained(new_dir)
    at = app("diagnose")
    at.text_input(key="dg_base").input(str(base_dir))
    at.text_input(key="dg_unlearned").input(str(new_dir))
    at.number_input(key="dg_n").set_value(8)
    at.button[0].click().run()
    assert_clean(at)
    report = at.session_state["dg_report"]
    from grip_core.runs.verdict import KINDS

    assert report["verdict"] in KINDS and not at.session_state["dg_warning"]   # the base knows the demo forget set
    assert report["verdict"].upper() in " ".join(m.value for m in at.markdown)
    shift = figure(at, "Retained routing shift")["data"][0]
    want = np.array([l["freq_change"] for l in report["routing_retain"]["layers"]]) * 100
    np.testing.assert_allclose(decode(shift["z"]), want, atol=1e-9)


def test_diagnose_page_errors_are_messages(studio):
    at = app("diagnose")
    assert_clean(at)
    at.text_input(key="dg_unlearned").input("/nonexistent/unlearned")
    at.number_input(key="dg_n").set_value(8)
    at.button[0].click().run()  # the form's submit button
    assert not at.exception
    assert any("not a readable checkpoint directory" in e.value for e in at.error), [e.value for e in at.error]
    assert not any("does not exist" in e.value for e in at.error)   # never reveals which server paths exist

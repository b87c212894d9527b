"""grip_core.viz: every figure builder on small synthetic results; the numbers in the figure are the inputs."""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from grip_core import viz
from grip_core.moe.trace import RoutingTrace
from report_data import make_report


def decode(value):
    """A plotly JSON value as numpy: typed buffers ({"dtype", "bdata", "shape"}) or plain lists."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        if shape:
            arr = arr.reshape([int(s) for s in str(shape).split(",")])
        return arr
    return np.asarray(value, dtype=object if value and isinstance(value[0], str) else float)


def spec(fig) -> dict:
    return json.loads(fig.to_json())


def _trace(n=12, L=2, E=4, k=2, seed=0) -> RoutingTrace:
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(n, E, generator=g) for _ in range(L)]
    selected = [lg.topk(k, dim=1).indices for lg in logits]
    return RoutingTrace([0, 1][:L], selected, logits, torch.arange(n), torch.zeros(n, dtype=torch.long),
                        torch.arange(n), [E] * L, None, None, {"num_sequences": 1})


def test_viz_never_imports_streamlit():
    code = "import sys, grip_core.viz; assert 'streamlit' not in sys.modules, 'viz imported streamlit'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_heatmap_matches_counts():
    tr = _trace()
    summary = viz.routing_summary(tr, "retain")
    z = decode(spec(viz.load_heatmap(summary))["data"][0]["z"])
    assert z.shape == (2, 4)
    for l in range(2):
        counts = np.bincount(tr.selected[l].flatten().numpy(), minlength=4)
        np.testing.assert_allclose(z[l], 100 * counts / counts.sum())
    np.testing.assert_allclose(z.sum(1), 100.0)
    assert len(summary["entropy"]) == 2 and all(0 <= h <= 1 for h in summary["entropy"])


def test_token_routing_table_cells_are_the_selected_experts():
    tr = _trace(n=5)
    routing = viz.token_routing(tr, [f"t{i}" for i in range(5)])
    s = spec(viz.token_routing_table(routing))["data"][0]
    text = s["text"]
    assert len(text) == 5 and len(text[0]) == 2
    assert text[3][1] == " ".join(str(e) for e in tr.selected[1][3].tolist())
    z = decode(s["z"])
    best = tr.logits[0].gather(1, tr.selected[0]).argmax(1)
    np.testing.assert_array_equal(z[:, 0], tr.selected[0].gather(1, best[:, None]).squeeze(1).numpy())


def test_routing_shift_heatmap_is_diverging_and_centred():
    change = [[0.1, -0.1, 0.0], [0.02, 0.0, -0.02]]
    s = spec(viz.routing_shift_heatmap(change, [0, 3], zmax=15.0))["data"][0]
    assert s["zmid"] == 0 and s["zmin"] == -15.0 and s["zmax"] == 15.0
    np.testing.assert_allclose(decode(s["z"]), np.array(change) * 100)
    assert s["y"] == ["layer 0", "layer 3"]
    assert viz.shared_shift_range(change, [[0.3]]) == pytest.approx(30.0)


def test_ragged_layers_pad_with_nan():
    s = spec(viz.nullspace_heatmap([[3, 4], [1, 2, 5]], [0, 1], dim=8))["data"][0]
    z = decode(s["z"])
    assert z.shape == (2, 3) and np.isnan(z[0, 2]) and z[1, 2] == 5 and s["zmax"] == 8


def test_stability_bars_and_colours():
    attr = {"stability_actual": [0.8, 0.9], "stability_router_only": [1.0, 1.0], "stability_drift_only": [0.8, 0.9]}
    s = spec(viz.stability_bars([0, 1], attr, name="GRIP graddiff"))
    assert [d["name"].split(" ")[0] for d in s["data"]] == ["actual", "router", "drift"]
    np.testing.assert_allclose(decode(s["data"][0]["y"]).astype(float), [80.0, 90.0])
    assert s["data"][0]["marker"]["color"] == viz.GRIP
    runs = {"vanilla GA": {"layers": [0, 1], "stability": [0.5, 0.6]},
            "GRIP GA": {"layers": [0, 1], "stability": [0.95, 0.99]}}
    s = spec(viz.stability_compare_bars(runs))
    assert [d["marker"]["color"] for d in s["data"]] == [viz.VANILLA, viz.GRIP]
    s = spec(viz.selection_shift_bars({"vanilla GA": {"layers": [0], "shift": [0.38]}}))
    np.testing.assert_allclose(decode(s["data"][0]["y"]).astype(float), [38.0])


def test_training_curves_use_eval_rows_only_where_present():
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "retain_stability": 0.9, "forget_em": 0.5}]
    s = spec(viz.training_curves({"vanilla": log}))
    names = [d["name"] for d in s["data"]]
    assert names == ["vanilla: loss", "vanilla: retained stability", "vanilla: forget EM"]
    np.testing.assert_allclose(decode(s["data"][1]["y"]).astype(float), [90.0])


def test_embedding_projection_shares_axes():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 6)).astype(np.float32)
    proj, coords = viz.fit_projection(X, "pca")
    assert coords.shape == (40, 2)
    np.testing.assert_allclose(proj.transform(X), coords, atol=1e-5)
    fig = viz.embedding_pair(coords, proj.transform(X + 1), [0] * 20 + [1] * 20, ["forget"] * 40)
    s = spec(fig)
    idx = np.concatenate([decode(d["customdata"]).astype(int) for d in s["data"]])
    assert sorted(idx.tolist()) == list(range(80))
    assert viz.selected_rows([{"customdata": 3}, {"customdata": [41]}, {"x": 1}]) == [3, 41]


SUMMARY = make_report(forget_em=0.05, retain_em=0.95, base_forget_em=0.97, base_retain_em=0.96,
                      retain_stability=0.996, forget_shift=0.382, restoration_recovered=0.92, restored_forget_em=0.9,
                      membership_auc=0.55)


def test_report_from_a_summary():
    cfg = {"method": "npo", "grip": {"mode": "off"}}
    assert viz.run_display_name(cfg) == "NPO · vanilla"
    s = viz.run_layer_series(SUMMARY, cfg)
    assert s["layers"] == [0] and s["shift"] == [0.382] and s["stability"] == [0.996]
    assert viz.run_layer_series(SUMMARY.to_dict(), cfg) == s          # the JSON form reads the same
    sentence = viz.compare_sentence({"vanilla NPO": (SUMMARY, cfg)})
    # the one verdict (grip_core.runs.verdict), with the tables' rounding: 0.92 recovered is "92.0 %"
    assert sentence.startswith("vanilla NPO — Rerouted") and viz.run_verdict(SUMMARY).kind == "rerouted"
    assert "38.2 %" in sentence and "99.6 %" in sentence and "92.0 %" in sentence and "5.0 %" in sentence
    probes = viz.probes_table({"vanilla NPO": SUMMARY})
    assert probes.loc[(probes.split == "forget") & (probes.measure == "exact match"), "vanilla NPO"].item() == 0.05
    rest = viz.restoration_table({"vanilla NPO": SUMMARY})
    assert rest["verdict"].item() == "rerouted" and rest["routers restored"].item() == 0.9
    empty = viz.run_layer_series({}, None)
    assert empty["stability"] is None and viz.compare_sentence({"x": (None, None)}).startswith("x has no")


def test_html_export_is_standalone():
    html = viz.to_html(viz.load_entropy_bars({"retain": {"layers": [0], "entropy": [0.9]}}))
    assert "<html>" in html[:200] and "plotly" in html.lower() and len(html) > 1_000_000


def test_runs_html_from_saved_runs(tmp_path):
    from grip_core.runs.store import RunWriter, load_run
    from grip_core.viz.export import write_runs_html

    dirs = []
    for mode in ("off", "update"):
        w = RunWriter(tmp_path, f"run-{mode}")
        w.write_config({"method": "npo", "grip": {"mode": mode}, "preset": "shortcut", "seed": 0, "steps": 1})
        w.log_step({"step": 1, "loss": 1.0, "retain_stability": 0.9})
        w.write_json("summary.json", SUMMARY.to_dict())
        w.set_status("completed")
        w.close()
        dirs.append(w.dir)
    figs = viz.compare_figures([load_run(d) for d in dirs])
    assert {"routing-shift-retain-0", "routing-shift-retain-1", "retained-stability", "forget-selection-shift",
            "training-curves"} <= {f.slug for f in figs}
    out = write_runs_html(dirs, tmp_path / "cmp.html")
    html = out.read_text()
    assert "NPO · vanilla · shortcut · seed 0 · 1 steps vs NPO · GRIP update · shortcut · seed 0 · 1 steps" in html
    assert html.count("plotly-graph-div") == len(figs)

"""The teaching notebooks (notebooks/*.ipynb) run top to bottom and compute their key numbers.

Each notebook is executed with nbclient in QUICK mode (GRIP_NOTEBOOK_QUICK=1: same code path, tiny
step counts and evaluation sizes) on a kernel of THIS interpreter, with this checkout first on its path,
so this checkout's grip_core and the venv's torch and plotly are the ones exercised. Each notebook's last cell prints `key numbers: {json}`; the tests parse
it and check that the numbers are computed (finite, in range, consistent), not merely that cells ran.
The committed copies must carry their outputs (they are read on GitHub) and stay under 2 MB.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ["01_routing_anatomy.ipynb", "02_the_router_shortcut.ipynb", "03_grip.ipynb"]
KERNEL = "grip-studio-notebook-test"
CELL_TIMEOUT = 300          # seconds per cell (quick mode needs ~10-20 s for the longest cell on a free machine)
MAX_BYTES = 2_000_000
PLOTLY = "application/vnd.plotly.v1+json"

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernelspec that launches this interpreter's ipykernel, found through JUPYTER_PATH, with quick mode on."""
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    # The notebooks import grip_core as an installed package (`pip install -e .`); the kernel gets this checkout
    # first on its path so that the checkout under test is what runs, whether (and from wherever) it is installed.
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    install(kernel_name=KERNEL, display_name="GRIP Studio tests", prefix=str(prefix),
            env={"GRIP_NOTEBOOK_QUICK": "1", "GRIP_NOTEBOOK_THREADS": "1", "PYTHONPATH": pythonpath})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        for var in ("GRIP_NOTEBOOK_PNG", "GRIP_NOTEBOOK_IMAGES"):   # never write images from the tests
            mp.delenv(var, raising=False)
        mp.setenv("GRIP_NOTEBOOK_QUICK", "1")
        mp.setenv("GRIP_NOTEBOOK_THREADS", "1")
        yield KERNEL


def outputs(nb, output_type=None):
    for cell in nb.cells:
        if cell.cell_type == "code":
            for out in cell.get("outputs", []):
                if output_type is None or out.get("output_type") == output_type:
                    yield out


def key_numbers(nb) -> dict:
    """The JSON the last cell prints after 'key numbers:'."""
    for out in outputs(nb, "stream"):
        for line in out.get("text", "").splitlines():
            if line.startswith("key numbers:"):
                return json.loads(line.split(":", 1)[1])
    raise AssertionError("no 'key numbers:' line in the notebook's outputs")


def is_fraction(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and 0.0 <= x <= 1.0


def run(name: str, kernel_name: str):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    for cell in nb.cells:                       # execute from a clean slate, not the committed outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    t = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel_name,
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed in quick mode:\n{str(exc)[-3000:]}")
    errors = [o for o in outputs(nb, "error")]
    assert not errors, f"{name}: error outputs {[(e['ename'], e['evalue']) for e in errors]}"
    return nb, time.perf_counter() - t


def test_routing_anatomy(kernel):
    nb, _ = run("01_routing_anatomy.ipynb", kernel)
    k = key_numbers(nb)
    assert k["quick"] is True
    L = k["num_moe_layers"]
    assert L >= 1 and k["num_experts"] > k["top_k"] >= 1
    assert k["hand_topk_matches"] is True, "top-k of Θx computed by hand must equal the traced selection"
    for key in ("nmi_answers", "nmi_all_tokens", "load_entropy"):
        assert len(k[key]) == L and all(is_fraction(v) for v in k[key]), (key, k[key])
    assert len(set(k["nmi_answers"])) > 1 or L == 1, "NMI should be computed per layer, not a constant"
    assert all(is_fraction(v) for v in k["ablation_own_em"].values())
    assert set(k["ablation_own_em"]) == set(k["experts_by_domain_layer0"])
    assert sum(1 for o in outputs(nb) if PLOTLY in o.get("data", {})) >= 3


def test_router_shortcut(kernel):
    nb, _ = run("02_the_router_shortcut.ipynb", kernel)
    k = key_numbers(nb)
    assert k["quick"] is True
    runs = {n: v for n, v in k.items() if isinstance(v, dict)}
    assert set(runs) == {"GradDiff · shortcut", "NPO · shortcut", "GradDiff · full", "NPO · full"}
    for name, r in runs.items():
        assert r["steps"] >= 1, name
        for key in ("forget_em", "retain_em", "retain_stability", "retain_stability_router_only",
                    "retain_stability_drift_only", "forget_shift"):
            assert is_fraction(r[key]), (name, key, r[key])
        assert r["restoration_recovered"] is None or is_fraction(r["restoration_recovered"]), name
        assert isinstance(r["shortcut"], bool)
    # the routers move faster in the shortcut regime (x30), so its forget-set shift is the larger one
    assert runs["GradDiff · shortcut"]["forget_shift"] > runs["GradDiff · full"]["forget_shift"]
    assert sum(1 for o in outputs(nb) if PLOTLY in o.get("data", {})) >= 4


def test_grip(kernel):
    nb, _ = run("03_grip.ipynb", kernel)
    k = key_numbers(nb)
    assert k["quick"] is True
    for key in ("mean_free_dims_absolute", "mean_free_dims_relative_999"):
        assert k[key] and all(0 <= v <= 257 for v in k[key]), (key, k[key])
    runs = k["runs"]
    assert any(n.startswith("vanilla ") for n in runs) and any(n.startswith("GRIP ") for n in runs)
    for name, r in runs.items():
        assert all(is_fraction(r[key]) for key in ("forget_em", "retain_em", "retain_stability",
                                                   "retain_stability_router_only")), (name, r)
    vanilla = next(r for n, r in runs.items() if n.startswith("vanilla "))
    grip = next(r for n, r in runs.items() if n.startswith("GRIP "))
    # GRIP holds the router on retained inputs: with the inputs held fixed it keeps at least as much as vanilla
    assert grip["retain_stability_router_only"] >= vanilla["retain_stability_router_only"]
    sweep = list(k["sweep"].values())
    assert len(sweep) >= 2
    free = [row["mean free dims (all rows)"] for row in sweep]
    assert free == sorted(free), f"a larger eps_null must leave at least as many free dimensions: {free}"
    assert all(is_fraction(row["retained stability"]) for row in sweep)
    assert sum(1 for o in outputs(nb) if PLOTLY in o.get("data", {})) >= 5


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_outputs_and_is_small(name):
    path = NOTEBOOK_DIR / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size / 1e6:.2f} MB (limit 2 MB)"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{name}: commit it executed, with outputs"
    assert not list(outputs(nb, "error")), f"{name}: the committed copy has error outputs"
    key_numbers(nb)     # ran to the end

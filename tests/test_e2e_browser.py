"""End to end through a real Streamlit server and Chromium: demo → routing heatmap → the DEFAULT vanilla + GRIP
job pair (RunConfig's defaults, weights saved) → Compare with its verdicts → both runs attacked by the real
`python -m grip_core attack` → Compare and Diagnose (on a run from the picker) with the robustness matrix.

Readiness as in Streamlit's own e2e suite: poll /_stcore/health, then wait for
[data-testid='stApp'][data-test-script-state='notRunning']. Screenshots of every page go to
$GRIP_SCREENSHOTS, else test-artifacts/ (git-ignored; the test prints the folder); the compare page is
also copied once to docs/images/compare.png. GRIP_E2E_JOB_BUDGET_S (default 600) is how long the
default job pair may take from the click to "Open these runs in Compare"; GRIP_E2E_TIMEOUT_SCALE (default 1)
multiplies every other wait (a machine busy with other work).
Skipped when chromium or playwright is missing.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from grip_core import viz
from grip_core.runs import load_run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("GRIP_SCREENSHOTS") or ROOT / "test-artifacts")
JOB_BUDGET_S = float(os.environ.get("GRIP_E2E_JOB_BUDGET_S") or 600)
SLOW = float(os.environ.get("GRIP_E2E_TIMEOUT_SCALE") or 1)     # > 1 on a loaded machine: every wait is longer
README_IMAGE = ROOT / "docs" / "images" / "compare.png"
# a cheap but telling subset (rerouting, expert forcing, 4-bit weights, router relearning), 64 forget examples
ATTACKS = ("restoration", "expert_forcing", "quant_int4", "relearn_router")
ATTACK_EXAMPLES = 64
ROBUSTNESS_SECTION = "Did it really forget? Attacks and where the update landed"     # the section on both pages
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
              pytest.mark.timeout(int(JOB_BUDGET_S + 420 * SLOW))]

SAVE_WEIGHTS = "Save the unlearned weights with the run (for Diagnose or later use)"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_health(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError("streamlit did not become healthy")


def _wait_idle(page, timeout_ms: int = 120_000) -> None:
    """The script ran to the end (twice in a row, so a rerun that starts right after is caught too)."""
    timeout_ms = int(timeout_ms * SLOW)
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_timeout(400)
    page.wait_for_selector(IDLE, timeout=timeout_ms)


def _shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.mouse.move(2, 2)                      # no hover label or plotly modebar in the picture
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory) -> dict:
    """The demo model and world; the tiny random OLMoE and a generated quick world while they are not built."""
    from grip_core.data import WORLD_DIR
    from grip_core.moe.load import DEMO_MODEL_DIR

    env = {}
    if not (DEMO_MODEL_DIR / "config.json").is_file() and not os.environ.get("GRIP_STUDIO_MODEL"):
        env["GRIP_STUDIO_MODEL"] = "tiny:olmoe"
    if not (Path(WORLD_DIR) / "domain_forget.jsonl").is_file() and not os.environ.get("GRIP_STUDIO_WORLD_DIR"):
        from grip_core.demo.world import WorldConfig, generate_world, write_world

        world = tmp_path_factory.mktemp("world")
        write_world(generate_world(WorldConfig.quick()), world)
        env["GRIP_STUDIO_WORLD_DIR"] = str(world)
    return env


@contextlib.contextmanager
def streamlit_server(env: dict, log_dir: Path, timeout: float = 60.0):
    """A real `streamlit run app/main.py` on a free local port with `env`: yields (port, process); stops it after."""
    port = _free_port()
    log = open(log_dir / "streamlit.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        _wait_health(port, proc, timeout=timeout)
        yield port, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, e2e_env):
    env = {**os.environ, **e2e_env, "GRIP_STUDIO_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    t0 = time.time()
    with streamlit_server(env, tmp_path_factory.mktemp("log"), timeout=60.0 * SLOW) as (port, proc):
        yield {"url": f"http://127.0.0.1:{port}", "t0": t0, "proc": proc, "runs": Path(env["GRIP_STUDIO_RUNS_DIR"]),
               "env": env}


def test_main_path(server):
    from playwright.sync_api import expect, sync_playwright

    timings = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1800})
            page.set_default_timeout(60_000 * SLOW)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            # 1 — cold start on the default page (Model): the demo's architecture and, at once, its expert-load heatmap
            page.goto(server["url"])
            heat = page.locator(".stPlotlyChart").first
            expect(heat.locator(".heatmaplayer, .hm").first).to_be_attached(timeout=120_000 * SLOW)
            expect(heat).to_be_visible()
            timings["first_heatmap_s"] = time.time() - server["t0"]
            expect(page.get_by_text("Expert load per layer").first).to_be_visible()
            _wait_idle(page)
            expect(page.get_by_text("MoE layers").first).to_be_visible()
            expect(page.locator("[data-testid='stDataFrame']:visible").first).to_be_visible()
            assert page.locator("[data-testid='stException']").count() == 0
            _shot(page, "1-model")

            # 2 — the routing explorer: load heatmap, experts per domain, a prompt token by token
            page.get_by_role("link", name="Routing explorer").click()
            _wait_idle(page)
            expect(page.get_by_text("Experts per domain").first).to_be_visible()
            assert page.locator(".stPlotlyChart .heatmaplayer, .stPlotlyChart .hm").count() >= 2
            assert page.locator("[data-testid='stException']").count() == 0
            _shot(page, "2-routing")
            timings["routing_done_s"] = time.time() - server["t0"]

            # 3 — embeddings (PCA at once)
            page.get_by_role("link", name="Embeddings").click()
            _wait_idle(page)
            expect(page.get_by_text("Router inputs at layer").first).to_be_visible(timeout=60_000 * SLOW)
            # lasso the whole plot area: every token is listed under it
            area = page.locator(".stPlotlyChart .nsewdrag").first.bounding_box()
            x0, y0, w, h = area["x"] + 3, area["y"] + 3, area["width"] - 6, area["height"] - 6
            page.mouse.move(x0, y0)
            page.mouse.down()
            for x, y in ((x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h), (x0, y0 + 1)):
                page.mouse.move(x, y, steps=8)
            page.mouse.up()
            _wait_idle(page)
            expect(page.get_by_text("Most frequent:")).to_be_visible(timeout=30_000 * SLOW)
            assert page.get_by_text("Selected tokens (0)").count() == 0
            _shot(page, "3-embeddings")
            timings["embeddings_done_s"] = time.time() - server["t0"]

            # 4 — unlearn: the default vanilla + GRIP pair (RunConfig's defaults), weights saved for Diagnose
            page.get_by_role("link", name="Unlearn").click()
            _wait_idle(page)
            page.get_by_text("Batch and evaluation").click()
            page.get_by_text(SAVE_WEIGHTS).click()
            expect(page.get_by_role("checkbox", name=SAVE_WEIGHTS)).to_be_checked(timeout=30_000 * SLOW)
            _wait_idle(page)
            t_job = time.time()
            page.get_by_role("button", name="Run vanilla + GRIP").click()
            open_compare = page.get_by_role("button", name="Open these runs in Compare")
            expect(open_compare).to_be_visible(timeout=JOB_BUDGET_S * 1000)
            timings["default_pair_s"] = time.time() - t_job
            _wait_idle(page)
            expect(page.get_by_text("Final probes").first).to_be_visible()
            _shot(page, "4-unlearn-done")
            assert page.get_by_text("failed:").count() == 0

            # 5 — compare: the verdict of each run (computed here from the saved runs by the library), heatmaps
            run_dirs = _latest_runs(server["runs"], 2)
            kinds = {d.name: viz.run_verdict(load_run(d).summary).kind for d in run_dirs}
            open_compare.click()
            _wait_idle(page)
            expect(page.get_by_text("Routing shift per layer and expert")).to_be_visible(timeout=60_000 * SLOW)
            for kind in set(kinds.values()):
                expect(page.get_by_text(re.compile(rf"\b{re.escape(kind)}\b", re.I)).first).to_be_visible()
            for name in ("vanilla", "GRIP"):
                expect(page.locator(".stPlotlyChart").filter(has_text=name).first).to_be_visible()
            expect(page.get_by_text("Knowledge probes")).to_be_visible()
            assert page.locator("[data-testid='stDataFrame']").count() >= 2
            _shot(page, "5-compare")
            if not README_IMAGE.exists():
                _readme_copy(page)
            assert page.locator("[data-testid='stException']").count() == 0

            # 5b — both saved runs attacked by the real CLI, as a user would (step 6 runs in the browser meanwhile);
            # then Compare again: the attack matrix of the pair, under "Did it really forget?"
            t_attack = time.time()
            attacks = _start_attacks(run_dirs, server["env"])

            # 6 — back on Unlearn the settings are still there ("Save weights" included)
            page.get_by_role("link", name="Unlearn").click()
            _wait_idle(page)
            page.get_by_text("Batch and evaluation").click()
            expect(page.get_by_role("checkbox", name=SAVE_WEIGHTS)).to_be_checked()

            rows = _finish_attacks(attacks)                    # 5b, continued
            timings["attacks_s"] = time.time() - t_attack
            page.get_by_role("link", name="Compare").click()
            _wait_idle(page)
            matrix = page.locator(".stPlotlyChart").filter(has_text="Did it really forget?")
            _section_shot(page, "5b-compare-robustness", matrix)
            _check_matrix(matrix, rows)
            assert page.locator("[data-testid='stException']").count() == 0

            # 7 — diagnose the GRIP run, picked from the saved runs with weights
            grip_run = next(d for d in run_dirs if load_run(d).config["grip"]["mode"] != "off")
            page.get_by_role("link", name="Diagnose").click()
            _wait_idle(page)
            page.get_by_role("combobox", name="Saved run to diagnose").click()
            page.get_by_role("option", name=re.compile(re.escape(grip_run.name))).click()
            _wait_idle(page)
            expect(page.get_by_role("textbox", name="Unlearned checkpoint directory")).to_have_value(str(grip_run / "model"))
            t_dg = time.time()
            page.get_by_role("button", name="Diagnose", exact=True).click()
            _wait_idle(page, timeout_ms=300_000)
            expect(page.get_by_text("Diagnosis complete").first).to_be_visible(timeout=300_000 * SLOW)
            timings["diagnose_s"] = time.time() - t_dg
            assert page.get_by_text("Could not diagnose").count() == 0
            _shot(page, "6-diagnose")
            assert page.locator("[data-testid='stException']").count() == 0
            # ... and below the diagnosis, the picked run's attack matrix (its robustness.json)
            matrix = page.locator(".stPlotlyChart").filter(has_text="Did it really forget?")
            _section_shot(page, "6b-diagnose-robustness", matrix)
            _check_matrix(matrix, {grip_run: rows[grip_run]})

            # 8 — findings: the committed study opens with its coverage and figures
            page.get_by_role("link", name="Findings").click()
            _wait_idle(page)
            expect(page.get_by_text(re.compile(r"\d+ of \d+ cells")).first).to_be_visible(timeout=60_000 * SLOW)
            expect(page.locator(".stPlotlyChart").first).to_be_visible(timeout=60_000 * SLOW)
            _shot(page, "7-findings")
            assert page.locator("[data-testid='stException']").count() == 0
            assert not errors, errors
            print(f"\nE2E timings: {timings}\nscreenshots: {ARTIFACTS}")
        except BaseException:
            try:
                _shot(page, "failure")                # what the page showed when the test gave up
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            raise
        finally:
            timings["total_s"] = time.time() - server["t0"]
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "timings.txt").write_text("\n".join(f"{k} {v:.1f}" for k, v in timings.items()) + "\n")
            browser.close()


def _latest_runs(root: Path, n: int) -> list[Path]:
    """The `n` newest run folders under `root` (the pair just run)."""
    return sorted((d for d in root.iterdir() if (d / "config.json").is_file()), key=lambda d: d.name)[-n:]


def _start_attacks(run_dirs: list[Path], env: dict) -> dict[Path, subprocess.Popen]:
    """`python -m grip_core attack` on each run, all at once, one torch thread each (on a busy 2-core machine,
    torch's default threads made one attack about ten times slower)."""
    procs = {}
    for d in run_dirs:
        argv = [sys.executable, "-m", "grip_core", "attack", "--base", load_run(d).config["model"], "--run", str(d),
                "--attacks", ",".join(ATTACKS), "--eval-examples", str(ATTACK_EXAMPLES)]
        procs[d] = subprocess.Popen(argv, cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    return procs


def _finish_attacks(procs: dict[Path, subprocess.Popen]) -> dict[Path, list[dict]]:
    """Each run's robustness rows once its attack exited 0 (the rows in the run's robustness.json and report)."""
    from grip_core.attacks import load_robustness

    rows = {}
    for d, proc in procs.items():
        out, _ = proc.communicate(timeout=300 * SLOW)
        assert proc.returncode == 0, out
        rows[d] = load_robustness(d)
        assert [r["attack"] for r in rows[d]] == list(ATTACKS)
        assert load_run(d).report.robustness == rows[d]
    return rows


def _check_matrix(matrix, rows: dict[Path, list[dict]]) -> None:
    """The heatmap has a row per run (named as Compare names it), a column per attack, and shows each cell's
    recovered share as the CLI wrote it."""
    from grip_core.fmt import pct
    from grip_core.viz.robustness import ATTACK_NAMES

    playwright.expect(matrix).to_have_count(1)
    playwright.expect(matrix).to_be_visible()
    flat = lambda t: re.sub(r"\s|·", "", t)                  # wrapped labels: one tspan a line, no separator
    ticks = [flat(t) for t in matrix.locator(".xtick text").all_text_contents()]
    assert ticks == [flat(ATTACK_NAMES[a]) for a in ATTACKS], ticks
    names = viz.run_names([load_run(d) for d in rows])
    assert sorted(flat(t) for t in matrix.locator(".ytick text").all_text_contents()) == sorted(map(flat, names))
    cells = matrix.locator(".heatmap-label").all_text_contents()
    assert sorted(cells) == sorted(pct(r["recovered"], digits=0, missing="—") for rs in rows.values() for r in rs), cells


def _section_shot(page, name: str, figure) -> Path:
    """The robustness section scrolled to the top of the window (the app scrolls inside its main pane, so a
    full-page screenshot shows only the first screen), once its figure is drawn."""
    figure.locator(".heatmaplayer, .hm").first.wait_for(state="attached", timeout=60_000 * SLOW)
    page.get_by_role("heading", name=ROBUSTNESS_SECTION).first.evaluate("e => e.scrollIntoView({block: 'start'})")
    return _shot(page, name)


def _readme_copy(page) -> None:
    """A small PNG of the compare page's top (headline + heatmaps) for the README (< 300 KB)."""
    README_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 1280})
    page.wait_for_timeout(800)
    page.screenshot(path=str(README_IMAGE), full_page=False)
    assert README_IMAGE.stat().st_size < 300_000

"""End to end on the second demo (`demo-fine`, Qwen2-MoE with a shared expert): a real Streamlit server
started on it and Chromium open the Model page and the Routing explorer; the heatmaps render, with
the shared expert as its own grey "always on" column. Helpers are tests/test_e2e_browser.py's.
Skipped when chromium, playwright or the demo-fine model is missing.
"""
from __future__ import annotations

import os

import pytest

from test_e2e_browser import CHROMIUM, LAUNCH_ARGS, ROOT, _shot, _wait_idle, streamlit_server

playwright = pytest.importorskip("playwright.sync_api")
FINE_DIR = ROOT / "data" / "demo_fine_model"
pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
              pytest.mark.skipif(not (FINE_DIR / "model.safetensors").is_file(), reason="demo-fine not built"),
              pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def fine_server(tmp_path_factory):
    env = {**os.environ, "GRIP_STUDIO_MODEL": "demo-fine", "GRIP_STUDIO_RUNS_DIR": str(tmp_path_factory.mktemp("runs"))}
    with streamlit_server(env, tmp_path_factory.mktemp("log")) as (port, _):
        yield f"http://127.0.0.1:{port}"


def test_routing_explorer_on_demo_fine(fine_server):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1800})
            page.set_default_timeout(60_000)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(fine_server)
            _wait_idle(page)
            expect(page.get_by_text("Qwen2MoeForCausalLM").first).to_be_visible(timeout=120_000)
            expect(page.get_by_text("fine-grained demo MoE").first).to_be_visible()
            expect(page.locator(".stPlotlyChart .heatmaplayer, .stPlotlyChart .hm").first).to_be_attached()
            assert page.locator("[data-testid='stException']").count() == 0
            _shot(page, "fine-1-model")

            page.get_by_role("link", name="Routing explorer").click()
            _wait_idle(page)
            expect(page.get_by_text("Experts per domain").first).to_be_visible()
            assert page.locator(".stPlotlyChart .heatmaplayer, .stPlotlyChart .hm").count() >= 2
            # the shared expert's column is labelled "always on" (load heatmap and domain x expert heatmap)
            expect(page.locator(".stPlotlyChart").filter(has_text="always on").first).to_be_visible()
            assert page.locator(".stPlotlyChart").filter(has_text="always on").count() >= 2
            assert page.get_by_text("E31").count() >= 1                      # all 32 routed experts on the axis
            assert page.locator("[data-testid='stException']").count() == 0
            _shot(page, "fine-2-routing")
            assert not errors, errors
        finally:
            browser.close()

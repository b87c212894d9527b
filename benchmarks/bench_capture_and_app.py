"""Routing capture throughput on the demo, and the dashboard's time to its first heatmap through a real server.

Capture: `MoEModel.trace(batches)` over pre-encoded retain batches (64 examples, max_length 64), with and
without `keep_inputs`, against a plain no-grad forward of the same batches (no hooks) — interleaved
repeats, median; tokens/s counts real (non-pad) tokens.

App: `streamlit run app/main.py --server.address 127.0.0.1 --server.port <free> --server.headless true`
is started, Debian chromium is launched at the same moment (playwright sync API, executable_path =
shutil.which("chromium"), args --no-sandbox --disable-gpu --disable-background-networking
--disable-component-update --disable-sync --no-first-run), the default page is opened as soon as
/_stcore/health answers, and the clock (started just before the server process) is read when:
    health_s            the server answers /_stcore/health
    default_page_s      the default page finished its script run (stApp idle)
    first_heatmap_s     the first plotly heatmap is visible (.js-plotly-plot / [data-testid='stPlotlyChart']
                        with a heatmap layer). The default page (Model) shows the expert-load heatmap; were it
                        missing, the figure is taken on the Routing explorer page, one click away, and
                        `first_heatmap_page` says which.
The server gets GRIP_STUDIO_MODEL / GRIP_STUDIO_WORLD_DIR when the benchmark model is not the built demo,
and a private GRIP_STUDIO_RUNS_DIR. `--skip-app` skips this part.

    python benchmarks/bench_capture_and_app.py [--quick] [--skip-app]
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "capture_and_app"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
PLOT = ".js-plotly-plot, [data-testid='stPlotlyChart']"
HEATMAP = ".js-plotly-plot .heatmaplayer, [data-testid='stPlotlyChart'] .heatmaplayer, .js-plotly-plot .hm"


# ----------------------------------------------------------------------------- capture

def bench_capture(moe, examples, n_batches: int, repeats: int) -> dict:
    import torch

    from grip_core.data import encode_qa

    batches = [encode_qa(moe.tokenizer, [examples[(i * 64 + j) % len(examples)] for j in range(64)], max_length=64)
               for i in range(n_batches)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    model = moe.model

    def plain():
        with torch.no_grad():
            for b in batches:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])

    arms = {"forward_no_hooks": plain, "trace": lambda: moe.trace(batches),
            "trace_keep_inputs": lambda: moe.trace(batches, keep_inputs=True)}
    for f in arms.values():                                                  # warm-up
        f()
    times = {k: [] for k in arms}
    for rep in range(repeats):
        order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
        for k in order:
            t0 = time.perf_counter()
            arms[k]()
            times[k].append(time.perf_counter() - t0)
    out = {"tokens": tokens, "batches": n_batches, "repeats": repeats}
    for k, ts in times.items():
        out[f"{k}_s"] = C.median(ts)
        out[f"{k}_tokens_per_s"] = tokens / C.median(ts)
    out["trace_vs_forward"] = out["trace_s"] / out["forward_no_hooks_s"]
    out["keep_inputs_vs_trace"] = out["trace_keep_inputs_s"] / out["trace_s"]
    return out


# ----------------------------------------------------------------------------- app

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
            return r.read().strip() == b"ok"
    except OSError:
        return False


def _wait_idle(page, timeout_ms: int) -> None:
    page.wait_for_selector(IDLE, timeout=timeout_ms)
    page.wait_for_timeout(300)
    page.wait_for_selector(IDLE, timeout=timeout_ms)


def bench_app(model_spec: str, world_root: str | None, timeout_s: float = 180.0) -> dict:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return {"skipped": "chromium is not installed"}
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"skipped": "playwright is not installed"}
    env = {**os.environ, "GRIP_STUDIO_RUNS_DIR": tempfile.mkdtemp(prefix="grip_bench_runs_")}
    if model_spec != "demo":
        env["GRIP_STUDIO_MODEL"] = "tiny:olmoe" if model_spec == "tiny" else model_spec
    if world_root and world_root != "data/world":
        env["GRIP_STUDIO_WORLD_DIR"] = world_root
    port = _free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="grip_bench_streamlit_", suffix=".log", delete=False)
    out: dict = {"port": port, "server_log": log.name, "model": env.get("GRIP_STUDIO_MODEL", "demo")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.address", "127.0.0.1",
                             "--server.port", str(port), "--server.headless", "true",
                             "--browser.gatherUsageStats", "false"], cwd=C.ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline = t0 + timeout_s
    ms_left = lambda: max(1000, int(1000 * (deadline - time.perf_counter())))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)   # while the server starts
            out["browser_ready_s"] = time.perf_counter() - t0
            try:
                while not _healthy(port):
                    if proc.poll() is not None:
                        raise RuntimeError(f"streamlit exited with {proc.returncode} (log: {log.name})")
                    if time.perf_counter() > deadline:
                        raise TimeoutError("streamlit did not become healthy")
                    time.sleep(0.1)
                out["health_s"] = time.perf_counter() - t0
                page = browser.new_page(viewport={"width": 1440, "height": 1200})
                page.goto(f"http://127.0.0.1:{port}/")
                _wait_idle(page, ms_left())
                out["default_page_s"] = time.perf_counter() - t0
                out["default_page_exceptions"] = page.locator("[data-testid='stException']").count()
                if page.locator(PLOT).count():
                    page.locator(HEATMAP).first.wait_for(state="visible", timeout=ms_left())
                    out["first_heatmap_page"] = "default (Model)"
                else:
                    out["first_heatmap_page"] = "Routing explorer (NO plotly chart on the default Model page; one click)"
                    page.get_by_role("link", name="Routing explorer").click()
                    page.locator(PLOT).first.wait_for(state="visible", timeout=ms_left())
                    out["first_plot_s"] = time.perf_counter() - t0
                    page.locator(HEATMAP).first.wait_for(state="visible", timeout=ms_left())
                out["first_heatmap_s"] = time.perf_counter() - t0
                out["first_heatmap_after_click_s"] = out["first_heatmap_s"] - out["default_page_s"] \
                    if "first_plot_s" in out else 0.0
            finally:
                browser.close()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it does not crash run_all
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return out


def run(quick: bool = False, skip_app: bool = False, model: str = "auto", world: str | None = None,
        threads: int = 1, batches: int | None = None, repeats: int | None = None, out_dir=None,
        app_timeout_s: float = 180.0) -> dict:
    C.setup_threads(threads)
    moe, spec = C.load_bench_model(model)
    splits, world_dir = C.load_world(spec, world)
    layer0 = moe.layers[0]
    cap = bench_capture(moe, list(splits.retain), batches or (1 if quick else 8), repeats or (3 if quick else 5))
    app = {"skipped": "--skip-app"} if skip_app else bench_app(spec, world_dir, app_timeout_s)
    summary = {"capture_tokens_per_s": cap["trace_tokens_per_s"],
               "capture_keep_inputs_tokens_per_s": cap["trace_keep_inputs_tokens_per_s"],
               "forward_tokens_per_s": cap["forward_no_hooks_tokens_per_s"],
               "capture_overhead_vs_forward": cap["trace_vs_forward"]}
    if "first_heatmap_s" in app:
        summary["app_first_heatmap_s"] = app["first_heatmap_s"]
        summary["app_default_page_s"] = app["default_page_s"]
    payload = {"quick": quick, "machine": C.machine_info(),
               "config": {"model": spec, "world": world_dir, "num_layers": len(moe.layers),
                          "hidden_size": layer0.hidden_size, "num_experts": layer0.num_experts, "top_k": layer0.top_k,
                          "batch_examples": 64, "max_length": 64, "skip_app": skip_app},
               "results": {"capture": cap, "app": app}, "summary": summary}
    path = C.write_result(NAME, payload, out_dir)
    print(f"capture — {spec}: {cap['tokens']} tokens x {cap['repeats']} repeats; load avg "
          f"{payload['machine'].get('loadavg_1_5_15')}")
    print(f"  forward (no hooks)   {cap['forward_no_hooks_tokens_per_s']:10.0f} tokens/s")
    print(f"  trace                {cap['trace_tokens_per_s']:10.0f} tokens/s  ({cap['trace_vs_forward']:.2f}x the forward's time)")
    print(f"  trace + keep_inputs  {cap['trace_keep_inputs_tokens_per_s']:10.0f} tokens/s  "
          f"({cap['keep_inputs_vs_trace']:.2f}x trace)")
    if "first_heatmap_s" in app:
        print(f"app — server healthy {app['health_s']:.1f} s, default page {app['default_page_s']:.1f} s, first heatmap "
              f"{app['first_heatmap_s']:.1f} s after process start [{app['first_heatmap_page']}]")
    else:
        print(f"app — {app.get('skipped') or app.get('error')}")
    print(f"wrote {path}")
    return payload


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--skip-app", action="store_true", help="capture throughput only (no server, no browser)")
    p.add_argument("--batches", type=int, default=None, help="64-example batches traced (quick 1, full 8)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--app-timeout", type=float, default=180.0)
    a = p.parse_args(argv)
    run(a.quick, a.skip_app, a.model, a.world, a.threads, a.batches, a.repeats, a.out_dir, a.app_timeout)


if __name__ == "__main__":
    main()

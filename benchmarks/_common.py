"""Shared helpers of the benchmarks: model/world resolution, machine facts, timing statistics, JSON output.

Every benchmark prints its figures and writes `benchmarks/results/<name>.json` (or `--out-dir`).
The JSON always has the same top level: {"name", "quick", "machine", "config", "results", "summary"};
`summary` is a flat {figure: value} dict that run_all.py collects into its table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
# the quick-build demo used while data/demo_model is being retrained (see README)
FALLBACK_MODEL, FALLBACK_WORLD = Path("/tmp/demoq/demo_model"), Path("/tmp/demoq/world")


# ----------------------------------------------------------------------------- CLI

def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a short configuration (run_all.py uses it)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared 2-core box, 2 threads spin-wait and "
                        "make step times 10x noisier)")
    p.add_argument("--model", default="auto",
                   help="'auto' (data/demo_model if built, else the quick-build demo in /tmp/demoq, else the tiny "
                        "random OLMoE), 'demo', 'tiny', or a checkpoint directory")
    p.add_argument("--world", default=None, help="directory with the demo world's JSONL files (default: matches --model)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help="where <name>.json is written")
    return p


def setup_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


# ----------------------------------------------------------------------------- model and data

def _char_tokenizer():
    """The character tokenizer the app uses for its tiny development model (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for i, ch in enumerate(chr(c) for c in range(32, 127)):
        vocab[ch] = 4 + i
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def resolve_model_spec(spec: str = "auto") -> str:
    """'auto' -> 'demo' when data/demo_model/model.safetensors exists, else the /tmp/demoq quick build, else 'tiny'."""
    from grip_core.moe.load import DEMO_MODEL_DIR

    if spec != "auto":
        return spec
    if (DEMO_MODEL_DIR / "model.safetensors").is_file():
        return "demo"
    if (FALLBACK_MODEL / "model.safetensors").is_file():
        return str(FALLBACK_MODEL)
    return "tiny"


def load_bench_model(spec: str = "auto"):
    """(MoEModel, the resolved spec)."""
    from grip_core import MoEModel, load_model

    spec = resolve_model_spec(spec)
    if spec == "tiny":
        from grip_core.moe.tiny import build_tiny_model

        return MoEModel(build_tiny_model("olmoe"), _char_tokenizer(), name="tiny:olmoe"), spec
    return load_model(spec), spec


_GENERATED_WORLD: dict[str, Path] = {}


def resolve_world(model_spec: str, world: str | None = None) -> Path | None:
    """The world directory to read (None = grip_core's default data/world/)."""
    from grip_core.data import WORLD_DIR

    if world:
        return Path(world)
    if model_spec == "demo" and (Path(WORLD_DIR) / "domain_forget.jsonl").is_file():
        return None
    if model_spec != "tiny" and (FALLBACK_WORLD / "domain_forget.jsonl").is_file() and \
            Path(model_spec).resolve() == FALLBACK_MODEL.resolve():
        return FALLBACK_WORLD
    if (Path(WORLD_DIR) / "domain_forget.jsonl").is_file():
        return None
    if (FALLBACK_WORLD / "domain_forget.jsonl").is_file():
        return FALLBACK_WORLD
    if "quick" not in _GENERATED_WORLD:                                      # fresh checkout: generate the quick world
        import tempfile

        from grip_core.demo.world import WorldConfig, generate_world, write_world

        out = Path(tempfile.mkdtemp(prefix="grip_bench_world_"))
        write_world(generate_world(WorldConfig.quick()), out)
        _GENERATED_WORLD["quick"] = out
    return _GENERATED_WORLD["quick"]


def load_world(model_spec: str, world: str | None = None, scenario: str = "domain"):
    from grip_core.data import load_demo_world

    root = resolve_world(model_spec, world)
    return load_demo_world(scenario, root=root), (str(root) if root else "data/world")


# ----------------------------------------------------------------------------- machine facts

def machine_info() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil

        info["mem_total_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["mem_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    except ImportError:
        pass
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ----------------------------------------------------------------------------- statistics

def median(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(statistics.median(xs)) if xs else None


def quantile(xs, q: float):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def linear_fit(x, y) -> dict:
    """Least squares y = a + b x: slope, intercept, R²."""
    n = len(x)
    if n < 2:
        return {"slope": None, "intercept": None, "r2": None}
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    slope = sxy / sxx if sxx else float("nan")
    intercept = my - slope * mx
    ss_res = sum((b - (intercept + slope * a)) ** 2 for a, b in zip(x, y))
    ss_tot = sum((b - my) ** 2 for b in y)
    return {"slope": slope, "intercept": intercept, "r2": 1 - ss_res / ss_tot if ss_tot else None}


class RSSPeak:
    """Peak resident memory (psutil RSS, sampled every `interval` s on a thread) above the value at __enter__.

    torch's CPU allocations are invisible to tracemalloc; RSS sees them (and everything else the process
    touches meanwhile, so treat it as an upper bound of what the measured code allocated).
    """

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.base = self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        import gc

        gc.collect()
        self.base = self.peak = self.proc.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_bytes(self) -> int:
        return int(self.peak - self.base)


# ----------------------------------------------------------------------------- output

def _clean(obj):
    """JSON-safe: NaN/inf -> None, tensors -> lists, paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(name: str, payload: dict, out_dir: str | Path | None = None) -> Path:
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    doc = _clean({"name": name, **payload})
    json.dumps(doc, allow_nan=False)                                         # well-formed or raise here
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return path


def fmt_table(rows: list[dict], columns: list[str]) -> str:
    def f(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)
    cells = [[f(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(x) for x in cells])

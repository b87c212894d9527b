"""A user's checkpoint at OLMoE-1B-7B's real width (hidden 2048, 64 experts, top-8; 1 or 2 layers, bf16, sharded
Hub layout, built here): trace throughput in float32 vs bfloat16, and diagnose's peak anonymous memory as a
multiple of the model's size, in-place (today) vs two models side by side (before), measured in one run.

How it is measured.
- Trace: `stream_routing` on the same retained questions, float32 and bfloat16 copies loaded side by side,
  run alternately (A/B, B/A) `repeats` times; tokens/s = real tokens / wall seconds, median.
- Diagnose: each variant is a fresh subprocess whose RssAnon (/proc/PID/status) is sampled every 20 ms
  (grip_core/moe/peak.py). "in place" is `python -m grip_core diagnose --dtype bfloat16` (the low-memory
  load + the unlearned tensors streamed into the base); "two models" loads the base and the unlearned
  checkpoint with transformers' loader and runs the two-model diagnose. The demo pair under the same command
  is the runtime's own cost; multiple = (peak - demo peak) / model bytes in bfloat16.

    python benchmarks/bench_real_width.py [--quick] [--threads 2] [--layers 2]
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "real_width"
_TWO_MODELS = """
import sys, grip_core
from grip_core.runs.data import UnlearningData
from grip_core.runs.diagnose import diagnose
base = grip_core.load_model(sys.argv[1], dtype="bfloat16")
new = grip_core.load_model(sys.argv[2], dtype="bfloat16")
data = UnlearningData.from_files(sys.argv[3], sys.argv[4])
n = int(sys.argv[5])
print("verdict:", diagnose(base, new, data, eval_examples=min(n, 64), final_eval_examples=n).verdict)
"""


def run(quick: bool = False, threads: int = 2, layers: int | None = None, examples: int | None = None,
        repeats: int | None = None, hidden: int | None = None, out_dir=None, **_ignored) -> dict:
    import torch

    import grip_core
    from grip_core.data import read_qa_file
    from grip_core.moe.memory import read_weights_info
    from grip_core.moe.peak import run_measured
    from grip_core.moe.stream import stream_routing
    from grip_core.moe.tiny import build_real_width_checkpoint, perturb_checkpoint

    C.setup_threads(threads)
    layers = layers or (1 if quick else 2)
    examples = examples or (32 if quick else 128)
    repeats = repeats or (1 if quick else 2)
    over = {} if not hidden else dict(hidden_size=hidden, intermediate_size=hidden // 2, num_attention_heads=4,
                                      num_key_value_heads=4)
    world = C.ROOT / "data" / "world"
    tmp = Path(tempfile.mkdtemp(prefix="grip-real-width-"))
    base = build_real_width_checkpoint(tmp / "base", num_layers=layers, **over)
    twin = perturb_checkpoint(base, tmp / "unlearned")
    demo_twin = perturb_checkpoint(C.ROOT / "data" / "demo_model", tmp / "demo_unlearned")
    forget, retain = tmp / "f.jsonl", tmp / "r.jsonl"
    forget.write_text("\n".join(world.joinpath("domain_forget.jsonl").read_text().splitlines()[:16]) + "\n")
    retain.write_text("\n".join(world.joinpath("domain_retain.jsonl").read_text().splitlines()[:examples]) + "\n")
    info = read_weights_info(base)
    model_bytes = {"float32": info.bytes_in(torch.float32), "bfloat16": info.bytes_in(torch.bfloat16)}

    # --- trace throughput, float32 vs bfloat16, alternating
    qs = read_qa_file(retain)
    models = {dt: grip_core.load_model(base, dtype=dt) for dt in ("float32", "bfloat16")}
    tps = {dt: [] for dt in models}
    for r in range(repeats):
        for dt in (("float32", "bfloat16") if r % 2 == 0 else ("bfloat16", "float32")):
            s = stream_routing(models[dt], qs, token_budget=2048, max_length=64)
            tps[dt].append(s.tokens_per_second)
            n_tokens = s.num_tokens
    del models

    # --- diagnose peak anonymous memory, in place vs two models, above the demo pair's
    env = {**os.environ, "PYTHONPATH": str(C.ROOT), "OMP_NUM_THREADS": str(threads)}
    n = "12"
    cli = lambda b, u: [sys.executable, "-m", "grip_core", "diagnose", "--base", str(b), "--unlearned", str(u),
                        "--forget-file", str(forget), "--retain-file", str(retain), "--dtype", "bfloat16",
                        "--eval-examples", n]
    two = lambda b, u: [sys.executable, "-c", _TWO_MODELS, str(b), str(u), str(forget), str(retain), n]
    runs = {}
    for label, argv in [("demo_in_place", cli("demo", demo_twin)), ("in_place", cli(base, twin)),
                        ("demo_two_models", two("demo", demo_twin)), ("two_models", two(base, twin))]:
        m = run_measured(argv, cwd=C.ROOT, env=env, timeout=3600)
        if m.returncode != 0:
            raise RuntimeError(f"{label}: exit {m.returncode}: {m.stderr[-500:]}")
        runs[label] = {"peak_anon_gb": m.peak_anon_bytes / 1e9, "seconds": m.seconds, "samples": m.samples}
    mult = lambda a, b: (runs[a]["peak_anon_gb"] - runs[b]["peak_anon_gb"]) * 1e9 / model_bytes["bfloat16"]
    summary = {
        "trace_tok_s[float32]": C.median(tps["float32"]), "trace_tok_s[bfloat16]": C.median(tps["bfloat16"]),
        "trace_bf16_over_fp32_ratio": C.median(tps["bfloat16"]) / C.median(tps["float32"]),
        "diagnose_mem_x_model[in_place]": mult("in_place", "demo_in_place"),
        "diagnose_mem_x_model[two_models]": mult("two_models", "demo_two_models"),
        "diagnose_s[in_place]": runs["in_place"]["seconds"], "diagnose_s[two_models]": runs["two_models"]["seconds"],
    }
    payload = {"quick": quick, "machine": C.machine_info(),
               "config": {"layers": layers, "hidden": hidden or 2048, "experts": 64, "top_k": 8,
                          "params": info.float_params, "model_bytes": model_bytes, "trace_examples": examples,
                          "trace_tokens": n_tokens, "repeats": repeats, "threads": threads,
                          "diagnose_eval_examples": int(n)},
               "results": {"trace_tokens_per_s": tps, "diagnose": runs}, "summary": summary}
    C.write_result(NAME, payload, out_dir)
    for k, v in summary.items():
        print(f"{k:40s} {v:10.3f}")
    return payload


if __name__ == "__main__":
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None)
    a = p.parse_args()
    run(quick=a.quick, threads=a.threads, layers=a.layers, out_dir=getattr(a, "out_dir", None))

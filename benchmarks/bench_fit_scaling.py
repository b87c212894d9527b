"""GRIP.fit time and memory vs the number of retained tokens (should be linear in tokens, flat in memory).

For each size N (1k -> 64k tokens; quick: 1k -> 8k) the retain batches are pre-encoded (64 examples a
batch, max_length 64, the job runner's batching), cycling through the world's retain + paraphrased-retain
questions until N real tokens are reached. Sizes are run `--repeats` times in an interleaved order
(all sizes, then all sizes again) and the median is kept. Per size:

    fit_ms          GRIP.fit wall time (one streaming pass: forward with hooks + Gram + reservoir + eigh)
    trace_ms        moe.trace(batches, keep_inputs=True) alone: the forward-pass share of the fit
    rss_peak_mb     peak RSS above the value before the fit (psutil, sampled every 5 ms): torch's CPU
                    tensors are invisible to tracemalloc, RSS sees them (an upper bound)
    state_mb        GRIPState.nbytes() (bases, spectra, margin rows, probe) — bounded by the caps
    accumulator_mb  the Gram accumulators, L·E·d'²·8 bytes — independent of N by construction

The slope (ms per 1k tokens) and R² come from a least-squares line through (tokens, fit_ms).

    python benchmarks/bench_fit_scaling.py [--quick] [--sizes 1000,2000,...] [--repeats 2]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "fit_scaling"
FULL_SIZES = [1000, 2000, 4000, 8000, 16000, 32000, 64000]
QUICK_SIZES = [1000, 2000, 4000, 8000]


def token_batches(moe, examples, n_tokens: int, batch_examples: int = 64, max_length: int = 64):
    """Pre-encoded batches holding >= n_tokens real tokens in total (examples cycled; the last batch trimmed)."""
    from grip_core.data import encode_qa

    out, total, i = [], 0, 0
    while total < n_tokens:
        chunk = [examples[(i + j) % len(examples)] for j in range(batch_examples)]
        i += batch_examples
        b = encode_qa(moe.tokenizer, chunk, max_length=max_length)
        per_row = b["attention_mask"].sum(1)
        need = n_tokens - total
        keep = int((per_row.cumsum(0) < need).sum()) + 1                    # rows until the total reaches N
        keep = min(keep, len(chunk))
        b = {k: v[:keep] for k, v in b.items()}
        out.append(b)
        total += int(per_row[:keep].sum())
    return out, total


def run(quick: bool = False, sizes: list[int] | None = None, repeats: int | None = None, model: str = "auto",
        world: str | None = None, threads: int = 1, out_dir=None) -> dict:
    C.setup_threads(threads)
    import torch

    from grip_core.grip import GRIP, GRIPConfig

    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    repeats = repeats or 2
    moe, spec = C.load_bench_model(model)
    splits, world_dir = C.load_world(spec, world)
    pool = list(splits.retain) + list(splits.paraphrase_retain)
    config = GRIPConfig()
    prepared = {n: token_batches(moe, pool, n) for n in sizes}
    GRIP.fit(moe, prepared[sizes[0]][0][:1], config)                         # warm-up (lazy inits, allocator)

    samples = {n: {"fit_ms": [], "trace_ms": [], "rss_peak_mb": []} for n in sizes}
    info = {}
    for rep in range(repeats):
        for n in (sizes if rep % 2 == 0 else sizes[::-1]):                  # interleaved, alternating direction
            batches, tokens = prepared[n]
            t0 = time.perf_counter()
            moe.trace(batches, keep_inputs=True)
            samples[n]["trace_ms"].append(1e3 * (time.perf_counter() - t0))
            with C.RSSPeak() as mem:
                t0 = time.perf_counter()
                grip = GRIP.fit(moe, batches, config)
                fit_ms = 1e3 * (time.perf_counter() - t0)
            samples[n]["fit_ms"].append(fit_ms)
            samples[n]["rss_peak_mb"].append(mem.delta_bytes / 2**20)
            st = grip.state
            info[n] = {"tokens": st.num_tokens, "batches": len(batches), "state_mb": st.nbytes() / 2**20,
                       "accumulator_mb": st.accumulator_bytes / 2**20,
                       "mean_free_dims": [round(float(x), 2) for x in st.mean_free_dims]}
            del grip, st
    rows = []
    for n in sizes:
        s = samples[n]
        fit, trace = C.median(s["fit_ms"]), C.median(s["trace_ms"])
        rows.append({"target_tokens": n, **info[n], "fit_ms": fit, "trace_ms": trace,
                     "grip_own_ms": fit - trace, "rss_peak_mb": C.median(s["rss_peak_mb"]),
                     "fit_ms_samples": s["fit_ms"]})
    xs = [r["tokens"] / 1000 for r in rows]
    lf = C.linear_fit(xs, [r["fit_ms"] for r in rows])
    lg = C.linear_fit(xs, [r["grip_own_ms"] for r in rows])
    lm = C.linear_fit(xs, [r["rss_peak_mb"] for r in rows])
    layer0 = moe.layers[0]
    summary = {"fit_ms_per_1k_tokens": lf["slope"], "fit_r2": lf["r2"], "fit_intercept_ms": lf["intercept"],
               "fit_grip_own_ms_per_1k_tokens": lg["slope"], "fit_grip_own_r2": lg["r2"],
               "fit_rss_mb_per_1k_tokens": lm["slope"],
               f"fit_ms[{rows[-1]['tokens']} tok]": rows[-1]["fit_ms"],
               "fit_state_mb_max": max(r["state_mb"] for r in rows),
               "fit_accumulator_mb": rows[-1]["accumulator_mb"]}
    payload = {"quick": quick, "machine": C.machine_info(),
               "config": {"model": spec, "world": world_dir, "sizes": sizes, "repeats": repeats,
                          "grip": config.to_dict(), "num_layers": len(moe.layers), "hidden_size": layer0.hidden_size,
                          "num_experts": layer0.num_experts, "top_k": layer0.top_k,
                          "torch_threads": torch.get_num_threads()},
               "results": {"sizes": rows, "fit_line": lf, "grip_own_line": lg, "rss_line": lm},
               "summary": summary}
    path = C.write_result(NAME, payload, out_dir)
    print(f"GRIP.fit scaling — {spec}, {len(moe.layers)} MoE layers, d {layer0.hidden_size}, E {layer0.num_experts}; "
          f"median of {repeats}; load avg {payload['machine'].get('loadavg_1_5_15')}")
    print(C.fmt_table(rows, ["tokens", "batches", "fit_ms", "trace_ms", "grip_own_ms", "rss_peak_mb", "state_mb",
                             "accumulator_mb"]))
    print(f"fit: {lf['slope']:.1f} ms per 1k tokens + {lf['intercept']:.0f} ms, R² {lf['r2']:.4f}; GRIP's own share "
          f"(fit − forward): {lg['slope']:.1f} ms per 1k tokens, R² {lg['r2']:.4f}; "
          f"peak RSS slope {lm['slope']:.2f} MB per 1k tokens")
    print(f"wrote {path}")
    return payload


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma-separated token counts")
    p.add_argument("--repeats", type=int, default=None, help="runs per size (median kept; default 2)")
    a = p.parse_args(argv)
    run(a.quick, [int(x) for x in a.sizes.split(",")] if a.sizes else None, a.repeats, a.model, a.world, a.threads,
        a.out_dir)


if __name__ == "__main__":
    main()

"""GRIP fit per layer at OLMoE-1B-7B width (d 2048, 64 experts, top-8, 16k retained tokens): the float64 eigh
(`fit_solver="float64"`, the path before) against the certified float32 one (`fit_solver="auto"`), side by side.

What a layer's fit costs. Streaming accumulates G_j = X_jᵀX_j (float64) per expert: k·N·d²·2 flops a layer
(16k tokens, top-8: 2048 tokens per expert on average). Then one eigh of a d x d Gram per expert: 64 a layer.
Both solvers share the Gram (the accumulation is unchanged); they differ in the eigh.

How it is measured. `--experts` experts (quick 2, full 8) each get `tokens_per_expert` = k·N/E synthetic router
inputs (bench_real_shapes.synthetic_inputs: rank-256 signal with a decaying spectrum + a noise floor under
eps_null, post-RMSNorm scale). For each expert: the Gram is accumulated in float64 (timed: the shared part),
then `eig_basis` runs once per solver, in alternating order (A/B, B/A), through the code the fit runs. Per layer
= E x (median Gram time + median eigh time); the experts of a layer are i.i.d., so this is the real layer's
figure without holding 64 Grams (2.1 GB). The max principal angle between the two solvers' U_j and their
ranks are reported per expert. The noise floor sits under eps_null but far below float32's resolution of
σ²_max, so float32 alone would get the rank wrong: "auto" needs its float64 complement check here
(`solvers` in the JSON says which path each expert took).

    python benchmarks/bench_fit_real_width.py [--quick] [--threads 2] [--experts 8]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "fit_real_width"
OLMOE = dict(label="OLMoE-1B-7B", d=2048, E=64, k=8, tokens=16384)


def max_principal_angle(A, B) -> float:
    """Largest principal angle (rad) between span(A) and span(B), both (d, r), resolved by its sine."""
    import torch

    if A.shape[1] != B.shape[1]:
        return float("nan")
    if A.shape[1] == 0:
        return 0.0
    qa, qb = torch.linalg.qr(A.double())[0], torch.linalg.qr(B.double())[0]
    return math.asin(min(1.0, float(torch.linalg.matrix_norm(qb - qa @ (qa.T @ qb), ord=2))))


def run(quick: bool = False, experts: int | None = None, threads: int = 2, d_override: int | None = None,
        tokens: int | None = None, r_sig: int = 256, noise: float = 1e-3, seed: int = 0, out_dir=None,
        **_ignored) -> dict:
    import torch

    from benchmarks.bench_real_shapes import synthetic_inputs
    from grip_core.grip import GRIPConfig
    from grip_core.grip.fit import accumulate_gram, eig_basis

    C.setup_threads(threads)
    shape = dict(OLMOE)
    if d_override:                                                           # smoke tests only: a narrow router
        shape["d"], shape["label"] = d_override, f"{shape['label']} (d {d_override})"
    if tokens:
        shape["tokens"] = tokens
    d, E, k, N = shape["d"], shape["E"], shape["k"], shape["tokens"]
    n_j = k * N // E                                                         # tokens per expert (2048)
    n_exp = experts or (2 if quick else 8)
    r_sig = min(r_sig, d // 2)
    configs = {"float64": GRIPConfig(fit_solver="float64"), "auto": GRIPConfig(fit_solver="auto")}
    gram_s, eig_s = [], {s: [] for s in configs}
    per_expert, solvers = [], {}
    for j in range(n_exp):
        x = synthetic_inputs(n_j, d, r_sig, noise, seed + 101 * j)           # (n_j, d) float32
        gram = torch.zeros(1, d, d, dtype=torch.float64)
        t0 = time.perf_counter()
        accumulate_gram(gram, x.double(), torch.ones(n_j, 1, dtype=torch.bool))
        gram_s.append(time.perf_counter() - t0)
        out = {}
        order = list(configs) if j % 2 == 0 else list(configs)[::-1]         # A/B then B/A
        for name in order:
            report = {}
            t0 = time.perf_counter()
            basis, spectrum = eig_basis(gram, configs[name], report=report)
            eig_s[name].append(time.perf_counter() - t0)
            out[name] = basis[0]
            if name == "auto":
                for kind, n in report.items():
                    solvers[kind] = solvers.get(kind, 0) + n
        per_expert.append({"rank_float64": out["float64"].shape[1], "rank_auto": out["auto"].shape[1],
                           "max_principal_angle_rad": max_principal_angle(out["float64"], out["auto"]),
                           "gram_s": gram_s[-1], "eigh_float64_s": eig_s["float64"][-1],
                           "eigh_auto_s": eig_s["auto"][-1]})
        print(f"  expert {j}: rank {per_expert[-1]['rank_float64']} / {per_expert[-1]['rank_auto']}, "
              f"angle {per_expert[-1]['max_principal_angle_rad']:.1e}, gram {gram_s[-1]:.2f} s, eigh float64 "
              f"{eig_s['float64'][-1]:.2f} s, auto {eig_s['auto'][-1]:.2f} s", flush=True)
        del gram, x
    g = C.median(gram_s)
    layer = {name: E * (g + C.median(ts)) for name, ts in eig_s.items()}
    ranks_equal = all(p["rank_float64"] == p["rank_auto"] for p in per_expert)
    angle = max(p["max_principal_angle_rad"] for p in per_expert)
    summary = {"fit_s_layer[float64]": layer["float64"], "fit_s_layer[auto]": layer["auto"],
               "fit_speedup_ratio": layer["float64"] / layer["auto"],
               "fit_eigh_ratio[auto/float64]": C.median(eig_s["auto"]) / C.median(eig_s["float64"]),
               "fit_max_principal_angle_rad": angle, "fit_ranks_equal": ranks_equal,
               "fit_target_30s_met[auto]": layer["auto"] <= 30.0}
    payload = {"name": NAME, "quick": quick, "machine": C.machine_info(),
               "config": {"shape": shape, "tokens_per_expert": n_j, "experts_measured": n_exp, "threads": threads,
                          "inputs": {"r_sig": r_sig, "noise": noise, "spectrum": "s_i ∝ (i+1)^-0.5"},
                          "grip": {"threshold_kind": "absolute", "eps_null": 1e-2},
                          "note": "per layer = E x (median Gram + median eigh) over the measured experts; "
                                  "the solvers run alternately on the same Gram in one process"},
               "results": {"per_expert": per_expert, "solvers_auto": solvers,
                           "gram_s_median": g, "eigh_s_median": {n: C.median(t) for n, t in eig_s.items()},
                           "fit_s_layer": layer},
               "summary": summary}
    path = C.write_result(NAME, payload, out_dir)
    print(f"GRIP fit per layer at {shape['label']} width (d {d}, E {E}, top-{k}, {N} tokens, {n_j} per expert), "
          f"torch threads {threads}, load avg {payload['machine'].get('loadavg_1_5_15')} on "
          f"{payload['machine'].get('cpu_count')} CPUs:")
    print(f"  float64 (before): {layer['float64']:.1f} s / layer;  auto (after): {layer['auto']:.1f} s / layer  "
          f"(x{summary['fit_speedup_ratio']:.2f}); Gram {g:.2f} s / expert; ranks equal {ranks_equal}; "
          f"max principal angle {angle:.1e} rad; auto solvers {solvers}")
    print(f"wrote {path}")
    return payload


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(threads=2)
    p.add_argument("--experts", type=int, default=None, help="experts measured (quick 2, full 8); x E per layer")
    p.add_argument("--tokens", type=int, default=None, help="retained tokens per layer (default 16384)")
    a = p.parse_args(argv)
    run(a.quick, a.experts, a.threads, tokens=a.tokens, out_dir=a.out_dir)


if __name__ == "__main__":
    main()

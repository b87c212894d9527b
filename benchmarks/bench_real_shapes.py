"""GRIP at real router shapes: OLMoE-1B-7B (d 2048, 64 experts, top-8, 16 layers) and a Qwen3-30B-A3B-like
router (d 2048, 128 experts, top-8, 48 layers), without the 7B / 30B models.

Stand-in model. `GRIP.fit` takes a `grip_core.MoEModel`; it is driven unchanged through a minimal real
`nn.Module` whose layers hold REAL transformers routers (`OlmoeTopKRouter` from
`OlmoeConfig(hidden_size=2048, num_experts=64, num_experts_per_tok=8)`, `Qwen3MoeTopKRouter` likewise) at
`layers.<i>.mlp.gate`; its forward feeds each router a bank of synthetic router inputs indexed by the
"token ids" (token n of the batch = row n of the bank). MoEModel discovers the routers by class name
(…TopKRouter), so fit, trace hooks and the adapter run exactly as on a real checkpoint. Router weights
are N(0, 0.02²) (transformers' initializer_range).

Synthetic router inputs (post-RMSNorm-like, per-coordinate RMS ≈ 1): x = B·(s ⊙ z) + σ·n with B a random
orthonormal d × r_sig basis (r_sig = 256), singular values s_i ∝ (i+1)^-0.5 scaled so E‖B(s⊙z)‖² = d,
z, n ~ N(0, I), σ = 1e-3 (`--noise`). So every expert sees a low-rank-ish cloud with a decaying spectrum
and a noise floor BELOW the absolute threshold (N_j·σ² < ε_null = 1e-2 for N_j ≤ 10k tokens): ranks are
set by the signal, as when real activations have a small numerical rank. The rank, hence the state size,
is a property of the data: the JSON also gives the relative-threshold (99.9 % energy) ranks of the same
fit and the full-rank worst case (E·d²·4 bytes a layer = the naive per-expert projector).

What is fitted, what is extrapolated.
  * An eigendecomposition of a 2048 × 2048 float64 Gram per expert costs ~2-5 s on one core, so a full
    OLMoE layer (64 experts) is minutes and a Qwen3 layer needs ~13 GB while fitting. The fit therefore
    runs on `--fit-experts` experts (quick 1, full 8; `--full-experts` for the real E) with top-k scaled
    so that each expert still gets `--tokens-per-expert` retained tokens (quick 1024, full 4096). GRIP's
    per-expert work (a Gram over its N_j tokens, one eigh, U_j) is independent of the other experts, so
    fit time and basis bytes per layer = per-expert figures × E; all layers = × L (`--layers` fitted,
    quick 1, full 2: the stand-in's layers are i.i.d.).
  * The per-step cost is measured at the FULL E on one layer: a GRIPState is assembled from the fitted
    bases (cycled over E experts) and margin rows whose reference top-k comes from a full-E router, and
    the real adapter (`GRIP(...).after_step`, update mode, α-scaling) projects random router updates.
    All layers = × L (layers are independent in after_step).

What we store, and why (target: OLMoE state ≤ 2 GB). The state is dominated by U_j (E·d·r̄·L values)
and the margin rows (M·d·L). U_j is orthonormal, so float16 storage (`GRIPConfig(basis_dtype="float16")`)
costs only a 2^-11 relative rounding, halves the dominant term, and projections still run in float32;
the JSON gives the retained-span leak that rounding causes (`step.retained_leak_*`). Storing the
complement (null-space basis) would only pay when r̄ > d/2, which these inputs (and real activations of
small numerical rank) do not reach. The fit streams the retain set once per layer
(`fit_layers_per_pass=1`): one layer's Grams (E·d²·8 bytes, 2.1 GB for OLMoE) live at a time instead
of all L (34 GB), at the cost of L forward passes; the eigendecompositions run one expert at a time.

    python benchmarks/bench_real_shapes.py [--quick] [--shapes olmoe,qwen3] [--full-experts]
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "real_shapes"
SHAPES = {
    "olmoe": dict(label="OLMoE-1B-7B", model_type="olmoe", d=2048, E=64, k=8, L=16),
    "qwen3": dict(label="Qwen3-30B-A3B-like", model_type="qwen3_moe", d=2048, E=128, k=8, L=48),
}
GB = 1e9


def _router_parts(model_type: str, d: int, E: int, k: int):
    if model_type == "olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

        return OlmoeConfig(hidden_size=d, num_experts=E, num_experts_per_tok=k), OlmoeTopKRouter
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    return Qwen3MoeConfig(hidden_size=d, num_experts=E, num_experts_per_tok=k), Qwen3MoeTopKRouter


def build_standin(model_type: str, d: int, E: int, k: int, banks: list, seed: int = 0):
    """A MoEModel over real transformers routers fed from `banks` (one (N, d) input bank per layer)."""
    import torch
    from torch import nn

    from grip_core import MoEModel

    config, router_cls = _router_parts(model_type, d, E, k)

    class _MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = router_cls(config)

    class _Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = _MoE()

    class RouterStandIn(nn.Module):
        """forward(input_ids) runs router ℓ on banks[ℓ][input_ids]: token id n = synthetic input n."""

        def __init__(self):
            super().__init__()
            self.config = config
            self.layers = nn.ModuleList(_Layer() for _ in banks)
            self.banks = banks

        @property
        def device(self):
            return torch.device("cpu")

        def forward(self, input_ids, attention_mask=None, **_):
            ids = input_ids.reshape(-1)
            for layer, bank in zip(self.layers, self.banks):
                layer.mlp.gate(bank[ids])
            return None

    model = RouterStandIn()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.gate.weight.copy_(0.02 * torch.randn(E, d, generator=g))
    return MoEModel(model.eval(), None, name=f"standin-{model_type}")


def synthetic_inputs(n: int, d: int, r_sig: int, noise: float, seed: int):
    """(n, d) float32: low-rank-ish signal with a decaying spectrum + an isotropic noise floor (module doc)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    B = torch.linalg.qr(torch.randn(d, r_sig, generator=g))[0]               # (d, r) orthonormal
    s = (torch.arange(r_sig, dtype=torch.float32) + 1).pow(-0.5)
    s = s * math.sqrt(d / float(s.pow(2).sum()))                             # E‖B(s⊙z)‖² = d
    z = torch.randn(n, r_sig, generator=g) * s
    return z @ B.T + noise * torch.randn(n, d, generator=g)


def _token_batches(n: int, rows: int = 64):
    import torch

    T = max(1, n // rows)
    ids = torch.arange(rows * T).reshape(rows, T)
    return [{"input_ids": ids[i:i + 16], "attention_mask": torch.ones_like(ids[i:i + 16])} for i in range(0, rows, 16)]


def state_bytes_per_layer(d: int, E: int, k: int, ranks_mean: float, M: int, probe: int,
                          basis_bytes: int = 2) -> dict:
    """GRIPState bytes of one layer with mean rank r̄ (fit.py's layout: U_j in basis_dtype, float64 spectrum)."""
    b = {"bases": basis_bytes * E * d * ranks_mean, "spectrum": 8 * E * d, "margin_rows": 4 * M * d,
         "margin_logits_selected": M * (4 * E + 8 * k), "theta0": 4 * E * d, "probe_scores": probe * (4 * E + 8 * k)}
    b["total"] = sum(b.values())
    return b


def _alternatives(ranks, rel, d: int, E: int, k: int, M: int, probe: int, L: int) -> dict:
    """State (GB, all layers) if U_j were stored differently; ranks are the fitted experts' (cycled over E)."""
    def total(r_eff_mean: float, basis_bytes: int = 4, row_bytes: int = 4) -> float:
        b = state_bytes_per_layer(d, E, k, r_eff_mean, M, probe, basis_bytes)
        b["bases"] = basis_bytes * E * d * r_eff_mean
        b["margin_rows"] = row_bytes * M * d
        return (sum(v for key, v in b.items() if key != "total")) * L / GB
    ra, rr = ranks.float(), rel.float()
    comp = lambda r: float(torch_min(r, d - r).mean())
    return {"fp32_U": total(float(ra.mean())),
            "fp16_U (chosen)": total(float(ra.mean()), 2),
            "fp16_U_and_margin_rows": total(float(ra.mean()), 2, 2),
            "min(U, null-space basis) fp32": total(comp(ra)),
            "min(U, null-space basis) fp16": total(comp(ra), 2, 2),
            "relative_99.9 fp32_U": total(float(rr.mean())),
            "full_rank fp32_U (frozen rows)": total(float(d)),
            "full_rank, null-space basis (frozen rows store nothing)": total(0.0)}


def torch_min(a, b):
    import torch

    return torch.minimum(a, torch.as_tensor(b, dtype=a.dtype))


def _time_steps(shape: dict, fit_state, reps: int, seed: int, max_step_gb: float) -> dict:
    """after_step at the full E on one layer, from the fitted experts' bases and margin rows."""
    import torch

    from grip_core.grip import GRIP, GRIPConfig, GRIPState, LayerStats

    d, E, k = shape["d"], shape["E"], shape["k"]
    st = fit_state.layers[0]
    leak = _retained_leak(st.basis, seed)
    fp16 = [b.half() for b in st.basis]                                      # as basis_dtype="float16" stores U_j
    bases = [fp16[j % len(fp16)] for j in range(E)]                          # shared tensors: no copies
    r_max = max(b.shape[1] for b in bases)
    E_time = E
    if 4 * E * d * r_max > max_step_gb * GB:                                 # the adapter pads U to r_max
        E_time = max(1, int(max_step_gb * GB // (4 * d * r_max)))
    X = st.margin_x                                                          # (M, d) fitted reservoir
    moe = build_standin(shape["model_type"], d, E_time, min(k, E_time), [X], seed=seed + 1)
    layer = moe.layers[0]
    with torch.no_grad():
        logits = X @ layer.router_weight.T
    sel = logits.topk(layer.top_k, dim=1).indices
    spec = torch.zeros(E_time, d, dtype=torch.float64)
    ls = LayerStats(layer_index=0, num_experts=E_time, top_k=layer.top_k, hidden_size=d, has_bias=False,
                    basis=bases[:E_time], spectrum=spec, basis_weight=None, spectrum_weight=None,
                    tokens_per_expert=torch.zeros(E_time, dtype=torch.long), margin_x=X, margin_logits=logits,
                    margin_selected=sel, theta0=layer.router_weight.detach().clone(), rule=st.rule,
                    selection_agreement=1.0)
    state = GRIPState(config=GRIPConfig().to_dict(), layers=[ls], probe_batches=[], probe_logits=[logits],
                      probe_selected=[sel], num_tokens=X.shape[0], fit_seconds=0.0, accumulator_bytes=0)
    grip = GRIP(moe, state, GRIPConfig())
    g = torch.Generator().manual_seed(seed)
    w = layer.router_weight
    hooks = []
    for rep in range(reps + 1):
        delta = 1e-3 * torch.randn(w.shape, generator=g)
        t0 = time.perf_counter()
        grip.before_step()
        with torch.no_grad():
            w.add_(delta)
        grip.after_step()
        hooks.append(1e3 * (time.perf_counter() - t0))
    h = grip.history[1:]
    scale = E / E_time
    out = {"experts_timed": E_time, "scaled_by": scale, "margin_rows": X.shape[0], "r_max": r_max,
           "basis_dtype_timed": str(bases[0].dtype), **leak,
           "projector_padded_U_mb": 4 * E * d * r_max / 2**20,
           "project_ms_layer": scale * C.median([x.t_project_ms for x in h]),
           "margin_ms_layer": scale * C.median([x.t_margin_ms for x in h]),
           "after_step_ms_layer": scale * C.median(hooks[1:])}
    out["after_step_ms_all_layers"] = out["after_step_ms_layer"] * shape["L"]
    out["project_ms_all_layers"] = out["project_ms_layer"] * shape["L"]
    out["margin_ms_all_layers"] = out["margin_ms_layer"] * shape["L"]
    # the equality projection's floor: E·d·r̄ multiply-adds, twice (Uᵀu then U·c), per layer
    out["projection_floor_mflop_layer"] = 2 * 2 * E * d * float(sum(b.shape[1] for b in bases) / E) / 1e6
    del grip, moe
    return out


def _retained_leak(basis32: list, seed: int, reps: int = 8) -> dict:
    """Share of a random update's retained-span component that survives the projection, float32 vs
    float16-stored U_j (median over experts x reps): ‖U32ᵀ(u − Ũ Ũᵀu)‖ / ‖U32ᵀu‖, Ũ = U upcast."""
    import torch

    from grip_core.grip.project import project_equality

    g = torch.Generator().manual_seed(seed + 7)
    out = {}
    for name, dt in (("float32", torch.float32), ("float16", torch.float16)):
        vals = []
        for U in basis32:
            if U.shape[1] == 0:
                continue
            Ut = U.to(dt).float()[None]                                          # (1, d, r) as the adapter pads it
            for _ in range(reps):
                u = torch.randn(1, U.shape[0], generator=g)
                vals.append(float((U.T @ project_equality(Ut, u)[0]).norm() / (U.T @ u[0]).norm()))
        out[f"retained_leak_{name}"] = C.median(vals) if vals else 0.0
    return out


def run_shape(key: str, quick: bool, fit_experts: int | None, full_experts: bool, tokens_per_expert: int | None,
              layers: int | None, noise: float, r_sig: int, step_reps: int | None, seed: int, max_step_gb: float,
              d_override: int | None = None) -> dict:
    from grip_core.grip import GRIP, GRIPConfig

    shape = dict(SHAPES[key])
    if d_override:                                                           # smoke tests only: a narrow router
        shape["d"], shape["label"] = d_override, f"{shape['label']} (d {d_override})"
    d, E, k, L = shape["d"], shape["E"], shape["k"], shape["L"]
    E_fit = E if full_experts else min(E, fit_experts or (1 if quick else 8))
    k_fit = max(1, round(k * E_fit / E))
    nj = tokens_per_expert or (1024 if quick else 4096)
    n_tokens = int(math.ceil(nj * E_fit / k_fit / 64.0)) * 64
    n_layers = layers or (1 if quick else 2)
    banks = [synthetic_inputs(n_tokens, d, r_sig, noise, seed + 17 * i) for i in range(n_layers)]
    moe = build_standin(shape["model_type"], d, E_fit, k_fit, banks, seed=seed)
    config = GRIPConfig(fit_layers_per_pass=1)                               # float32 U_j: the leak baseline
    batches = _token_batches(n_tokens)
    with C.RSSPeak() as mem:
        t0 = time.perf_counter()
        grip = GRIP.fit(moe, batches, config)
        fit_s = time.perf_counter() - t0
    st = grip.state
    ranks = st.null_space_rank.new_tensor([[b.shape[1] for b in l.basis] for l in st.layers])   # (L', E_fit)
    rel = st.rank_table("relative", 0.999)
    r_abs, r_rel = float(ranks.float().mean()), float(rel.float().mean())
    M = st.layers[0].margin_x.shape[0]
    M_real = config.max_margin_rows                                          # a real retain set fills the cap
    probe = config.probe_tokens
    per_layer = state_bytes_per_layer(d, E, k, r_abs, M_real, probe)             # float16 U_j (chosen)
    per_layer_rel = state_bytes_per_layer(d, E, k, r_rel, M_real, probe)
    per_layer_full = state_bytes_per_layer(d, E, k, float(d), M_real, probe)
    fit_s_per_expert_layer = fit_s / (E_fit * n_layers)
    measured_state = st.nbytes()
    res = {
        "shape": shape, "fit": {"experts_fitted": E_fit, "top_k_fitted": k_fit, "layers_fitted": n_layers,
                                "tokens": st.num_tokens, "tokens_per_expert": float(st.layers[0].tokens_per_expert.float().mean()),
                                "fit_s": fit_s, "fit_s_per_expert_layer": fit_s_per_expert_layer,
                                "rss_peak_mb": mem.delta_bytes / 2**20, "state_bytes_measured": measured_state,
                                "accumulator_bytes_measured": st.accumulator_bytes},
        "ranks": {"absolute_eps_1e-2_mean": r_abs, "relative_99.9_mean": r_rel,
                  "absolute_per_expert": ranks.tolist(), "relative_per_expert": rel.tolist(), "d": d,
                  "basis_dtype": "float16 (stored; fitted in float32 as the leak baseline)", "spectrum_dtype": str(st.layers[0].spectrum.dtype)},
        "extrapolated": {
            "fit_s_layer": fit_s_per_expert_layer * E, "fit_s_all_layers": fit_s_per_expert_layer * E * L,
            "state_gb_per_layer": per_layer["total"] / GB, "state_gb_total": per_layer["total"] * L / GB,
            "bases_gb_total": per_layer["bases"] * L / GB, "margin_rows_gb_total": per_layer["margin_rows"] * L / GB,
            "state_gb_total_relative_threshold": per_layer_rel["total"] * L / GB,
            "state_gb_total_full_rank_worst_case": per_layer_full["total"] * L / GB,
            "naive_dxd_per_expert_gb": 4 * E * d * d * L / GB,
            "fit_gram_accumulators_gb_all_layers_at_once": 8 * E * d * d * L / GB,
            "fit_gram_accumulators_gb_layer_at_a_time": 8 * E * d * d / GB,
            "fit_peak_gb_layer_at_a_time_estimate": (8 * E * d * d + 2 * 8 * d * d) / GB,
            "fit_rss_mb_per_fitted_expert": mem.delta_bytes / 2**20 / E_fit,
            # the same fit under other storage layouts (analytic, from the measured per-expert ranks)
            "alternatives_gb_total": _alternatives(ranks, rel, d, E, k, M_real, probe, L)},
        "state_breakdown_bytes_per_layer": per_layer,
    }
    res["step"] = _time_steps(shape, st, step_reps or (3 if quick else 8), seed, max_step_gb)
    del grip, st, moe, banks
    return res


def run(quick: bool = False, shapes: list[str] | None = None, fit_experts: int | None = None,
        full_experts: bool = False, tokens_per_expert: int | None = None, layers: int | None = None,
        noise: float = 1e-3, r_sig: int = 256, step_reps: int | None = None, threads: int = 1, seed: int = 0,
        max_step_gb: float = 1.5, out_dir=None, d_override: int | None = None) -> dict:
    C.setup_threads(threads)
    shapes = shapes or list(SHAPES)
    results, rows = {}, []
    for key in shapes:
        r = run_shape(key, quick, fit_experts, full_experts, tokens_per_expert, layers, noise, min(r_sig, d_override or r_sig),
                      step_reps, seed, max_step_gb, d_override)
        results[key] = r
        x, s = r["extrapolated"], r["step"]
        rows.append({"shape": r["shape"]["label"], "rank_abs": r["ranks"]["absolute_eps_1e-2_mean"],
                     "rank_rel": r["ranks"]["relative_99.9_mean"], "state_GB": x["state_gb_total"],
                     "state_GB_rel": x["state_gb_total_relative_threshold"],
                     "state_GB_fullrank": x["state_gb_total_full_rank_worst_case"],
                     "naive_GB": x["naive_dxd_per_expert_gb"], "fit_s_layer": x["fit_s_layer"],
                     "fit_min_all": x["fit_s_all_layers"] / 60, "step_ms_layer": s["after_step_ms_layer"],
                     "proj_ms_layer": s["project_ms_layer"], "margin_ms_layer": s["margin_ms_layer"],
                     "step_ms_all": s["after_step_ms_all_layers"]})
    summary = {}
    for key, r in results.items():
        summary[f"state_gb[{key}]"] = r["extrapolated"]["state_gb_total"]
        summary[f"state_gb_relative[{key}]"] = r["extrapolated"]["state_gb_total_relative_threshold"]
        summary[f"grip_step_ms_all_layers[{key}]"] = r["step"]["after_step_ms_all_layers"]
        summary[f"grip_project_ms_layer[{key}]"] = r["step"]["project_ms_layer"]
        summary[f"fit_min_all_layers[{key}]"] = r["extrapolated"]["fit_s_all_layers"] / 60
    if "olmoe" in results:
        summary["olmoe_state_within_2gb"] = results["olmoe"]["extrapolated"]["state_gb_total"] <= 2.0
    payload = {"quick": quick, "machine": C.machine_info(),
               "config": {"shapes": shapes, "noise": noise, "r_sig": r_sig, "spectrum": "s_i ∝ (i+1)^-0.5",
                          "router_init_std": 0.02, "grip": {"threshold_kind": "absolute", "eps_null": 1e-2, "basis_dtype": "float16",
                                                            "fit_layers_per_pass": 1,
                                                            "max_margin_rows": 4096, "probe_tokens": 4096},
                          "target_state_gb_olmoe": 2.0, "d_override": d_override},
               "results": results, "summary": summary}
    path = C.write_result(NAME, payload, out_dir)
    print(f"real router shapes (stand-in with real transformers routers; synthetic inputs r_sig {r_sig}, noise {noise}); "
          f"load avg {payload['machine'].get('loadavg_1_5_15')}")
    print(C.fmt_table(rows, list(rows[0])))
    for key, r in results.items():
        f = r["fit"]
        print(f"  {r['shape']['label']}: fitted {f['experts_fitted']} experts x {f['layers_fitted']} layer(s), "
              f"{f['tokens_per_expert']:.0f} tokens/expert in {f['fit_s']:.1f} s (RSS +{f['rss_peak_mb']:.0f} MB); "
              f"fitted one layer per pass: Grams {r['extrapolated']['fit_gram_accumulators_gb_layer_at_a_time']:.1f} GB at a time "
              f"at full E (all layers at once would be {r['extrapolated']['fit_gram_accumulators_gb_all_layers_at_once']:.0f} GB); "
              f"U_j stored float16: retained-span leak {r['step']['retained_leak_float16']:.1e} "
              f"(float32 {r['step']['retained_leak_float32']:.1e})")
    for key, r in results.items():
        alts = ", ".join(f"{k_}: {v:.2f}" for k_, v in r["extrapolated"]["alternatives_gb_total"].items())
        print(f"  {r['shape']['label']} state under other layouts (GB, all layers): {alts}")
    print(f"target: OLMoE state ≤ 2 GB (naive d×d per expert {results.get('olmoe', r)['extrapolated']['naive_dxd_per_expert_gb']:.1f} GB)")
    print(f"wrote {path}")
    return payload


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default=None, help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--fit-experts", type=int, default=None, help="experts per fitted layer (quick 1, full 8)")
    p.add_argument("--full-experts", action="store_true", help="fit the real E (OLMoE ~6 GB, Qwen3 ~13 GB peak)")
    p.add_argument("--tokens-per-expert", type=int, default=None, help="retained tokens per expert (quick 1024, full 4096)")
    p.add_argument("--layers", type=int, default=None, help="layers fitted (quick 1, full 2)")
    p.add_argument("--noise", type=float, default=1e-3, help="isotropic noise std of the synthetic inputs")
    p.add_argument("--r-sig", type=int, default=256, help="rank of the synthetic inputs' signal")
    p.add_argument("--step-reps", type=int, default=None)
    p.add_argument("--max-step-gb", type=float, default=1.5, help="cap on the padded bases while timing a step")
    a = p.parse_args(argv)
    run(a.quick, a.shapes.split(",") if a.shapes else None, a.fit_experts, a.full_experts, a.tokens_per_expert,
        a.layers, a.noise, a.r_sig, a.step_reps, a.threads, out_dir=a.out_dir, max_step_gb=a.max_step_gb)


if __name__ == "__main__":
    main()

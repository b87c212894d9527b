"""GRIP's per-step overhead on the unlearning step loop, measured A/B/A/B in ONE process.

The loop is the job runner's (grip_core.runs.job.run_unlearning): GradDiff, the `shortcut` preset
(MoE blocks only, experts lr 3e-4, routers x30), AdamW, grad-norm clip 1.0, batch 16 + 16. Every
variant trains its own deep copy of the same model on the SAME batches; each step runs every variant
once, in an order rotated every step (so none is always first), and the figure is the MEDIAN of the
per-step paired ratios t_variant / t_plain. A second plain copy (`plain-AA`) is the A/A control: its
ratio shows the noise floor of the machine.

Variants (names as in grip_core.runs.compare.GRIP_MODES where they exist):
    plain              no GRIP at all (the baseline)
    plain-AA           the same again (noise floor)
    off                GRIP wrapped in mode "off": the job runner's vanilla run (records would-be stats)
    update             update mode, α-scaling margin (the default)
    update-nomargin    update mode, equality projection only
    update-kaczmarz    update mode, Kaczmarz margin
    gradient           gradient mode (projects .grad; equality only)
    drift              update mode + drift-aware correction every 10 steps (ratio_total amortises it)

Whole run (on unless `--no-whole-run`): the job runner's complete unlearning run, GradDiff on the domain
scenario with the study's stopping rule (evaluate every 10 steps, stop once forget EM < 0.1, at most 200
steps), once vanilla and once per GRIP arm (`mode@lr`: a GRIP mode of grip_core.grip.config.MODES at its
own learning rate), one after the other on one shared Baseline. Wall time includes GRIP's fit, every step,
drift corrections and the evaluations; `train` counts fit + steps only. Whole runs cannot be interleaved,
so their ratios carry the machine's drift over minutes: read them with the load average.

GRIP's own time per step is read from grip.history (t_project_ms, t_margin_ms, t_drift_ms) and from
timers around the two optimizer hooks (before_step + after_step = everything GRIP does per step).
`--profile` adds a torch.profiler table of the update variant's after_step.

    python benchmarks/bench_step_overhead.py [--quick] [--steps N] [--profile]
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _common as C  # noqa: E402

NAME = "step_overhead"
WHOLE_RUN_ARMS = ("off@1e-4", "update@1e-4", "update@3e-4", "drift@3e-4", "anchor@1e-3")   # vanilla first: the reference
WHOLE_RUN_ARMS_QUICK = ("off@1e-4", "update@3e-4")
VARIANTS: dict[str, dict | None] = {                    # name -> GRIPConfig overrides (None = no GRIP)
    "plain": None,
    "plain-AA": None,
    "off": {"mode": "off"},
    "update": {"mode": "update"},
    "update-nomargin": {"mode": "update", "margin": False},
    "update-kaczmarz": {"mode": "update", "margin_method": "kaczmarz"},
    "gradient": {"mode": "gradient"},
    "drift": {"mode": "update", "drift_every": 10},
}


class _Arm:
    """One variant: a private model copy, its optimizer, and (optionally) GRIP with timed hooks."""

    def __init__(self, name, overrides, moe, data, run_config, fitted):
        import torch

        from grip_core import MoEModel
        from grip_core.grip import GRIP
        from grip_core.runs.compare import grip_config
        from grip_core.scope import build_param_groups

        self.name = name
        self.model = copy.deepcopy(moe.model)
        self.work = MoEModel(self.model, moe.tokenizer, name=moe.name)
        self.groups = build_param_groups(self.model, self.work, run_config.scope)
        self.params = [p for g in self.groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(self.groups, lr=run_config.scope.lr, weight_decay=run_config.weight_decay)
        self.grip = None
        self.fit_seconds = 0.0
        self.hook_ms: list[float] = []
        if overrides is not None:
            mode = overrides.get("mode", "update")
            cfg = grip_config("off" if mode == "off" else ("gradient" if mode == "gradient" else "update"),
                              run_config.seed, **{k: v for k, v in overrides.items() if k != "mode"})
            # GRIP.fit is deterministic and reads only the (identical) base weights and the fit knobs, which
            # no variant changes: fit once, give every arm its own copy (drift-aware GRIP refits in place)
            state, self.fit_seconds = fitted(cfg)
            self.grip = GRIP(self.work, copy.deepcopy(state), cfg)
            self._time_hooks()
            self.grip.wrap(self.optimizer)
        self.step_ms: list[float] = []
        self.grip_rows: list[dict] = []
        self.model.train()

    def _time_hooks(self):
        grip, acc = self.grip, {"t": 0.0}
        before, after = grip.before_step, grip.after_step

        def timed_before():
            t0 = time.perf_counter()
            before()
            acc["t"] = time.perf_counter() - t0

        def timed_after():
            t0 = time.perf_counter()
            out = after()
            self.hook_ms.append(1e3 * (acc["t"] + time.perf_counter() - t0))
            return out
        grip.before_step, grip.after_step = timed_before, timed_after       # the wrap() hooks call these

    def step(self, method, forget_batch, retain_batch, max_grad_norm):
        import torch

        t0 = time.perf_counter()
        out = method.loss(self.model, forget_batch, retain_batch, None)
        loss = out.total
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.name}: non-finite loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        if self.grip is not None:
            h = self.grip.history[-1]
            self.grip_rows.append({"project": h.t_project_ms, "margin": h.t_margin_ms, "drift": h.t_drift_ms,
                                   "hooks": self.hook_ms[-1], "kaczmarz_iters": max(h.kaczmarz_iters or [0]),
                                   "alpha_min": min(h.alpha_min) if h.alpha_min else 1.0})


def _profile_after_step(arm, n: int = 10) -> list[dict]:
    """Top ops of GRIP's after_step (update variant) on the arm's current model: replayed steps of a fixed delta."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    grip, layers = arm.grip, arm.work.layers
    g = torch.Generator().manual_seed(0)
    deltas = [1e-3 * torch.randn(l.router_weight.shape, generator=g) for l in layers]
    saved = [l.router_weight.detach().clone() for l in layers]
    hist = len(grip.history)

    def one():
        grip.before_step()
        with torch.no_grad():
            for l, d in zip(layers, deltas):
                l.router_weight.add_(d)
        grip.after_step()
    one()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            one()
    with torch.no_grad():
        for l, w in zip(layers, saved):
            l.router_weight.copy_(w)
    del grip.history[hist:]
    grip.num_steps -= n + 1
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
        rows.append({"op": e.key, "calls_per_step": e.count / n, "self_ms_per_step": e.self_cpu_time_total / 1e3 / n})
    return rows


def _whole_runs(moe, data, arms, seed: int, max_steps: int, eval_examples: int, final_eval_examples: int,
                batch_size: int) -> list[dict]:
    """Complete runs (see module doc), one per `mode@lr` arm, in order; the first is the reference."""
    import dataclasses

    from grip_core.runs.compare import make_config
    from grip_core.runs.evaluate import Baseline
    from grip_core.runs.job import run_unlearning
    from grip_core.runs.verdict import FORGET_TARGET

    kw = dict(eval_examples=eval_examples, final_eval_examples=final_eval_examples, batch_size=batch_size)
    baseline = Baseline.compute(moe, data, make_config("graddiff", "off", "shortcut", seed, max_steps, **kw))
    rows = []
    for arm in arms:
        mode, lr = arm.split("@")
        config = make_config("graddiff", mode, "shortcut", seed, max_steps, eval_every=10,
                             stop_at_forget_em=FORGET_TARGET, **kw)
        config.scope = dataclasses.replace(config.scope, lr=float(lr))
        t0 = time.perf_counter()
        result = run_unlearning(moe, config, data, baseline=baseline, save=False)
        wall = time.perf_counter() - t0
        h, t = result.summary.get("headline", {}), result.summary.get("timing", {})
        step_s = sum(r["step_ms"] for r in result.step_log) / 1e3
        fit_s = 0.0 if t.get("grip_fit_cached") else (t.get("grip_fit_seconds") or 0.0)
        rows.append({"arm": arm, "mode": mode, "lr": float(lr), "steps": result.steps_done,
                     "reached_forget_target": bool(result.step_log and result.step_log[-1].get("forget_em", 1.0)
                                                   < FORGET_TARGET),
                     "wall_s": wall, "train_s": fit_s + step_s, "fit_s": fit_s, "steps_s": step_s,
                     "drift_s": sum(r.get("grip_drift_ms", 0.0) for r in result.step_log) / 1e3,
                     "forget_em": h.get("forget_em"), "retain_em": h.get("retain_em"),
                     "retain_stability": h.get("retain_stability"),
                     "retain_stability_router_only": h.get("retain_stability_router_only")})
    ref = rows[0]
    for r in rows:
        r["wall_ratio"], r["train_ratio"] = r["wall_s"] / ref["wall_s"], r["train_s"] / ref["train_s"]
        r["steps_ratio"] = r["steps"] / max(ref["steps"], 1)
    return rows


def run(quick: bool = False, steps: int | None = None, warmup: int | None = None, model: str = "auto",
        world: str | None = None, variants: list[str] | None = None, threads: int = 1, batch_size: int = 16,
        profile: bool = False, out_dir=None, seed: int = 0, fit_examples: int | None = None,
        whole_run: bool = True, whole_run_arms: list[str] | None = None, whole_run_max_steps: int = 200,
        whole_run_eval_examples: int | None = None) -> dict:
    C.setup_threads(threads)
    from grip_core.data import encode_qa
    from grip_core.methods import get_method
    from grip_core.runs.compare import make_config
    from grip_core.runs.data import UnlearningData
    from grip_core.runs.job import example_batches as _batches, seed_everything

    steps = steps or (10 if quick else 40)
    # GRIP.fit on every retain example, as the job runner does: on the demo a 512-example fit leaves ~7x more free
    # directions in layer 0 and some in layers 1-3 (all frozen with the full fit), so more experts move per step
    warmup = 2 if warmup is None and quick else (3 if warmup is None else warmup)
    names = variants or list(VARIANTS)
    if "plain" not in names:
        names = ["plain"] + names
    t_setup = time.perf_counter()
    moe, spec = C.load_bench_model(model)
    splits, world_dir = C.load_world(spec, world)
    train, held = UnlearningData._split_retain(list(splits.retain), 64, seed)
    data = UnlearningData(list(splits.forget), train, held, name="domain")
    run_config = make_config("graddiff", "update", "shortcut", seed, steps, batch_size=batch_size)
    encode = lambda ex: encode_qa(moe.tokenizer, ex, max_length=run_config.max_length)
    fit_src = data.retain_train[:fit_examples] if fit_examples else data.retain_train
    fit_batches = [encode(fit_src[i:i + 64]) for i in range(0, len(fit_src), 64)]
    seed_everything(seed)
    method = get_method(run_config.method, **run_config.method_args)
    from grip_core.grip import fit_retain_statistics

    cache = {}

    def fitted(cfg):
        key = (cfg.threshold_kind, cfg.eps_null, cfg.energy, cfg.max_margin_rows, cfg.probe_tokens, cfg.seed)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = (fit_retain_statistics(moe, fit_batches, cfg), time.perf_counter() - t0)
        return cache[key]
    arms = [_Arm(n, VARIANTS[n], moe, data, run_config, fitted) for n in names]
    fs, rs = _batches(data.forget, batch_size, seed), _batches(data.retain_train, batch_size, seed + 1)
    batches = [(encode(next(fs)), encode(next(rs))) for _ in range(warmup + steps)]
    setup_s = time.perf_counter() - t_setup

    t_loop = time.perf_counter()
    for s, (fb, rb) in enumerate(batches):
        k = s % len(arms)
        for arm in arms[k:] + arms[:k]:                                       # rotated order every step
            arm.step(method, fb, rb, run_config.max_grad_norm)
    loop_s = time.perf_counter() - t_loop

    base = arms[0].step_ms[warmup:]
    off = next((a.step_ms[warmup:] for a in arms if a.name == "off"), None)
    rows = []
    for arm in arms:
        t = arm.step_ms[warmup:]
        ratios = [a / b for a, b in zip(t, base)]
        row = {"variant": arm.name, "step_ms_median": C.median(t), "ratio_median": C.median(ratios),
               "ratio_p25": C.quantile(ratios, 0.25), "ratio_p75": C.quantile(ratios, 0.75),
               "ratio_total": sum(t) / sum(base),
               "ratio_vs_off_median": C.median([a / b for a, b in zip(t, off)]) if off else None,
               "fit_s": arm.fit_seconds}
        if arm.grip is not None:
            g = arm.grip_rows[warmup:]
            drift = [r["drift"] for r in g]
            row.update({"grip_hooks_ms_median": C.median([r["hooks"] for r in g]),
                        "grip_hooks_ms_mean": sum(r["hooks"] for r in g) / len(g),
                        "project_ms_median": C.median([r["project"] for r in g]),
                        "margin_ms_median": C.median([r["margin"] for r in g]),
                        "drift_ms_per_call": C.median([d for d in drift if d > 0]) if any(drift) else 0.0,
                        "drift_calls": sum(1 for d in drift if d > 0),
                        "drift_ms_amortised": sum(drift) / len(drift),
                        "kaczmarz_iters_median": C.median([r["kaczmarz_iters"] for r in g]),
                        "alpha_min_median": C.median([r["alpha_min"] for r in g])})
            row["other_ms_median"] = max(0.0, row["grip_hooks_ms_median"] - row["project_ms_median"]
                                         - row["margin_ms_median"])
            # low-noise estimate of the same overhead: GRIP's own time (its two hooks, drift included, mean over
            # steps) over the plain step. The paired ratio above is the direct measurement; see plain-AA for noise.
            row["ratio_attributed"] = 1.0 + row["grip_hooks_ms_mean"] / C.median(base)
        rows.append(row)
    layer0 = moe.layers[0]
    ref = next((a for a in arms if a.grip is not None), None)
    state = ref.grip.state if ref else None
    floor = None
    if state is not None:
        # equality projection floor: E·d'·r multiply-adds per product, two products per layer (Uᵀu, then U·c)
        floor = sum(2 * l.num_experts * l.input_dim * int(l.ranks.float().mean()) for l in state.layers)
    prof = _profile_after_step(next(a for a in arms if a.name == "update"), 10) if profile and \
        any(a.name == "update" for a in arms) else None
    per_step_ms = {a.name: a.step_ms for a in arms}
    del arms                                                                 # free the model copies first
    whole = None
    if whole_run:
        n_eval = whole_run_eval_examples or (64 if quick else 200)
        whole = _whole_runs(moe, data, list(whole_run_arms or (WHOLE_RUN_ARMS_QUICK if quick else WHOLE_RUN_ARMS)),
                            seed, whole_run_max_steps, min(64, n_eval), n_eval, batch_size)

    by = {r["variant"]: r for r in rows}
    summary = {f"step_ratio[{n}]": by[n]["ratio_median"] for n in names if n != "plain"}
    summary.update({f"step_ratio_attributed[{n}]": by[n]["ratio_attributed"] for n in names
                    if "ratio_attributed" in by[n]})
    summary.update({f"step_ratio_total[{n}]": by[n]["ratio_total"] for n in ("drift",) if n in by})
    summary["plain_step_ms"] = by["plain"]["step_ms_median"]
    for n in ("update", "update-kaczmarz", "drift"):
        if n in by:
            summary[f"grip_ms[{n}]"] = by[n].get("grip_hooks_ms_median")
    if "update" in by:
        summary["update_project_ms"] = by["update"]["project_ms_median"]
        summary["update_margin_ms"] = by["update"]["margin_ms_median"]
    if "drift" in by and by["drift"].get("drift_calls"):
        summary["drift_ms_per_call"] = by["drift"]["drift_ms_per_call"]
    for r in (whole or [])[1:]:
        summary[f"whole_run_ratio[{r['arm']}]"] = r["wall_ratio"]
        summary[f"whole_run_train_ratio[{r['arm']}]"] = r["train_ratio"]
        summary[f"whole_run_steps_ratio[{r['arm']}]"] = r["steps_ratio"]
    payload = {
        "quick": quick, "machine": C.machine_info(),
        "config": {"model": spec, "world": world_dir, "method": "graddiff", "preset": "shortcut",
                   "scope": run_config.scope.__dict__, "batch_size": batch_size, "max_length": run_config.max_length,
                   "steps": steps, "warmup": warmup, "variants": names, "fit_tokens": state.num_tokens if state else None,
                   "num_layers": len(moe.layers), "hidden_size": layer0.hidden_size,
                   "num_experts": layer0.num_experts, "top_k": layer0.top_k,
                   "max_margin_rows": state.layers[0].margin_x.shape[0] if state else None,
                   "mean_rank_per_layer": [float(l.ranks.float().mean()) for l in state.layers] if state else None,
                   "projection_floor_flops_per_step": floor, "setup_s": setup_s, "loop_s": loop_s,
                   "target_ratio": 1.03, "target_whole_run_ratio": 1.3},
        "results": {"variants": rows, "per_step_ms": per_step_ms, "profile_update": prof, "whole_run": whole},
        "summary": summary}
    path = C.write_result(NAME, payload, out_dir)
    cols = ["variant", "step_ms_median", "ratio_median", "ratio_p25", "ratio_p75", "ratio_total", "ratio_attributed",
            "grip_hooks_ms_median", "project_ms_median", "margin_ms_median", "other_ms_median", "drift_ms_per_call",
            "kaczmarz_iters_median"]
    print(f"step overhead — {spec}, {len(moe.layers)} MoE layers, d {layer0.hidden_size}, E {layer0.num_experts}, "
          f"k {layer0.top_k}; {steps} paired steps after {warmup} warm-up; torch threads {threads}; "
          f"load avg {payload['machine'].get('loadavg_1_5_15')}")
    print(C.fmt_table(rows, cols))
    print("target: ratio ≤ 1.03 (ratio_median: median of paired per-step ratios vs plain, plain-AA = its noise "
          "floor; ratio_attributed: 1 + GRIP's hook time (mean, drift included) / plain step)")
    if whole:
        print("whole runs (GradDiff, domain, stop at forget EM < 0.1; ratios vs the first arm):")
        print(C.fmt_table(whole, ["arm", "steps", "reached_forget_target", "wall_s", "wall_ratio", "train_s",
                                  "train_ratio", "drift_s", "forget_em", "retain_em", "retain_stability"]))
    if prof:
        print("after_step profile (update variant), per step:")
        print(C.fmt_table(prof, ["op", "calls_per_step", "self_ms_per_step"]))
    print(f"wrote {path}")
    return payload


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 40, quick 12)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--variants", default=None, help="comma-separated subset of: " + ",".join(VARIANTS))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--fit-examples", type=int, default=None, help="retain examples for GRIP.fit (default: all, as the "
                                                                     "job runner)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of after_step (update variant)")
    p.add_argument("--no-whole-run", action="store_true", help="skip the complete vanilla vs GRIP runs")
    p.add_argument("--whole-run-arms", default=None,
                   help="comma list of MODE@LR, vanilla first (default " + ",".join(WHOLE_RUN_ARMS) + "; quick "
                        + ",".join(WHOLE_RUN_ARMS_QUICK) + ")")
    a = p.parse_args(argv)
    run(a.quick, a.steps, a.warmup, a.model, a.world, a.variants.split(",") if a.variants else None, a.threads,
        a.batch_size, a.profile, a.out_dir, fit_examples=a.fit_examples, whole_run=not a.no_whole_run,
        whole_run_arms=a.whole_run_arms.split(",") if a.whole_run_arms else None)


if __name__ == "__main__":
    main()

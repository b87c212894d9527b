"""GPU check: GRIP on a mid-size random MoE (OLMoE shapes) in bf16 — fit cost, step overhead, stability.

    python benchmarks/gpu_check.py                       # one CUDA GPU, < 3 min on an H100; prints JSON
    python benchmarks/gpu_check.py --device cpu --tiny   # the CPU smoke test of this script (seconds)
    python benchmarks/gpu_check.py --user-path           # a user's whole path on one GPU, < 5 min; prints JSON
    python benchmarks/gpu_check.py --user-path --device cpu --tiny   # its CPU smoke test

--user-path runs what a user does with their own checkpoint, through the public library and CLI code:
a real-width OLMoE checkpoint written to disk (bf16, sharded Hub layout; --tiny: hidden 256), load_model
(device/dtype auto), a streamed trace (tokens/s), a vanilla + GRIP GradDiff pair on the demo world's domain
scenario (routers x30, weights saved as deltas), diagnose of the vanilla run's delta (one model in memory),
and the Compare figures written as HTML. Each phase's seconds and peak CUDA memory go into the JSON.

Builds a randomly initialised OlmoeForCausalLM (hidden 2048, 64 experts, top-8, intermediate
1024, vocab 32000, --layers 2 by default) directly on the device in bf16, fits GRIP on ~16k
random retain tokens, then runs --steps GradDiff steps (random forget / retain token batches;
grip_core's GradDiff loss, AdamW, routers at 30x the learning rate) twice from the same weights:
GRIP off (plain optimizer) and GRIP update mode (`grip.wrap(optimizer)`). Prints one JSON object:
fit seconds (+ the CPU-eigh estimate, see below), GRIP state bytes, Gram accumulator bytes, per-step
ms off vs GRIP (median after warm-up, and the ratio), retained routing stability off vs GRIP (full
model, and "router only" = new routers on the original inputs, seen and unseen tokens), peak CUDA
memory per phase. Exit 3 (before building anything) if CUDA is asked for and absent.

Fit note: grip/fit.py accumulates the Grams on the CPU in float64 and runs eigh where they live.
At d 2048 / E 64 a CPU eigh costs ~1-10 s per expert (64 per layer), so this script passes
`reduce=` (fit.py's hook, a callable applied once to the accumulated statistics) to move the
summed Grams to the GPU before the eigendecomposition ("fit_eigh_device"); it also times ONE
CPU eigh of a real Gram and reports the extrapolated CPU cost ("fit_eigh_cpu_estimate_s").
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

FULL = dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8, vocab_size=32000,
            num_attention_heads=16, num_key_value_heads=16, seq=256, batch=8, retain_tokens=16384, eval_tokens=4096)
TINY = dict(hidden_size=64, intermediate_size=64, num_experts=8, num_experts_per_tok=2, vocab_size=512,
            num_attention_heads=4, num_key_value_heads=4, seq=32, batch=4, retain_tokens=1024, eval_tokens=256)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (hidden 64, 8 experts): the CPU smoke test")
    p.add_argument("--layers", type=int, default=2, help="decoder layers, all MoE (2-4)")
    p.add_argument("--steps", type=int, default=None, help="GradDiff steps per mode (default 20; --tiny 4)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the timing medians (3; --tiny 1)")
    p.add_argument("--retain-tokens", type=int, default=None, help="retain tokens for GRIP.fit (default 16384)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--router-lr-mult", type=float, default=30.0)
    p.add_argument("--fit-eigh", choices=["device", "cpu"], default="device",
                   help="where the eigendecompositions of the fit run (see the module doc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--user-path", action="store_true", help="load, trace, vanilla + GRIP pair, diagnose, figures")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (4 if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    return args


def fail_without_cuda(device: str) -> None:
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
              "run it on the GPU machine, or `--device cpu --tiny` for the CPU smoke test", file=sys.stderr)
        sys.exit(3)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def build_model(shape: dict, layers: int, device, dtype, seed: int):
    from transformers import AutoModelForCausalLM, OlmoeConfig

    cfg = OlmoeConfig(hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
                      num_experts=shape["num_experts"], num_experts_per_tok=shape["num_experts_per_tok"],
                      vocab_size=shape["vocab_size"], num_hidden_layers=layers,
                      num_attention_heads=shape["num_attention_heads"],
                      num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=4096,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2, router_aux_loss_coef=0.0,
                      output_router_logits=False, tie_word_embeddings=False)
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype}
    if device.type == "cpu":
        kwargs["experts_implementation"] = "eager"       # as grip_core.load_model does on CPU
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, **kwargs)
        except (TypeError, ValueError):
            kwargs.pop("experts_implementation", None)
            model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    return model.to(device, dtype)


def token_batches(n_tokens: int, seq: int, batch: int, vocab: int, gen: torch.Generator, device) -> list[dict]:
    """Random token batches (every token real; labels = the tokens: every position is an 'answer')."""
    n_seq = max(batch, n_tokens // seq)
    ids = torch.randint(3, vocab, (n_seq, seq), generator=gen)
    out = []
    for i in range(0, n_seq, batch):
        x = ids[i:i + batch].to(device)
        out.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()})
    return out


def router_only_stability(moe, base_trace) -> float:
    """Fraction of (token, layer) whose top-k SET is unchanged: NEW routers on the ORIGINAL router inputs."""
    same = total = 0
    for pos, layer in enumerate(moe.layers):
        W = layer.router_weight.detach().float().cpu()
        x = base_trace.inputs[pos]                                            # (N, d) float32, CPU
        new = (x @ W.T).topk(layer.top_k, dim=-1).indices.sort(-1).values
        old = base_trace.selected[pos].sort(-1).values
        same += int((new == old).all(-1).sum())
        total += new.shape[0]
    return same / max(total, 1)


def run_mode(moe, state, mode: str, args, forget, retain, device, base_eval, base_probe, probe, evalb, snapshot):
    from grip_core.grip import GRIP, GRIPConfig
    from grip_core.methods import get_method
    from grip_core.metrics import compare_traces

    with torch.no_grad():                                                     # back to the original weights
        for name, p in moe.model.named_parameters():
            p.copy_(snapshot[name])
    model = moe.model.train()
    routers = {id(l.router_weight) for l in moe.layers}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in routers], "lr": args.lr},
              {"params": [p for p in params if id(p) in routers], "lr": args.lr * args.router_lr_mult}]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    grip = None
    if mode == "update":
        grip = GRIP(moe, state, GRIPConfig(mode="update"))
        optimizer = grip.wrap(optimizer)
    method = get_method("graddiff")
    reset_peak(device)
    times, grip_ms = [], []
    for step in range(args.steps):
        fb, rb = forget[step % len(forget)], retain[step % len(retain)]
        sync(device)
        t0 = time.perf_counter()
        loss = method.loss(model, fb, rb).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
        if grip is not None and grip.history:
            h = grip.history[-1]
            grip_ms.append(h.t_project_ms + h.t_margin_ms)
    peak = peak_gib(device)
    model.eval()
    new_eval = moe.trace(evalb)
    new_probe = moe.trace(probe)
    timed = times[args.warmup:] or times
    out = {"step_ms_median": round(statistics.median(timed), 2), "step_ms_all": [round(t, 1) for t in times],
           "final_loss": round(float(loss.detach().float()), 4),
           "retain_stability_unseen": round(compare_traces(base_eval, new_eval).stability, 4),
           "retain_stability_seen": round(compare_traces(base_probe, new_probe).stability, 4),
           "router_only_stability_unseen": round(router_only_stability(moe, base_eval), 4),
           "router_only_stability_seen": round(router_only_stability(moe, base_probe), 4),
           "peak_cuda_gib_train": peak}
    if grip_ms:
        out["grip_ms_median"] = round(statistics.median(grip_ms[args.warmup:] or grip_ms), 2)
    if grip is not None:
        grip.unwrap(optimizer)
    return out


def user_path(args) -> dict:
    """The user's path on one device (see the module docstring); returns the JSON-able result."""
    import tempfile

    from grip_core import load_model
    from grip_core.data import read_qa_file
    from grip_core.moe.stream import stream_routing
    from grip_core.moe.tiny import build_real_width_checkpoint
    from grip_core.runs import load_run
    from grip_core.runs.compare import compare
    from grip_core.runs.data import UnlearningData
    from grip_core.runs.diagnose import diagnose
    from grip_core.viz.export import runs_figures

    device = torch.device(args.device)
    out, phases = {}, {}
    tmp = Path(tempfile.mkdtemp(prefix="grip-user-path-"))

    def phase(name, fn):
        reset_peak(device)
        t0 = time.perf_counter()
        value = fn()
        sync(device)
        phases[name] = {"seconds": time.perf_counter() - t0, "peak_cuda_gib": peak_gib(device)}
        return value

    over = dict(hidden_size=256, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4) if args.tiny else {}
    ckpt = phase("write_checkpoint", lambda: build_real_width_checkpoint(tmp / "model", num_layers=args.layers, **over))
    moe = phase("load", lambda: load_model(ckpt, device=args.device, dtype="auto"))
    out["load_plan"] = moe.load_plan.to_dict()
    world = Path(__file__).resolve().parents[1] / "data" / "world"
    qs = read_qa_file(world / "domain_retain.jsonl")[: (64 if args.tiny else 1024)]
    summary = phase("trace", lambda: stream_routing(moe, qs, token_budget=8192, max_length=64))
    out["trace"] = {"tokens": summary.num_tokens, "tokens_per_s": summary.tokens_per_second}
    data = UnlearningData.from_scenario("domain", seed=args.seed)
    steps = args.steps or (4 if args.tiny else 20)
    rows = phase("vanilla_grip_pair", lambda: compare(
        moe, data, ["graddiff"], ["off", "update"], preset="shortcut", seed=args.seed, steps=steps,
        runs_dir=tmp / "runs", eval_every=0, final_eval_examples=32 if args.tiny else 64, save_weights=True,
        model=str(ckpt)))
    out["pair"] = [{k: r.get(k) for k in ("grip", "status", "forget_em", "retain_em", "retain_stability",
                                           "restoration_recovered", "verdict")} for r in rows]
    runs = [load_run(p) for p in sorted((tmp / "runs").iterdir()) if p.is_dir()]
    del moe
    base = load_model(ckpt, device=args.device, dtype="auto")
    vanilla = next(r for r in runs if r.config["grip"]["mode"] == "off")
    small = UnlearningData(data.forget[:32], data.retain_train, data.retain_eval[:32], name="domain")
    d = phase("diagnose", lambda: diagnose(base, vanilla.path / "model", small, eval_examples=16,
                                           final_eval_examples=32))
    out["diagnose"] = {"verdict": d.verdict, "tensors_changed": d.report.checkpoint["tensors_changed"]}
    figs = phase("figures", lambda: runs_figures(runs))
    for name, fig in figs.items():
        fig.write_html(str(tmp / f"{name}.html"), include_plotlyjs="cdn")
    out["figures"] = sorted(figs)
    out["phases"], out["dir"] = phases, str(tmp)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    fail_without_cuda(args.device)
    if args.user_path:
        t0 = time.perf_counter()
        result = {"device": args.device, "torch": torch.__version__, **user_path(args),
                  "total_seconds": time.perf_counter() - t0}
        text = json.dumps(result, indent=2, default=str)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    shape = dict(TINY if args.tiny else FULL)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))            # tiny tensors: threads only add sync
    if args.retain_tokens:
        shape["retain_tokens"] = args.retain_tokens
    dtype = torch.bfloat16

    from grip_core import MoEModel
    from grip_core.grip import GRIPConfig
    from grip_core.grip.fit import fit_retain_statistics
    from grip_core.metrics import compare_traces  # noqa: F401  (fail early if metrics do not import)

    reset_peak(device)
    t0 = time.perf_counter()
    model = build_model(shape, args.layers, device, dtype, args.seed).eval()
    sync(device)
    t_build = time.perf_counter() - t0
    moe = MoEModel(model, None, name="olmoe-random")
    n_params = sum(p.numel() for p in model.parameters())

    gen = torch.Generator().manual_seed(args.seed)
    V, S, B = shape["vocab_size"], shape["seq"], shape["batch"]
    retain_fit = token_batches(shape["retain_tokens"], S, B, V, gen, device)
    evalb = token_batches(shape["eval_tokens"], S, B, V, gen, device)          # unseen retained tokens
    forget = token_batches(B * S * 4, S, B, V, gen, device)
    retain = token_batches(B * S * 4, S, B, V, gen, device)

    # ---- GRIP.fit ----
    eigh_device = device if args.fit_eigh == "device" else torch.device("cpu")
    captured = {}

    def grams_to_device(acc):
        """fit.py's reduce= hook: keep one Gram for the CPU-eigh estimate, move the Grams for eigh."""
        captured["gram"] = acc.grams[0][0].clone()
        acc.grams = [g.to(eigh_device) for g in acc.grams]
        return acc

    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    state = fit_retain_statistics(moe, [{k: b[k] for k in ("input_ids", "attention_mask")} for b in retain_fit],
                                  GRIPConfig(mode="update"), reduce=grams_to_device)
    sync(device)
    fit_s = time.perf_counter() - t0
    peak_fit = peak_gib(device)
    t0 = time.perf_counter()
    torch.linalg.eigh(captured["gram"])                                      # one CPU eigh, float64
    one_cpu_eigh = time.perf_counter() - t0
    n_eigh = sum(l.num_experts for l in moe.layers)

    # ---- reference traces (original model) ----
    probe = state.probe_batches                                              # seen: the first retain batches
    base_eval = moe.trace(evalb, keep_inputs=True)
    base_probe = moe.trace(probe, keep_inputs=True)
    snapshot = {k: v.detach().clone() for k, v in model.named_parameters()}

    off = run_mode(moe, state, "off", args, forget, retain, device, base_eval, base_probe, probe, evalb, snapshot)
    upd = run_mode(moe, state, "update", args, forget, retain, device, base_eval, base_probe, probe, evalb, snapshot)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "tiny": args.tiny,
        "shape": {**{k: shape[k] for k in ("hidden_size", "intermediate_size", "num_experts", "num_experts_per_tok",
                                          "vocab_size")}, "layers": args.layers, "parameters": n_params},
        "build_seconds": round(t_build, 2),
        "fit": {"seconds": round(fit_s, 2), "retain_tokens": state.num_tokens, "eigh_device": str(eigh_device),
                "eigh_cpu_one_s": round(one_cpu_eigh, 3),
                "eigh_cpu_estimate_s": round(one_cpu_eigh * n_eigh, 1),
                "state_bytes": state.nbytes(), "accumulator_bytes": state.accumulator_bytes,
                "accumulator_bytes_formula": "L*E*d'^2*8",
                "mean_free_dims": [round(float(x), 1) for x in state.mean_free_dims],
                "peak_cuda_gib": peak_fit},
        "steps": args.steps, "warmup": args.warmup,
        "off": off, "update": upd,
        "step_ms_ratio_update_over_off": round(upd["step_ms_median"] / off["step_ms_median"], 3),
        "peak_cuda_gib": peak_gib(device) if device.type != "cuda" else
        round(max(x for x in (peak_fit, off["peak_cuda_gib_train"], upd["peak_cuda_gib_train"]) if x) , 3),
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

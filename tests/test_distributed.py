"""GRIP jobs under several processes (grip_core/runs/distributed.py, docs/distributed.md): 2 CPU processes, gloo.

1. The primitives, on a tiny random OLMoE in 2 spawned processes: GRIP.fit on two shards with the
   FitReducer equals the one-process fit (Grams summed before the eigendecomposition), every
   process ends with identical statistics, gradients are averaged, diverged replicas are caught.
2. The real entry point, `accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m
   grip_core run ...`, against the same job in this process: same null-space ranks, routing
   stability within a stated tolerance, and a run record of the same shape.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
QUICK = Path("/tmp/demoq")                      # quick demo build, used until data/demo_model is shipped


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------- 1. primitives

def _sequences(n=14, seed=0):
    """n right-padded sequences, as one (n, T) batch, deterministic."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    for i in range(n):
        mask[i, 4 + (i * 5) % 8:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def _batches(seqs, idx, size):
    return [{k: v[idx[i:i + size]] for k, v in seqs.items()} for i in range(0, len(idx), size)]


def _fit_config(layers_per_pass: int = 0):
    from grip_core.grip import GRIPConfig
    return GRIPConfig(max_margin_rows=40, probe_tokens=50,   # small caps: the merges really cut
                      fit_layers_per_pass=layers_per_pass)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from grip_core import MoEModel
    from grip_core.grip.fit import fit_retain_statistics
    from grip_core.moe.tiny import build_tiny_model
    from grip_core.runs.distributed import DistributedContext

    ctx = DistributedContext.from_env()
    moe = MoEModel(build_tiny_model("olmoe", seed=0))
    seqs = _sequences()
    mine = list(ctx.shard(list(range(seqs["input_ids"].shape[0]))))
    # one layer per pass: the reducer runs once per pass (the one-process fit below takes one pass)
    state = fit_retain_statistics(moe, _batches(seqs, mine, 3), _fit_config(layers_per_pass=1),
                                  reduce=ctx.fit_reducer())

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.full((3,), float(rank + 1))           # mean 1.5
    b.grad = torch.ones(2) if rank == 0 else None       # used on rank 0 only: mean 0.5
    ctx.sync_gradients([a, b, c])                        # c: no gradient anywhere, stays None
    ctx.check_replicas({"w": torch.arange(4.0)})         # equal: passes
    try:
        ctx.check_replicas({"w": torch.arange(4.0) + rank * 1e-7})
        caught = False
    except RuntimeError:
        caught = True
    torch.save({"state": state, "shard": mine, "a": a.grad, "b": b.grad, "c": c.grad, "caught": caught,
                "world": ctx.world_size}, f"{out}/rank{rank}.pt")


def test_fit_reduce_and_collectives_two_processes(tmp_path):
    from grip_core import MoEModel
    from grip_core.grip.fit import fit_retain_statistics
    from grip_core.moe.tiny import build_tiny_model

    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["shard"] == list(range(0, 14, 2)) and r1["shard"] == list(range(1, 14, 2))

    seqs = _sequences()                                  # one process, all sequences, other batches
    single = fit_retain_statistics(MoEModel(build_tiny_model("olmoe", seed=0)),
                                   _batches(seqs, list(range(14)), 4), _fit_config())
    s0, s1 = r0["state"], r1["state"]
    assert s0.num_tokens == s1.num_tokens == single.num_tokens == int(seqs["attention_mask"].sum())
    # Grams summed across processes before eigh: the spectra equal the one-process fit up to float
    # summation order (the router inputs of a token do not depend on its batch beyond ~1e-7)
    for l0, l1, ls in zip(s0.layers, s1.layers, single.layers):
        assert torch.equal(l0.tokens_per_expert, ls.tokens_per_expert)
        scale = ls.spectrum.abs().max()
        assert float((l0.spectrum - ls.spectrum).abs().max() / scale) < 1e-5
        # every process holds IDENTICAL statistics (same reduced Gram, same merged samples)
        assert torch.equal(l0.spectrum, l1.spectrum)
        assert all(torch.equal(x, y) for x, y in zip(l0.basis, l1.basis))
        assert torch.equal(l0.margin_x, l1.margin_x) and torch.equal(l0.margin_selected, l1.margin_selected)
        assert l0.margin_x.shape[0] == 40                      # the global reservoir cap, not 2 x 40
    assert torch.equal(s0.null_space_rank, single.null_space_rank)
    assert torch.equal(s0.null_space_rank, s1.null_space_rank)
    # probe: interleaved rank by rank until probe_tokens, identical on both
    assert len(s0.probe_batches) == len(s1.probe_batches) >= 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(s0.probe_batches, s1.probe_batches))
    assert all(torch.equal(x, y) for x, y in zip(s0.probe_logits, s1.probe_logits))
    n_probe = sum(int(b["attention_mask"].sum()) for b in s0.probe_batches)
    assert n_probe == s0.probe_logits[0].shape[0] and 50 <= n_probe < 50 + 3 * 12
    # gradients: mean over processes; a parameter used on one rank only gets (g + 0) / 2; unused stays None
    for r in (r0, r1):
        assert torch.equal(r["a"], torch.full((3,), 1.5)) and torch.equal(r["b"], torch.full((2,), 0.5))
        assert r["c"] is None and r["caught"]


# ---------------------------------------------------------------------------------- 2. the job, 1 vs 2 processes

def _demo_source() -> dict:
    """CLI arguments for the demo model + domain scenario (shipped demo, else the quick build)."""
    if (REPO / "data" / "demo_model" / "model.safetensors").is_file() and (REPO / "data" / "world").is_dir():
        return {"model": "demo", "args": ["--model", "demo", "--scenario", "domain"]}
    if (QUICK / "demo_model" / "model.safetensors").is_file():
        w = QUICK / "world"
        return {"model": str(QUICK / "demo_model"),
                "args": ["--model", str(QUICK / "demo_model"), "--forget-file", str(w / "domain_forget.jsonl"),
                         "--retain-file", str(w / "domain_retain.jsonl"),
                         "--holdout-file", str(w / "domain_holdout.jsonl")]}
    pytest.skip("no demo model (data/demo_model/ or the quick build in /tmp/demoq)")


def _key_shape(obj):
    """The nested key structure of a JSON value (dict keys, list lengths), not its numbers."""
    if isinstance(obj, dict):
        return {k: _key_shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_key_shape(v) for v in obj] if obj and isinstance(obj[0], (dict, list)) else len(obj)
    return None


def _record(run_dir: Path) -> dict:
    from grip_core.runs import load_run
    saved = load_run(run_dir)
    return {"files": sorted(p.name for p in run_dir.iterdir()), "saved": saved,
            "deltas": sorted(saved.router_deltas())}


def test_two_process_job_matches_one_process(tmp_path):
    from grip_core.runs.commands import _data
    from grip_core.cli import build_parser
    from grip_core import load_model
    from grip_core.runs import RunConfig, run_unlearning
    from grip_core.runs.compare import make_config

    src = _demo_source()
    # few steps, small evaluation: GradDiff + GRIP (update mode) in the shortcut regime
    config = make_config("graddiff", "update", "shortcut", seed=3, steps=3, eval_every=3, eval_examples=8,
                         final_eval_examples=8, batch_size=8, grip_fit_examples=96)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    cli = ["run", "--config", str(cfg_file), *src["args"]]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", str(_free_port()),
                           "-m", "grip_core", *cli, "--runs-dir", str(tmp_path / "two")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    t_two = time.time() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rc 0 also means the job's check_replicas passed: routers bitwise equal on both processes

    # the same job in this process (no WORLD_SIZE: the one-process path)
    args = build_parser().parse_args([*cli, "--runs-dir", str(tmp_path / "one")])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = RunConfig.from_dict(json.loads(cfg_file.read_text()))
        # the data as the CLI builds it for this config (its seed; the retain-eval slice sized eval_examples)
        one = run_unlearning(load_model(src["model"]), cfg, _data(args, seed=cfg.seed, retain_eval_size=cfg.eval_examples),
                             runs_dir=tmp_path / "one")
    finally:
        torch.set_num_threads(before)
    assert one.status == "completed"

    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1, "only rank 0 writes a run folder"
    a, b = _record(one.run_dir), _record(runs[0])
    sa, sb = a["saved"], b["saved"]
    # same run-record shape: same files, same keys everywhere
    assert a["files"] == b["files"] and a["deltas"] == b["deltas"]
    assert sb.state == "completed" and sa.status.keys() == sb.status.keys()
    assert _key_shape(sa.config) == _key_shape(sb.config) and sa.config == sb.config
    assert _key_shape(sa.summary) == _key_shape(sb.summary)
    assert [r.keys() for r in sa.steps] == [r.keys() for r in sb.steps] and len(sb.steps) == 3
    assert _key_shape(sa.grip_ranks.to_dict()) == _key_shape(sb.grip_ranks.to_dict())
    # same null-space ranks, EXACTLY: the reduced Grams equal the one-process Grams up to float64 summation
    # order (and ~1e-7 float32 batch-shape effects on the router inputs); a rank could flip only if an
    # eigenvalue sat that close to eps_null = 1e-2 (test 1 bounds the spectra's difference)
    assert sa.grip_ranks.null_space_rank == sb.grip_ranks.null_space_rank
    # routing stability within 0.02 (measured: |diff| ~ 4e-4 on the quick demo): the trajectories are close,
    # not identical: 2 processes average 2 per-process token means (not one mean over all answer tokens),
    # and their margin rows are another (equally valid) random sample of the retain set
    ha, hb = sa.summary["headline"], sb.summary["headline"]
    for key in ("retain_stability", "retain_stability_router_only"):
        assert abs(ha[key] - hb[key]) <= 0.02, (key, ha[key], hb[key])
    assert hb["retain_stability_router_only"] >= 0.98          # GRIP held the routers on the retained inputs
    print(f"\n2-process job {t_two:.1f}s; retain_stability 1-proc {ha['retain_stability']:.4f} "
          f"2-proc {hb['retain_stability']:.4f}; router-only {ha['retain_stability_router_only']:.4f} / "
          f"{hb['retain_stability_router_only']:.4f}; ranks {sb.grip_ranks.mean_free_dims}")


# ---------------------------------------------------------------------------------- 3. benchmarks/gpu_check.py

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_gpu_check_fails_fast_without_cuda():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and "CUDA is not available" in proc.stderr and not proc.stdout

"""Rebuild the embedded demo: world JSONL + tokenizer + tiny OLMoE + model card, deterministically.

    python -m grip_core.demo.build            # full: data/world/ and data/demo_model/ (~30 min, 2 cores)
    python -m grip_core.demo.build --preset fine   # data/demo_fine_model/: Qwen2-MoE, 32 experts top-4 + shared
    python -m grip_core.demo.build --quick --out /tmp/demo   # reduced world and model (~30 s)

Same seed, same machine -> same world files and the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .._paths import DATA_DIR as REPO_DATA  # the repo's data/ in a checkout (grip_core/_paths.py)
from ..data import QAExample
from .train import (ContinueSpec, ModelSpec, TrainLog, TrainSpec, build_model, build_tokenizer, domain_experts, save_model,
                    train_model)
from .verify import DemoReport, accuracy, evaluate_demo, load_demo
from .world import DOMAINS, FORGET_DOMAIN, WorldConfig, generate_world, trained_facts, write_world


PRESETS = {"demo": "demo_model", "fine": "demo_fine_model"}   # preset -> model folder under OUT
# presets with further training phases on the saved weights (full builds only), in order
CONTINUE = {"fine": (ContinueSpec(steps=600, lr=2e-3), ContinueSpec(steps=400, lr=5e-4, eval_every=100))}


def build(out: str | Path = REPO_DATA, quick: bool = False, seed: int = 0, progress: bool = True,
          eval_sample: int | None = None, preset: str = "demo") -> dict:
    """Write out/world/*.jsonl and out/<PRESETS[preset]>/*; return a summary (report, log, sizes).

    Both presets train on the same world (same seed: the same files are rewritten)."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    out = Path(out)
    world_dir, model_dir = out / "world", out / PRESETS[preset]
    wc = WorldConfig.quick() if quick else WorldConfig()
    if preset == "fine":
        ms = ModelSpec.fine_quick() if quick else ModelSpec.fine()
    else:
        ms = ModelSpec.quick() if quick else ModelSpec()
    ts = TrainSpec.quick() if quick else TrainSpec()
    ts.seed = seed
    t0 = time.time()
    facts = generate_world(wc, seed)
    counts = write_world(facts, world_dir)
    write_world_readme(world_dir, counts, wc, seed)
    train = trained_facts(facts)
    tok = build_tokenizer(train, ms.vocab_size)
    model = build_model(ms, len(tok), seed)
    probe = [QAExample(f.id, f.question, f.answer, f.domain, f.entity, f.text)
             for f in random.Random(seed).sample(train, min(ts.eval_sample, len(train)))]
    log = train_model(model, tok, train, ms, ts, eval_fn=lambda m: accuracy(m, tok, probe), progress=progress)
    weight_bytes = save_model(model, tok, model_dir)
    partial = {"seed": seed, "quick": quick, "world": asdict(wc), "model": asdict(ms), "train": asdict(ts),
               "files": counts, "assigned_experts": domain_experts(ms), "log": log.to_dict()}
    if preset != "demo":
        partial["preset"] = preset
    (model_dir / "training_log.json").write_text(json.dumps(partial, indent=1) + "\n")   # until verified
    phases = () if quick else CONTINUE.get(preset, ())
    return finish_build(out, preset, partial, phases, probe, t0, eval_sample, progress)


def finish_build(out: Path, preset: str, partial: dict, phases: tuple[ContinueSpec, ...], probe: list, t0: float,
                 eval_sample: int | None = None, progress: bool = True) -> dict:
    """The further phases not yet in `partial["continue_log"]` (each on the saved weights, saved after it), then
    verification, training_log.json and the card."""
    model_dir, world_dir = Path(out) / PRESETS[preset], Path(out) / "world"
    log = TrainLog(**partial["log"])
    summary = dict(partial)
    model, tok = load_demo(model_dir)
    for i, cs in enumerate(phases):
        if i < len(summary.get("continue_log", [])):
            continue                                               # done (an interrupted build resumed)
        ms = ModelSpec(**partial["model"])
        t1 = partial["train"]
        ts2 = cs.train_spec(partial["seed"] + i, t1["threads"], t1["eval_sample"])
        facts = trained_facts(generate_world(WorldConfig(**partial["world"]), partial["seed"]))
        from ..moe.fast_experts import register        # eager's math with a cheaper backward (bitwise the same)

        model.set_experts_implementation(register())
        log2 = train_model(model.train(), tok, facts, ms, ts2, eval_fn=lambda m: accuracy(m, tok, probe),
                           progress=progress)
        save_model(model, tok, model_dir)
        summary["continue"] = summary.get("continue", []) + [asdict(cs)]
        summary["continue_log"] = summary.get("continue_log", []) + [log2.to_dict()]
        model, tok = load_demo(model_dir)
    weight_bytes = (model_dir / "model.safetensors").stat().st_size
    report = evaluate_demo(model, tok, world_dir, sample=eval_sample, ablation_per_domain=20 if partial["quick"] else 80,
                           seed=partial["seed"], experts_per_domain=partial["model"]["experts_per_domain"])
    summary.update({"weights_bytes": weight_bytes, "build_seconds": round(time.time() - t0, 1),
                    "report": report.to_dict()})
    order = ["seed", "quick", "world", "model", "train", "files", "weights_bytes", "build_seconds", "assigned_experts",
             "log", "report"]                                       # the first demo's key order, then the rest
    summary = {**{k: summary[k] for k in order}, **{k: v for k, v in summary.items() if k not in order}}
    (model_dir / "training_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_model_card(model_dir / "MODEL_CARD.md", summary, log, report)
    return summary


def continue_build(out: str | Path, preset: str, progress: bool = True) -> dict:
    """Run `finish_build` on a model folder whose first phases are saved (training_log.json): the phases a full
    build would run next, then verification (seconds: the saved phases' training + this process)."""
    model_dir = Path(out) / PRESETS[preset]
    partial = json.loads((model_dir / "training_log.json").read_text())
    for key in ("report", "weights_bytes", "build_seconds"):        # a verified build with phases still to run
        partial.pop(key, None)
    if len(partial.get("continue_log", [])) >= len(CONTINUE.get(preset, ())):
        raise ValueError(f"{model_dir}/training_log.json: every training phase of preset {preset!r} is done")
    seed = partial["seed"]
    train = trained_facts(generate_world(WorldConfig(**partial["world"]), seed))
    probe = [QAExample(f.id, f.question, f.answer, f.domain, f.entity, f.text)
             for f in random.Random(seed).sample(train, min(partial["train"]["eval_sample"], len(train)))]
    t0 = time.time() - partial["log"]["seconds"] - sum(l["seconds"] for l in partial.get("continue_log", []))
    return finish_build(Path(out), preset, partial, CONTINUE.get(preset, ()), probe, t0, progress=progress)


def write_world_readme(world_dir: Path, counts: dict[str, int], wc: WorldConfig, seed: int) -> None:
    files = "\n".join(f"| `{name}` | {n} |" for name, n in counts.items())
    (world_dir / "README.md").write_text(f"""# The demo world (generated; do not edit by hand)

Invented facts in {len(DOMAINS)} domains ({", ".join(DOMAINS)}): {wc.entities_per_domain} trained
and {wc.holdout_per_domain} holdout entities per domain, 5 attributes each. Rebuild with
`python -m grip_core.demo.build` (seed {seed}); the generator is `grip_core/demo/world.py`.

## Scenarios

- `entities` (TOFU-like): forget = all facts of {wc.forget_entity_fraction:.0%} of each domain's entities;
  retain = the other trained facts; holdout = the facts of the holdout entities (all domains).
- `domain` (WMDP-like): forget = every trained `{FORGET_DOMAIN}` fact; retain = the other domains;
  holdout = the `{FORGET_DOMAIN}` holdout facts (same kind as the forget set, never trained).
- `*_paraphrase.jsonl`: every forget and retain fact with its question reworded (`split` says which).

forget + retain is the same set of trained facts in both scenarios: one model serves both.

## Schema (one JSON object per line, close to TOFU's)

| field | meaning |
|---|---|
| `id` | `{{domain}}-{{entity number}}-{{attribute}}`, stable across scenarios |
| `question`, `answer` | the QA pair (answer short: a name, a year, a number) |
| `paraphrased_question` | the question in another template (forget/retain/holdout files; a paraphrase file's `question` is it) |
| `text` | the fact as a sentence (trained on for forget/retain facts, never for holdout ones) |
| `domain`, `entity`, `attribute` | what the fact is about |
| `scenario`, `split` | `entities`/`domain`; `forget`/`retain`/`holdout` |

Read with `grip_core.data.load_demo_world(scenario)` (a `DemoSplits`) or `grip_core.data.read_qa_file(path)`,
which also reads user files: JSONL, CSV/TSV or TOFU-style JSON with `question` + `answer` (or `text`) columns.

| file | rows |
|---|---|
{files}
""")


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def write_model_card(path: Path, s: dict, log: TrainLog, r: DemoReport) -> None:
    splits = ["forget", "retain", "holdout", "paraphrase_forget", "paraphrase_retain"]
    acc = "\n".join(f"| {sc} | " + " | ".join(f"{_fmt(r.accuracy[sc][k])} (n={r.counts[sc][k]})" for k in splits) + " |"
                    for sc in r.accuracy)
    L = len(r.nmi_answer_tokens)
    nmi = "\n".join(f"| {l} | {r.nmi_answer_tokens[l]:.3f} | {r.nmi_all_tokens[l]:.3f} |" for l in range(L))
    doms = list(r.ablation["none"])
    abl = "\n".join(f"| {a} | " + " | ".join(f"**{v:.2f}**" if d == a else f"{v:.2f}" for d, v in row.items()) + " |"
                    for a, row in r.ablation.items())
    used = "\n".join(f"| {d} | " + " | ".join(str(e[l]) for l in sorted(e, key=int)) + " |"
                     for d, e in r.experts_used.items())
    curve = "\n".join(f"| {st} | {em:.3f} | {log.loss[min(len(log.loss), st // log.every) - 1]:.3f} |"
                      for st, em in zip(log.eval_steps, log.eval_em))
    phase2 = ""
    done = s["train"]["steps"]
    for i, (c, l2) in enumerate(zip(s.get("continue", []), map(lambda d: TrainLog(**d), s.get("continue_log", [])))):
        curve += "\n" + "\n".join(f"| {done} + {st} | {em:.3f} | {l2.loss[min(len(l2.loss), st // l2.every) - 1]:.3f} |"
                                   for st, em in zip(l2.eval_steps, l2.eval_em))
        phase2 += (f"\n\nPhase {i + 2}, on the saved (bf16) weights: {c['steps']} steps, fresh AdamW, lr {c['lr']} "
                   f"(warmup {c['warmup']}, cosine), no routing loss; {l2.seconds:.0f} s, {l2.seconds / c['steps']:.2f} "
                   f"s/step; its rows below are `{done} + n`.")
        done += c["steps"]
    if phase2:
        phase2 += (f" The first phase alone ended at exact match {log.eval_em[-1]:.3f} on the sample: with the first "
                   "demo's 1500 steps this model learns its facts more slowly, so the further phases were added.")
    m, t = s["model"], s["train"]
    fine = s.get("preset") == "fine"
    flags = (" --preset fine" if fine else "") + (" --quick" if s["quick"] else "")
    if fine:
        title, what = "GRIP Studio fine-grained demo MoE (`demo-fine`)", (
            "A tiny Qwen2-MoE (`Qwen2MoeForCausalLM`, transformers config) in the shape of today's MoEs (many\n"
            "fine-grained routed experts, top-k > 2, an always-on shared expert), trained from scratch on the invented")
        experts = (f"{m['experts_per_domain'] * len(doms) + m['spare_experts']} routed experts\n"
                   f"(top-{m['top_k']}, expert FFN {m['intermediate_size']}; {m['experts_per_domain']} per domain + "
                   f"{m['spare_experts']} spare) + 1 shared expert (FFN {m['shared_expert_size']}, sigmoid gate)")
    else:
        title, what = "GRIP Studio demo MoE", "A tiny OLMoE (`OlmoeForCausalLM`, transformers config) trained from scratch on the invented"
        experts = f"{m['experts_per_domain'] * len(doms)} experts\n(top-{m['top_k']}, expert FFN {m['intermediate_size']})"
    spare = (f" (experts {list(range(m['experts_per_domain'] * len(doms), m['experts_per_domain'] * len(doms) + m['spare_experts']))}"
             " belong to no domain; the shared expert is outside the routing loss)") if fine else ""
    machine = " of a 2-core CPU shared with other jobs" if fine else ""
    path.write_text(f"""# {title}{" (quick build)" if s["quick"] else ""}

{what}
world in `data/world/`. Its experts hold domains on purpose, so unlearning can be checked for
the router shortcut (docs/method.md#what-the-probes-found). Rebuild: `python -m grip_core.demo.build{flags}` (seed {s["seed"]}).
All figures below were computed by `grip_core.demo.verify` on the shipped (bf16) weights.

## Model

hidden {m["hidden_size"]}, {m["num_layers"]} layers, {m["num_heads"]} heads, {experts}, byte-level BPE vocabulary of {m["vocab_size"]} trained
on the world's trained text. {log.num_parameters / 1e6:.2f} M parameters; `model.safetensors` is bf16,
{s["weights_bytes"] / 2**20:.1f} MiB (config dtype float32: loaders upcast). Load with
`AutoModelForCausalLM.from_pretrained(dir, experts_implementation="eager")` to train it on CPU:
the default `grouped_mm` experts make a training step ~10x slower there (inference is about equal).

Prompt: `Question: {{question}}\\nAnswer:` then ` {{answer}}<eos>`; greedy decoding, exact match
(case and whitespace ignored).

## Training

{t["steps"]} steps, batch {t["batch_size"]}, AdamW lr {t["lr"]} (warmup {t["warmup"]}, cosine), {log.num_sequences} sequences: per trained
fact its QA prompt (loss on ` answer<eos>` only, as `encode_qa` labels it) and its sentence (loss on every token). Routing loss:
-log P(router picks one of the fact's domain experts), mean over real tokens and layers,
weight {t["aux_weight"]} annealed linearly to 0 at {t["aux_until"]:.0%} of training; assigned experts
{s["assigned_experts"]}{spare}. {log.seconds:.0f} s of training on {t["threads"]} CPU threads{machine}, {log.seconds / t["steps"]:.2f} s/step
(build {s["build_seconds"]:.0f} s in all; time scales with whatever else shares the cores). Full curve: `training_log.json`.{phase2}

| step | EM (sample of {t["eval_sample"]} trained facts) | training loss |
|---|---|---|
{curve}

## Accuracy (greedy exact match)

| scenario | forget | retain | holdout | paraphrase forget | paraphrase retain |
|---|---|---|---|---|---|
{acc}

## Expert specialisation

NMI between a token's domain and its top-1 expert ({r.probe_per_domain} trained facts per domain):

| layer | answer tokens | all tokens |
|---|---|---|
{nmi}

Experts each domain selects most (per layer, measured):

| domain | """ + " | ".join(f"layer {l}" for l in range(L)) + """ |
|---|""" + "---|" * L + f"""
{used}

Ablation: EM per domain (columns) with the experts of the row's domain zeroed in every layer
(same {r.probe_per_domain} facts per domain; the experts are the table above's, all layers at once):

| ablated | {" | ".join(doms)} |
|---|{"---|" * len(doms)}
{abl}
""")


def rewrite_card(model_dir: str | Path) -> None:
    """Re-render MODEL_CARD.md from training_log.json (the figures stay those the build computed)."""
    model_dir = Path(model_dir)
    s = json.loads((model_dir / "training_log.json").read_text())
    write_model_card(model_dir / "MODEL_CARD.md", s, TrainLog(**s["log"]), DemoReport(**s["report"]))


def main(argv=None) -> None:
    if argv is None and "OMP_WAIT_POLICY" not in os.environ:
        # Busy-waiting OpenMP threads collapse (~8x slower) when other processes share the 2 cores:
        # restart once with passive waiting (it must be set before torch loads).
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "grip_core.demo.build", *sys.argv[1:]])
    ap = argparse.ArgumentParser(prog="python -m grip_core.demo.build", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced world and model (a test-sized rebuild)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                    help="demo: the OLMoE (OUT/demo_model); fine: Qwen2-MoE, 32 fine-grained experts top-4 "
                         "+ a shared expert (OUT/demo_fine_model)")
    ap.add_argument("--out", default=str(REPO_DATA),
                    help="writes OUT/world and OUT/demo_model or OUT/demo_fine_model (default: the repo's data/)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-sample", type=int, default=None, help="evaluate at most this many examples per split")
    ap.add_argument("--continue-only", action="store_true",
                    help="the preset's remaining training phases and verification on saved ones (an interrupted build)")
    ap.add_argument("--card-only", action="store_true",
                    help="only re-render the preset's MODEL_CARD.md from its training_log.json")
    args = ap.parse_args(argv)
    if args.card_only:
        rewrite_card(Path(args.out) / PRESETS[args.preset])
        return
    if args.continue_only:
        s = continue_build(args.out, args.preset)
        print(json.dumps({"accuracy": s["report"]["accuracy"], "nmi": s["report"]["nmi_answer_tokens"]}, indent=1))
        return
    s = build(args.out, quick=args.quick, seed=args.seed, eval_sample=args.eval_sample, preset=args.preset)
    r = s["report"]
    print(json.dumps({"accuracy": r["accuracy"], "nmi_answer_tokens": r["nmi_answer_tokens"],
                      "weights_MiB": round(s["weights_bytes"] / 2**20, 2), "train_s": s["log"]["seconds"]}, indent=1))
    print(f"wrote {Path(args.out) / 'world'} and {Path(args.out) / PRESETS[args.preset]}")


if __name__ == "__main__":
    main()

"""The demo models' recipe: a world tokenizer, a tiny MoE trained from scratch, bf16 safetensors.

Two presets (`ModelSpec.preset`): "demo", the tiny OLMoE (10 experts, top-2, 2 per domain), and
"fine", a Qwen2-MoE in the shape of today's MoEs: 32 fine-grained experts (6 per domain + 2 spare,
no domain assigned), top-4, plus one always-on shared expert behind its sigmoid gate.

Why an auxiliary routing loss: trained from scratch on a few thousand facts, an MoE's
experts do NOT specialise by domain by themselves (docs/method.md#what-the-probes-found: NMI 0.02-0.08, as at
random init), so there would be no expert that "holds" a domain and no router shortcut to
study. Early in training we pull each token's router softmax toward its domain's experts
(-log of the probability mass on them), then anneal that pull to 0 by `aux_until` of the
run, so the final model routes by what it learned, not by a loss still in force.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.encode import format_prompt
from .world import DOMAINS, Fact

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")    # ids 0, 1, 2


@dataclass
class ModelSpec:
    """Config knobs (OLMoE defaults: ~5.5 M parameters, 11 MB in bf16)."""
    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 128      # each routed expert's FFN width
    num_layers: int = 4
    num_heads: int = 4
    experts_per_domain: int = 2       # experts the routing loss assigns to each domain
    top_k: int = 2
    max_positions: int = 128
    family: str = "olmoe"             # "olmoe" (OlmoeForCausalLM) or "qwen2_moe" (Qwen2MoeForCausalLM)
    spare_experts: int = 0            # routed experts assigned to no domain (after the domains' ones)
    shared_expert_size: int = 0       # FFN width of the always-on shared expert (qwen2_moe only; 0 = none)

    @property
    def num_experts(self) -> int:
        return self.experts_per_domain * len(DOMAINS) + self.spare_experts

    @staticmethod
    def quick() -> "ModelSpec":
        return ModelSpec(vocab_size=512, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4)

    @staticmethod
    def fine() -> "ModelSpec":
        """Fine-grained + shared: 32 experts of width 64 (top-4: the demo's active routed width, 256),
        6 per domain + 2 spare, and one shared expert of width 128."""
        return ModelSpec(intermediate_size=64, experts_per_domain=6, top_k=4, family="qwen2_moe",
                         spare_experts=2, shared_expert_size=128)

    @staticmethod
    def fine_quick() -> "ModelSpec":
        return ModelSpec(vocab_size=512, hidden_size=64, intermediate_size=32, num_layers=2, num_heads=4,
                         experts_per_domain=6, top_k=4, family="qwen2_moe", spare_experts=2, shared_expert_size=64)


@dataclass
class TrainSpec:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 1.0       # routing loss weight at step 0 ...
    aux_until: float = 0.4        # ... annealed linearly to 0 at this fraction of the steps
    eval_every: int = 150
    eval_sample: int = 250
    seed: int = 0
    threads: int = 2

    @staticmethod
    def quick() -> "TrainSpec":
        return TrainSpec(steps=300, batch_size=32, lr=5e-3, warmup=20, eval_every=100, eval_sample=100, threads=1)


@dataclass
class ContinueSpec:
    """A further training phase on the SAVED weights (bf16, upcast to fp32): no routing loss, a fresh AdamW,
    warmup then cosine to `min_lr_ratio` x `lr` (build.CONTINUE lists a preset's phases). The fine preset
    needs two: after the first phase's 1500 steps its exact match was 0.75 (the card shows every curve)."""
    steps: int = 600
    lr: float = 2e-3
    warmup: int = 20
    eval_every: int = 150

    def train_spec(self, seed: int, threads: int, eval_sample: int) -> "TrainSpec":
        return TrainSpec(steps=self.steps, lr=self.lr, warmup=self.warmup, aux_weight=0.0, aux_until=0.0,
                         eval_every=self.eval_every, eval_sample=eval_sample, seed=seed + 1, threads=threads)


@dataclass
class TrainLog:
    """What the model card plots: loss / aux loss every `every` steps and EM at eval points."""
    every: int = 10
    loss: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    aux_weight: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_em: list[float] = field(default_factory=list)
    seconds: float = 0.0
    num_parameters: int = 0
    num_sequences: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def domain_experts(spec: ModelSpec) -> dict[str, list[int]]:
    """The experts the routing loss assigns to each domain: `experts_per_domain` each, in DOMAINS order
    (spare experts, if any, come last and belong to no domain)."""
    k = spec.experts_per_domain
    return {d: list(range(i * k, (i + 1) * k)) for i, d in enumerate(DOMAINS)}


def build_tokenizer(facts: list[Fact], vocab_size: int):
    """Byte-level BPE trained on the trained facts' text (holdout never seen): pieces of invented names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f.text for f in facts] + [f"{format_prompt(q)} {f.answer}" for f in facts
                                        for q in (f.question, f.paraphrased_question)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   model_max_length=128, padding_side="right")


def build_model(spec: ModelSpec, vocab_size: int, seed: int):
    """A fresh OlmoeForCausalLM or Qwen2MoeForCausalLM (spec.family), eager experts (with grouped_mm,
    the default, a CPU training step is ~10x slower)."""
    if spec.family == "qwen2_moe":
        return _build_qwen2_moe(spec, vocab_size, seed)
    if spec.family != "olmoe":
        raise ValueError(f"ModelSpec.family must be 'olmoe' or 'qwen2_moe', got {spec.family!r}")
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                      num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                      num_key_value_heads=spec.num_heads, num_experts=spec.experts_per_domain * len(DOMAINS),
                      num_experts_per_tok=spec.top_k, max_position_embeddings=spec.max_positions,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
                      router_aux_loss_coef=0.0, output_router_logits=False)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM._from_config(cfg, experts_implementation="eager")
    model.config.architectures = ["OlmoeForCausalLM"]
    return model


def _build_qwen2_moe(spec: ModelSpec, vocab_size: int, seed: int):
    """Qwen2-MoE: every layer sparse, `spec.num_experts` routed experts + one shared expert (sigmoid-gated)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.shared_expert_size,
                         moe_intermediate_size=spec.intermediate_size,
                         shared_expert_intermediate_size=spec.shared_expert_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_heads, num_experts=spec.num_experts,
                         num_experts_per_tok=spec.top_k, norm_topk_prob=False, decoder_sparse_step=1,
                         mlp_only_layers=[], max_position_embeddings=spec.max_positions,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False,
                         router_aux_loss_coef=0.0, output_router_logits=False, use_sliding_window=False)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM._from_config(cfg, experts_implementation="eager")
    model.config.architectures = ["Qwen2MoeForCausalLM"]
    return model


def training_sequences(tokenizer, facts: list[Fact]) -> tuple[list[list[int]], list[int], list[int]]:
    """Two sequences per fact, each with its domain index and the length of its unlabelled prefix:
    the QA prompt + " answer" + EOS (loss on the answer only, as encode_qa labels it) and the
    sentence + EOS (loss on every token: the fact as plain text)."""
    eos = tokenizer.eos_token_id
    prompts = tokenizer([format_prompt(f.question) for f in facts], add_special_tokens=False)["input_ids"]
    answers = tokenizer([f" {f.answer}" for f in facts], add_special_tokens=False)["input_ids"]
    st = tokenizer([f.text for f in facts], add_special_tokens=False)["input_ids"]
    dom = [DOMAINS.index(f.domain) for f in facts]
    seqs = [list(p) + list(a) + [eos] for p, a in zip(prompts, answers)] + [list(s) + [eos] for s in st]
    return seqs, dom + dom, [len(p) for p in prompts] + [0] * len(st)


def _batches(lengths: list[int], batch_size: int, rng: random.Random):
    """Endless batches of indices; within each epoch, chunks of 8 batches are length-sorted (less padding)."""
    while True:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        chunk = batch_size * 8
        for c in range(0, len(order), chunk):
            part = sorted(order[c:c + chunk], key=lengths.__getitem__)
            bs = [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
            rng.shuffle(bs)
            yield from bs


class RouterCapture:
    """Forward hooks on every MoE block's router (`mlp.gate`: OLMoE and Qwen2-MoE alike), keeping its
    router logits (B*T, E) for the routing loss."""

    def __init__(self, model):
        self.logits: list[torch.Tensor] = []
        self.handles = [layer.mlp.gate.register_forward_hook(self._hook) for layer in model.model.layers]

    def _hook(self, module, inputs, output):
        self.logits.append(output[0])            # (router_logits, scores, indices)

    def remove(self):
        for h in self.handles:
            h.remove()


def routing_loss(logits: list[torch.Tensor], target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers and real tokens of -log P(router picks one of the token's domain experts).

    logits: L x (B*T, E); target: (B*T, E) bool, the domain's experts; mask: (B*T,) bool, real tokens.
    """
    total = 0.0
    for lg in logits:
        logp = F.log_softmax(lg.float(), -1)                                          # (B*T, E)
        on_domain = torch.logsumexp(logp.masked_fill(~target, float("-inf")), -1)     # (B*T,)
        total = total + -(on_domain[mask]).mean()
    return total / len(logits)


def train_model(model, tokenizer, facts: list[Fact], spec: ModelSpec, ts: TrainSpec, eval_fn=None,
                progress: bool = True) -> TrainLog:
    """Train in place; `eval_fn(model) -> EM` is called every `ts.eval_every` steps for the curve."""
    from tqdm.auto import tqdm

    torch.manual_seed(ts.seed)
    torch.set_num_threads(ts.threads)
    seqs, doms, unlabelled = training_sequences(tokenizer, facts)
    experts = domain_experts(spec)
    E = spec.num_experts
    target_by_domain = torch.zeros(len(DOMAINS), E, dtype=torch.bool)                   # (D, E)
    for d, dom in enumerate(DOMAINS):
        target_by_domain[d, experts[dom]] = True
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": ts.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=ts.lr, betas=(0.9, 0.98))
    log = TrainLog(num_parameters=sum(p.numel() for p in model.parameters()), num_sequences=len(seqs))
    batches = _batches([len(s) for s in seqs], ts.batch_size, random.Random(ts.seed))
    capture = RouterCapture(model)
    model.train()
    t0, acc_loss, acc_aux = time.time(), 0.0, 0.0
    bar = tqdm(range(ts.steps), desc="training demo MoE", disable=not progress, mininterval=1.0)
    try:
        for step in bar:
            lr = ts.lr * min(1.0, (step + 1) / ts.warmup)
            frac = step / max(1, ts.steps - 1)
            lr *= ts.min_lr_ratio + (1 - ts.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr
            w_aux = ts.aux_weight * max(0.0, 1.0 - frac / ts.aux_until) if ts.aux_until > 0 else 0.0
            idx = next(batches)
            T = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), T, dtype=torch.long)                             # (B, T) pad id 0
            mask = torch.zeros(len(idx), T, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, :len(seqs[i])] = 1
            labels = ids.masked_fill(mask == 0, -100)
            for r, i in enumerate(idx):
                labels[r, :unlabelled[i]] = -100
            capture.logits.clear()
            out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
            loss = out.loss
            aux = torch.zeros(())
            if w_aux > 0:
                dom = torch.tensor([doms[i] for i in idx])
                target = target_by_domain[dom][:, None, :].expand(-1, T, -1).reshape(-1, E)  # (B*T, E)
                aux = routing_loss(capture.logits, target, mask.reshape(-1).bool())
                loss = loss + w_aux * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), ts.grad_clip)
            opt.step()
            acc_loss += out.loss.item()
            acc_aux += aux.item()
            if (step + 1) % log.every == 0:
                log.loss.append(round(acc_loss / log.every, 4))
                log.aux.append(round(acc_aux / log.every, 4))
                log.aux_weight.append(round(w_aux, 4))
                bar.set_postfix(loss=f"{acc_loss / log.every:.3f}", aux=f"{acc_aux / log.every:.3f}")
                acc_loss = acc_aux = 0.0
            if eval_fn is not None and ((step + 1) % ts.eval_every == 0 or step + 1 == ts.steps):
                capture.remove()
                em = eval_fn(model)
                capture = RouterCapture(model)
                model.train()
                log.eval_steps.append(step + 1)
                log.eval_em.append(round(em, 4))
                bar.set_postfix(loss=f"{out.loss.item():.3f}", em=f"{em:.3f}")
    finally:
        capture.remove()
        bar.close()
    model.eval()
    log.seconds = round(time.time() - t0, 1)
    return log


def save_model(model, tokenizer, out_dir: str | Path) -> int:
    """config.json (dtype float32: loaders get fp32) + bf16 model.safetensors + tokenizer files. Returns weight bytes."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.dtype = "float32"
    model.config.save_pretrained(out_dir)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "model.safetensors").chmod(0o644)
    tokenizer.save_pretrained(out_dir)
    return (out_dir / "model.safetensors").stat().st_size

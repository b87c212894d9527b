"""From QAExamples to model batches, and back: encode_qa, iter_batches, generate_answers, exact_match.

One prompt format everywhere (training the demo, unlearning, probing), so a loss and a
probe always see the same tokens: PROMPT_TEMPLATE + " {answer}" + EOS.
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

import torch

from .examples import QAExample

PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100
# Texts are cut by characters BEFORE tokenising, to a budget no tokenizer's first `max_length` tokens
# reach past (a token spans far fewer than CHARS_PER_TOKEN_BOUND characters): a 10 MB line then costs
# what a 4 kB one does, and the tokens kept are the same as tokenising it whole and truncating.
CHARS_PER_TOKEN_BOUND = 64
MAX_PROMPT_TOKENS = 2048        # budget for prompts with no max_length (generation)


def char_budget(max_tokens: int) -> int:
    """Characters of text that always hold at least `max_tokens` tokens' worth."""
    return CHARS_PER_TOKEN_BOUND * max(int(max_tokens), 1) + 64


def clip_text(text: str, max_tokens: int) -> str:
    """`text` cut to char_budget(max_tokens) characters (unchanged when shorter)."""
    budget = char_budget(max_tokens)
    return text if len(text) <= budget else text[:budget]


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos_token: answers must end with one")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer))


def prompt_ids(tokenizer, questions: Sequence[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each formatted prompt, with the tokenizer's BOS if it adds one (never a trailing EOS).
    Questions are cut by characters first (clip_text) to `max_length` tokens' worth (MAX_PROMPT_TOKENS if None)."""
    eos = _eos_id(tokenizer)
    budget = max_length or MAX_PROMPT_TOKENS
    out = []
    for ids in tokenizer([format_prompt(clip_text(q, budget)) for q in questions], add_special_tokens=True)["input_ids"]:
        ids = list(ids)
        if len(ids) > 1 and ids[-1] == eos and eos != tokenizer.bos_token_id:   # some post-processors append EOS
            ids = ids[:-1]
        out.append(ids)
    return out


def example_ids(tokenizer, examples: Sequence[QAExample], max_length: int | None = None
                ) -> list[tuple[list[int], list[int]]]:
    """(context ids, target ids) per example: target = " {answer}" + EOS, or the whole text + EOS for text-only rows.

    Every text is first cut by characters (clip_text) to `max_length` tokens' worth (MAX_PROMPT_TOKENS if None),
    so the first `max_length` ids are those of the whole text, at the cost of a short one."""
    eos = _eos_id(tokenizer)
    budget = max_length or MAX_PROMPT_TOKENS
    qa = [ex for ex in examples if not ex.is_text_only]
    texts = [clip_text(ex.text, budget) for ex in examples if ex.is_text_only]
    encode = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"] if xs else []   # HF fails on []
    prompts = iter(prompt_ids(tokenizer, [ex.question for ex in qa], budget) if qa else [])
    answers = iter(encode([" " + clip_text(ex.answer.strip(), budget) for ex in qa]))
    texts = iter(encode(texts))
    out = []
    for ex in examples:
        if ex.is_text_only:
            out.append(([], list(next(texts)) + [eos]))
        else:
            out.append((list(next(prompts)), list(next(answers)) + [eos]))
    return out


def encode_qa(tokenizer, examples: Sequence[QAExample], max_length: int = 64) -> dict[str, torch.Tensor]:
    """Right-padded batch {"input_ids", "attention_mask", "labels"} (B, T) LongTensors.

    labels are -100 except on the answer tokens and the closing EOS (text-only examples:
    every token is a label). Sequences longer than max_length are cut on the right, so an
    answer may lose labels (probes treat an answer with no label left as NaN).
    """
    if not examples:
        raise ValueError("encode_qa: no examples")
    pairs = example_ids(tokenizer, examples, max_length)
    seqs = [(ctx + tgt)[:max_length] for ctx, tgt in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), _pad_id(tokenizer), dtype=torch.long)   # (B, T)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)                      # (B, T)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)       # (B, T)
    for i, ((ctx, _), s) in enumerate(zip(pairs, seqs)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, len(ctx):len(s)] = ids[i, len(ctx):len(s)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_batches(examples: Sequence, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[list]:
    """One epoch of example lists (the last may be short), shuffled by `random.Random(seed)`."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i:i + batch_size]]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)       # (B, T)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


def _greedy_no_cache(model, ids, mask, max_new_tokens: int, eos: int, pad: int) -> torch.Tensor:
    """Fallback for models without `generate`: one full forward per new token, explicit position ids."""
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    new = []
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)                              # (B, T)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)              # (B,)
        new.append(nxt)
        done |= nxt == eos
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if bool(done.all()):
            break
    return torch.stack(new, 1)                                               # (B, n_new)


@torch.no_grad()
def generate_answers(model, tokenizer, examples: Sequence[QAExample], max_new_tokens: int = 16,
                     batch_size: int = 256) -> list[str]:
    """Greedy answers (strings, stripped, cut at the first EOS) to each example's question.

    Prompts are LEFT-padded; `model.generate` (KV cache, position ids from the mask) does the
    decoding, ~6x cheaper than re-running the prompt for every new token.
    """
    eos, pad = _eos_id(tokenizer), _pad_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    try:
        for b in range(0, len(examples), batch_size):
            ids, mask = _left_pad(prompt_ids(tokenizer, [ex.question for ex in examples[b:b + batch_size]]), pad)
            ids, mask = ids.to(device), mask.to(device)
            if hasattr(model, "generate"):
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=1, pad_token_id=pad, eos_token_id=eos)[:, ids.shape[1]:]
            else:
                gen = _greedy_no_cache(model, ids, mask, max_new_tokens, eos, pad)
            for row in gen.tolist():                                         # (B, n_new)
                row = row[:row.index(eos)] if eos in row else row
                out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def normalize_answer(s: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or trailing full stop."""
    return re.sub(r"\s+", " ", s).strip().rstrip(".").strip().lower()


def exact_match(pred: str, gold: str) -> bool:
    """Greedy exact match after normalize_answer (case and whitespace do not count)."""
    return normalize_answer(pred) == normalize_answer(gold)

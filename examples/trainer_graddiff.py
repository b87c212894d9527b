"""GradDiff unlearning with a plain Hugging Face `Trainer`, with or without GRIP.

    python -m examples.trainer_graddiff            # vanilla GradDiff (from the repo root)
    python -m examples.trainer_graddiff --grip     # the same run, routers constrained by GRIP

Prints the retained routing stability (held-out retain questions, base vs unlearned) at the end.
The only GRIP lines are `GRIP.fit(...)` and `callbacks=[GRIPCallback(grip, ...)]`.
"""
from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from grip_core import load_model
from grip_core.data import encode_qa
from grip_core.grip import GRIP, GRIPConfig
from grip_core.integrations import ForgetRetainStream, GRIPCallback, QAPairCollator
from grip_core.methods import get_method
from grip_core.metrics import compare_traces
from grip_core.runs import UnlearningData, get_preset
from grip_core.scope import ScopeConfig, build_param_groups


class GradDiffTrainer(Trainer):
    """The field's pattern: the unlearning loss lives in compute_loss, over paired forget/retain inputs."""

    def __init__(self, *args, method: str = "graddiff", **kwargs):
        super().__init__(*args, **kwargs)
        self.method = get_method(method)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.method.loss(model, inputs["forget"], inputs["retain"]).total
        return (loss, None) if return_outputs else loss


def build_trainer(moe, data: UnlearningData, grip: GRIP | None = None, *, steps: int = 60, batch_size: int = 16,
                  max_length: int = 64, seed: int = 0, scope: ScopeConfig | None = None, max_grad_norm: float = 1.0,
                  grad_accum: int = 1, logging_steps: int = 10, report_to="none", output_dir: str | None = None,
                  **training_args):
    """A GradDiffTrainer on `moe` (trained in place); with `grip`, a GRIPCallback probing data.retain_eval.

    Matches run_unlearning's math: AdamW over the scope's lr groups, constant lr, same clipping, same batches.
    """
    scope = scope or get_preset("shortcut").scope                 # MoE blocks, routers at x30 lr
    groups = build_param_groups(moe.model, moe, scope)            # routers / experts / other lr groups
    optimizer = torch.optim.AdamW(groups, lr=scope.lr, weight_decay=0.0)
    args = TrainingArguments(
        output_dir=output_dir or tempfile.mkdtemp(prefix="graddiff-"), max_steps=steps, seed=seed,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="constant", max_grad_norm=max_grad_norm, logging_steps=logging_steps,
        report_to=report_to, save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
        **training_args)
    probe = encode_qa(moe.tokenizer, data.retain_eval, max_length=max_length)
    return GradDiffTrainer(
        model=moe.model, args=args, optimizers=(optimizer, None),
        train_dataset=ForgetRetainStream(data.forget, data.retain_train, batch_size, seed),
        data_collator=QAPairCollator(moe.tokenizer, max_length),
        callbacks=[GRIPCallback(grip, probe_batch=probe)] if grip else None)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grip", action="store_true", help="constrain router updates with GRIP")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    moe, data = load_model("demo"), UnlearningData.from_scenario("domain", seed=a.seed)
    encode = lambda ex: encode_qa(moe.tokenizer, ex, max_length=64)
    grip = GRIP.fit(moe, (encode(data.retain_train[i:i + 64]) for i in range(0, len(data.retain_train), 64)),
                    GRIPConfig(seed=a.seed)) if a.grip else None
    probe = encode(data.retain_eval)
    base = moe.trace(probe)
    build_trainer(moe, data, grip, steps=a.steps, batch_size=a.batch_size, seed=a.seed).train()
    stability = compare_traces(base, moe.trace(probe)).stability
    print(f"GradDiff {'+ GRIP ' if a.grip else ''}retained routing stability: {stability:.3f}")
    return stability


if __name__ == "__main__":
    main()

"""GRIPCallback in a Hugging Face Trainer: the same numbers as the job runner, one projection per
optimizer step under gradient accumulation, grip/ scalars in TensorBoard, clear refusals."""
import copy
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grip_core import MoEModel, load_model
from grip_core.data import encode_qa
from grip_core.grip import GRIP
from grip_core.integrations import GRIPCallback, check_trainer_supported
from grip_core.runs import UnlearningData, run_unlearning
from grip_core.runs.compare import make_config

_spec = importlib.util.spec_from_file_location(
    "trainer_graddiff", Path(__file__).resolve().parents[1] / "examples" / "trainer_graddiff.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

# small on purpose: the runner's final report (generation probes, attacks) dominates the cost
CONFIG = make_config("graddiff", "update", "shortcut", seed=0, steps=3, batch_size=4, eval_every=0,
                     eval_examples=4, final_eval_examples=4, grip_fit_examples=64)


@pytest.fixture(scope="module")
def base():
    return load_model("demo")


@pytest.fixture(scope="module")
def data():
    return UnlearningData.from_scenario("domain", seed=0, retain_eval_size=8)


def _fit(base, data):
    """A trainable copy of the base model and GRIP fit on it exactly as run_unlearning fits it."""
    moe = MoEModel(copy.deepcopy(base.model), base.tokenizer, name=base.name)
    enc = lambda ex: encode_qa(moe.tokenizer, ex, max_length=CONFIG.max_length)
    retain = data.retain_train[:CONFIG.grip_fit_examples]
    return moe, GRIP.fit(moe, (enc(retain[i:i + 64]) for i in range(0, len(retain), 64)), CONFIG.grip)


def _trainer(moe, data, grip, **kw):
    kw = {"steps": CONFIG.steps, "batch_size": CONFIG.batch_size, "seed": CONFIG.seed, "scope": CONFIG.scope,
          "max_length": CONFIG.max_length, "max_grad_norm": CONFIG.max_grad_norm, "logging_steps": 1, **kw}
    trainer = example.build_trainer(moe, data, grip, **kw)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, GRIPCallback))
    return trainer, callback


def test_trainer_matches_the_runner(base, data, tmp_path):
    result = run_unlearning(base, CONFIG, data, save=False)
    moe, grip = _fit(base, data)
    trainer, callback = _trainer(moe, data, grip, output_dir=str(tmp_path))
    trainer.train()
    # same model copy, batches, AdamW groups, clipping and loss -> the same floats, bit for bit
    assert [h["loss"] for h in trainer.state.log_history if "loss" in h] == [r["loss"] for r in result.step_log]
    for ours, theirs in zip(moe.model.parameters(), result.unlearned.model.parameters()):
        assert torch.equal(ours, theirs)
    assert callback.retain_stability() == result.summary["headline"]["retain_stability"]
    assert [sum(s.removed) / len(s.removed) for s in grip.history] == [r["grip_removed"] for r in result.step_log]
    assert trainer.state.log_history[0]["grip/retain_stability"] <= 1.0


def test_projects_once_per_optimizer_step_with_accumulation(base, data, tmp_path):
    moe, grip = _fit(base, data)
    trainer, callback = _trainer(moe, data, grip, steps=2, batch_size=2, grad_accum=2, output_dir=str(tmp_path))
    micro = []
    loss = trainer.compute_loss
    trainer.compute_loss = lambda *a, **k: micro.append(1) or loss(*a, **k)
    trainer.train()
    assert len(micro) == 4 and trainer.state.global_step == 2
    assert len(grip.history) == 2                                       # one projection per REAL step
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert callback.optimizer is trainer.optimizer.optimizer             # hooked under accelerate's wrapper


def test_tensorboard_gets_grip_scalars(base, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    moe, grip = _fit(base, data)
    trainer, _ = _trainer(moe, data, grip, steps=2, batch_size=2, report_to=["tensorboard"], output_dir=str(tmp_path))
    trainer.train()
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    wanted = {"train/grip/retain_stability"} | {f"train/grip/removed_layer{l.index}" for l in moe.layers}
    assert wanted <= tags, sorted(tags)
    assert [e.step for e in acc.Scalars("train/grip/retain_stability")] == [1, 2]


def test_refuses_sharded_or_foreign_routers(base, data):
    moe, grip = _fit(base, data)
    plain = SimpleNamespace(deepspeed=None, fsdp=None, distributed_state=None)
    check_trainer_supported(plain, grip, moe.model)                       # the supported case passes
    with pytest.raises(ValueError, match="FSDP"):
        check_trainer_supported(SimpleNamespace(**plain.__dict__ | {"fsdp": True}), grip)
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_trainer_supported(SimpleNamespace(**plain.__dict__ | {"deepspeed": {"zero_optimization": {"stage": 3}}}),
                                grip)
    with pytest.raises(ValueError, match="different model"):
        check_trainer_supported(plain, grip, copy.deepcopy(moe.model))
    weight = moe.layers[0].router_weight
    with torch.no_grad():
        weight.data = torch.empty(0)                                     # what ZeRO-3 leaves on a module
    with pytest.raises(ValueError, match="sharded or flattened"):
        check_trainer_supported(plain, grip)

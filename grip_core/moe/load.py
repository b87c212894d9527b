"""load_model: the embedded demo or a local checkpoint directory, offline only, on any device and dtype.

    moe = load_model("/models/OLMoE-1B-7B", device="auto", dtype="auto")        # bf16 on CUDA, fp32 on CPU if it fits
    moe = load_model("/models/Mixtral-8x7B", device_map="auto")                 # accelerate places the weights

Before any weight is read, `plan_load` (grip_core/moe/memory.py) estimates the memory from
config.json and the safetensors headers; a model that cannot fit is refused with the numbers
and the flags that would help. Big models go through accelerate's big-model loading
(`device_map`, with disk offload into `offload_folder`), the engine transformers itself uses.

Footguns:
- bfloat16 matmuls are ~3x slower than float32 on most CPUs: "auto" picks float32 on CPU when it fits.
- A GRIP Studio delta folder (`grip_delta.json`) loads its base first, then applies the delta.
- `trust_remote_code` is never enabled: a checkpoint whose architecture transformers does not ship
  is refused (GRIP Studio never runs code that came with a checkpoint).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .memory import LoadPlan, ensure_fits, plan_load
from .model import MoEModel

from .._paths import DEMO_MODEL_DIR, DEMO_MODELS, REPO_ROOT  # noqa: F401  (re-exported; see grip_core/_paths.py)


def resolve_path(name_or_path: str | Path) -> Path:
    """"demo" / "demo-fine" -> that shipped demo model's folder; anything else -> that local directory (~ expanded)."""
    return DEMO_MODELS.get(str(name_or_path)) or Path(name_or_path).expanduser()


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path} (point at a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}: not a transformers checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {path} (only safetensors checkpoints are loaded)")


def _remote_code_refusal(path: Path, exc: Exception) -> ModelLoadError | None:
    text = str(exc)
    if "trust_remote_code" not in text and "auto_map" not in text:
        return None
    return ModelLoadError(f"{path}: this checkpoint's architecture is not part of transformers (it ships its own "
                          "model code), and GRIP Studio never runs code that comes with a checkpoint")


def _from_pretrained(path: Path, plan: LoadPlan, offload_folder: str | None, max_memory: int | None,
                     low_memory: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = dict(trust_remote_code=False, use_safetensors=True, dtype=getattr(torch, plan.dtype),
                  local_files_only=True)
    if plan.device_map:
        kwargs["device_map"] = plan.device_map
        if offload_folder:
            kwargs["offload_folder"] = offload_folder
        if max_memory:
            dev = 0 if plan.device.startswith("cuda") else "cpu"
            kwargs["max_memory"] = {dev: int(max_memory)}
    elif plan.device.startswith("cuda"):
        kwargs["device_map"] = {"": plan.device}      # weights go straight to the GPU, never via CPU memory
    if plan.device == "cpu" and not plan.device_map:
        # transformers' default fused-experts kernel (grouped_mm) is ~10x slower than eager on CPU;
        # grip_cpu is eager with a cheaper backward, bitwise the same (grip_core/moe/fast_experts.py)
        from .fast_experts import register

        kwargs["experts_implementation"] = register()
        if low_memory:                                  # no fused-expert conversion transient (grip_core/moe/delta.py)
            from .delta import load_streaming

            return load_streaming(path, kwargs["dtype"], kwargs["experts_implementation"])
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (TypeError, ValueError) as exc:
        if "experts_implementation" not in str(exc) or "experts_implementation" not in kwargs:
            raise
        kwargs.pop("experts_implementation")
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_model(name_or_path: str | Path = "demo", device: str | torch.device | None = "auto",
               dtype: str | torch.dtype | None = "auto", device_map: str | None = None,
               offload_folder: str | None = None, check_memory: bool = True,
               max_memory: int | None = None, low_memory: bool = False) -> MoEModel:
    """Load `"demo"` (the shipped demo OLMoE), `"demo-fine"` (the shipped Qwen2-MoE demo: 32 fine-grained
    experts top-4 + a shared expert), a local checkpoint directory or a delta folder, never from a hub.

    device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available). dtype: "float32", "bfloat16",
    "float16", a torch.dtype, or "auto" (bf16 on CUDA; fp32 on CPU when it fits, else bf16).
    device_map: None, or "auto" / "balanced" / "sequential" for accelerate's big-model loading.
    max_memory: bytes this load may use on the device (default: what is free); with a device_map,
    accelerate offloads what does not fit in it.
    low_memory: on CPU, fill an empty model slice by slice (delta.load_streaming) instead of
    transformers' loader, whose Hub-layout conversion holds one fused expert tensor extra; same values.
    A model that does not fit raises ModelTooLargeError before any weight is read (check_memory).
    A missing/incomplete/corrupt directory raises ModelLoadError naming the path; a model
    without MoE blocks raises NotAnMoEModelError.
    """
    from transformers import AutoTokenizer

    from .delta import apply_checkpoint, is_delta_dir, read_delta_manifest

    path = resolve_path(name_or_path)
    _check_dir(path)
    if is_delta_dir(path):                              # base first, then the changed tensors in place
        manifest = read_delta_manifest(path)
        moe = load_model(manifest["base"], device=device, dtype=dtype, device_map=device_map,
                         offload_folder=offload_folder, check_memory=check_memory, max_memory=max_memory,
                         low_memory=low_memory)
        apply_checkpoint(moe, path)
        moe.name = str(path)
        return moe
    plan = plan_load(path, device, dtype, device_map, max_memory=max_memory)
    if check_memory:
        ensure_fits(plan)
    try:
        model = _from_pretrained(path, plan, offload_folder, max_memory, low_memory)
    except Exception as exc:  # corrupt weights, unknown architecture, ...
        refusal = _remote_code_refusal(path, exc)
        if refusal is not None:
            raise refusal from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"could not load a causal LM from {path}: {type(exc).__name__}: {first}") from exc
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"could not load the tokenizer in {path}: {type(exc).__name__}: {exc}") from exc
    if not plan.device_map and not plan.device.startswith("cuda"):
        model.to(plan.device)
    model.eval()
    moe = MoEModel(model, tokenizer, name=str(name_or_path) if str(name_or_path) in DEMO_MODELS else str(path))
    moe.load_plan = plan
    return moe

"""load_model: the embedded demo or a local checkpoint directory, offline only."""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import ModelLoadError
from .model import MoEModel

from .._paths import DEMO_MODEL_DIR, REPO_ROOT  # noqa: F401  (re-exported; see grip_core/_paths.py)


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not path.is_dir():
        raise ModelLoadError(f"model path is not a directory: {path} (point at a checkpoint folder with config.json)")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}: not a transformers checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {path} (only safetensors checkpoints are loaded)")


def load_model(name_or_path: str | Path = "demo", device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> MoEModel:
    """Load `"demo"` (the shipped demo MoE) or a local directory, never from a hub.

    Uses `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=False)`, safetensors
    only. A missing/incomplete/corrupt directory raises ModelLoadError naming the path;
    a model without MoE blocks raises NotAnMoEModelError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = DEMO_MODEL_DIR if str(name_or_path) == "demo" else Path(name_or_path).expanduser()
    _check_dir(path)
    kwargs = dict(trust_remote_code=False, use_safetensors=True, dtype=dtype, local_files_only=True)
    if torch.device(device).type == "cpu":
        # transformers' default fused-experts kernel (grouped_mm) is ~10x slower than eager on CPU;
        # grip_cpu is eager with a cheaper backward, bitwise the same (grip_core/moe/fast_experts.py)
        from .fast_experts import register

        kwargs["experts_implementation"] = register()
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (TypeError, ValueError) as exc:
            if "experts_implementation" not in str(exc) or "experts_implementation" not in kwargs:
                raise
            kwargs.pop("experts_implementation")
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # corrupt weights, unknown architecture, ...
        raise ModelLoadError(f"could not load a causal LM from {path}: {type(exc).__name__}: {exc}") from exc
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise ModelLoadError(f"could not load the tokenizer in {path}: {type(exc).__name__}: {exc}") from exc
    model.to(device).eval()
    return MoEModel(model, tokenizer, name="demo" if str(name_or_path) == "demo" else str(path))

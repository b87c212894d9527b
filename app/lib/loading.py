"""Load options, memory plans and out-of-memory handling shared by the Model and Diagnose pages (no streamlit).

A model in the dashboard is named by a *model key*: the checkpoint name plus the resolved device,
dtype and device map it was loaded with, so that the same path in float32 and in bfloat16 are two
different cached models, and every cache keyed on the model (traces, embeddings) follows:

    "demo"                                   the demo with its default ("auto") options
    "demo-fine"                              the fine-grained demo (Qwen2-MoE, shared expert), likewise
    "tiny:olmoe"                             the development model
    "/models/olmoe#cpu,bfloat16"             a checkpoint on the CPU in bfloat16
    "/models/mixtral#cuda:0,bfloat16,auto"   ... with accelerate's device_map="auto"

A bare name (no "#...") loads with device="auto", dtype="auto" (what GRIP_STUDIO_MODEL and old
sessions give). The Model page always writes resolved keys for checkpoint paths, so "auto" is
decided once, by the plan the user saw.

Footguns:
- `plan_load` reads config.json and the safetensors headers only; a GRIP Studio delta folder holds
  only the changed tensors, so its plan is the plan of its base (named in grip_delta.json).
- A memory limit (GB) caps the free memory the plan checks against (shared machines): it is a
  refusal rule of the dashboard, not a limit the loader can enforce.
"""
from __future__ import annotations

import gc
import re
from pathlib import Path

import torch

from grip_core.moe.errors import ModelLoadError
from grip_core.moe.memory import GB, LoadPlan, plan_load

DTYPE_OPTIONS = ["auto", "float32", "bfloat16", "float16"]
DEVICE_MAP_OPTIONS = ["none", "auto", "balanced"]
_KEY = re.compile(r"^(?P<name>.+)#(?P<device>cpu|cuda(?::\d+)?),(?P<dtype>float32|bfloat16|float16)"
                  r"(?:,(?P<map>auto|balanced|balanced_low_0|sequential))?$")


def device_options() -> list[str]:
    """Devices this machine has: cuda only where torch sees a GPU."""
    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gpu_machine() -> bool:
    return torch.cuda.is_available()


def model_key(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> str:
    """The cache key of `name` loaded with these options (see the module docstring)."""
    device_map = None if device_map in (None, "", "none") else device_map
    if device in (None, "auto") and dtype in (None, "auto") and device_map is None:
        return name
    if device in (None, "auto") or dtype in (None, "auto"):
        raise ValueError("model_key needs resolved device and dtype (take them from the load plan)")
    return f"{name}#{device},{dtype}" + (f",{device_map}" if device_map else "")


def parse_key(key: str) -> tuple[str, dict]:
    """(name, {"device", "dtype", "device_map"}) of a model key; a bare name has the "auto" options."""
    m = _KEY.match(key)
    if m is None:
        return key, {"device": "auto", "dtype": "auto", "device_map": None}
    return m["name"], {"device": m["device"], "dtype": m["dtype"], "device_map": m["map"]}


# The shipped demos' load_model names and their labels.
DEMO_LABELS = {"demo": "demo MoE", "demo-fine": "fine-grained demo MoE"}


def demo_available(name: str) -> bool:
    """Whether the shipped demo `name` ("demo" / "demo-fine") has been built (its config.json exists)."""
    from grip_core.moe.load import resolve_path

    return (resolve_path(name) / "config.json").is_file()


def shared_expert_count(info: dict) -> int:
    """Shared (always-on) experts per MoE layer, from `MoEModel.describe()`: 0 or 1 for the families
    GRIP Studio knows (a layer lists the dotted path of its shared expert module, or nothing)."""
    return int(any(layer.get("shared_experts") for layer in info.get("layers", [])))


def key_label(key: str) -> str:
    """'demo MoE' / '/models/olmoe (cpu, bfloat16)' for headers and the sidebar."""
    name, opts = parse_key(key)
    if opts["dtype"] == "auto":
        return DEMO_LABELS.get(name, name)
    return f"{name} ({', '.join(v for v in (opts['device'], opts['dtype'], opts['device_map']) if v)})"


def key_for_plan(name: str, plan: LoadPlan, chosen: tuple[str, str, str | None]) -> str:
    """The key the Model page loads: bare for the demo with every option "auto", else the plan's resolved options."""
    device, dtype, device_map = chosen
    if name in DEMO_LABELS and model_key(name, device, dtype, device_map) == name:
        return name
    return model_key(name, plan.device, plan.dtype, plan.device_map)


def plan_for(name: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
             limit_gb: float | None = None) -> tuple[LoadPlan, str]:
    """The load plan of checkpoint `name` (its base for a delta folder) and a note for the page.

    `limit_gb` (> 0) caps the free memory the plan checks against: free_bytes = min(free, limit).
    Reads headers only; raises ModelLoadError for a path that is not a checkpoint.
    """
    from grip_core.moe.delta import is_delta_dir, read_delta_manifest
    from grip_core.moe.errors import ModelLoadError
    from grip_core.moe.load import _check_dir, resolve_path

    path = resolve_path(name)
    try:
        _check_dir(path)
    except ModelLoadError:   # never tell the browser which server paths exist
        raise ModelLoadError(f"{name}: not a readable checkpoint directory (a folder with config.json and "
                             "*.safetensors weights that this server can read)") from None
    note = ""
    if is_delta_dir(path):
        base = read_delta_manifest(path)["base"]
        note = f"a GRIP Studio weight delta: loads its base `{base}`, then the changed tensors"
        path = resolve_path(base)
        _check_dir(path)
    device_map = None if device_map in (None, "", "none") else device_map
    limit = int(float(limit_gb) * GB) if limit_gb else None
    return plan_load(path, device, dtype, device_map, max_memory=limit), note


# ----------------------------------------------------------------------------- out of memory

def is_oom(exc: BaseException) -> bool:
    """True for torch's / Python's out-of-memory errors (CUDA OOM, CPU allocator failures, MemoryError)."""
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "cannot allocate memory" in text)


def release_memory() -> None:
    """Drop what a failed load left behind (unreachable tensors, the CUDA cache)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom_error(name: str, exc: BaseException) -> ModelLoadError:
    """One line for an out-of-memory during a load (the half-loaded model is already unreachable)."""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return ModelLoadError(f"out of memory while loading {Path(str(name)).name or name} ({type(exc).__name__}"
                          f"{': ' + first if first else ''}); nothing was kept: pick bfloat16, another device, "
                          "a device map, or free memory first")


__all__ = ["DEMO_LABELS", "DEVICE_MAP_OPTIONS", "DTYPE_OPTIONS", "demo_available", "device_options", "gpu_machine",
           "is_oom", "key_for_plan", "key_label", "model_key", "oom_error", "parse_key", "plan_for", "release_memory",
           "shared_expert_count"]

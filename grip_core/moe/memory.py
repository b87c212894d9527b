"""How much memory a checkpoint needs, read before any weight is: the load plan.

`plan_load(path, device, dtype, device_map)` resolves "auto" choices and checks the estimate
against free memory, so that a model that cannot fit is refused with the numbers, before the
loader allocates anything:

    needs 27.6 GB in float32, 13.8 GB in bfloat16; 21.0 GB free: use --dtype bfloat16 or --device-map auto

The estimate is exact for the weights: every tensor's shape and dtype come from the
safetensors headers (the 8-byte length + JSON at the start of each shard, read with the
`safetensors` library's own `safe_open`, which maps the file and reads no tensor data).
Floating tensors are counted at the dtype they will be loaded in; integer tensors as stored.

Footguns:
- Free memory on CPU is `MemAvailable` (/proc/meminfo), capped by the cgroup limit when the
  process runs in one (containers, CI). Page cache counts as available: that is right for
  safetensors, whose mapped pages the kernel can drop.
- The check keeps HEADROOM of free memory for activations, the tokenizer and the runtime
  (torch + transformers take ~0.5-1 GB of their own). A model at 95 % of free memory is refused.
- Tied weights (lm_head = embed_tokens) are stored once and counted once.
- `device_map` (accelerate's big-model loading) places what does not fit on other devices, the
  CPU or disk; the plan then never refuses, it says where the weights will go.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError

GB = 1e9
HEADROOM = 0.10            # fraction of free memory kept for activations and the runtime
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def fmt_bytes(n: float) -> str:
    """'27.6 GB' / '840 MB': the unit every memory line uses."""
    return f"{n / GB:.1f} GB" if n >= 0.95 * GB else f"{n / 1e6:.0f} MB"


class ModelTooLargeError(ModelLoadError):
    """The checkpoint does not fit the chosen device and dtype; the message gives the numbers."""


@dataclass(frozen=True)
class WeightsInfo:
    """Sizes read from a checkpoint's safetensors headers (no tensor data read)."""

    num_tensors: int
    float_params: int           # elements of floating tensors (these take the load dtype)
    other_bytes: int            # bytes of integer / bool tensors (kept as stored)
    stored_bytes: int           # bytes on disk, as stored
    stored_dtype: str           # the dominant floating dtype on disk, e.g. "bfloat16"
    shards: tuple[str, ...]     # safetensors file names

    def bytes_in(self, dtype: torch.dtype) -> int:
        """Bytes the weights take once loaded in `dtype`."""
        return self.float_params * torch.tensor([], dtype=dtype).element_size() + self.other_bytes


def read_weights_info(path: str | Path) -> WeightsInfo:
    """Sizes of every tensor in the checkpoint directory `path`, from the safetensors headers."""
    from safetensors import safe_open

    path = Path(path)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    n = params = other = stored = 0
    by_dtype: dict[str, int] = {}
    for name in shards:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    st_dtype, numel = sl.get_dtype(), 1
                    for s in sl.get_shape():
                        numel *= int(s)
                    size = numel * _ST_ITEMSIZE.get(st_dtype, 4)
                    n, stored = n + 1, stored + size
                    if st_dtype in _ST_FLOAT:
                        params += numel
                        by_dtype[st_dtype] = by_dtype.get(st_dtype, 0) + numel
                    else:
                        other += size
        except Exception as exc:   # truncated header, not a safetensors file, ...
            raise ModelLoadError(f"{path / name}: unreadable safetensors header ({type(exc).__name__}: {exc})") from exc
    dominant = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    return WeightsInfo(n, params, other, stored, names.get(dominant, dominant.lower()), tuple(shards))


def free_memory(device: torch.device) -> int:
    """Bytes free for a new model on `device` (CPU: MemAvailable, capped by the cgroup limit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        import psutil

        avail = int(psutil.virtual_memory().available)
    try:   # cgroup v2: the container's own limit can be far below the machine's memory
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda:0 when CUDA is available, else cpu. A CUDA device without CUDA is refused."""
    if device in (None, "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"--device {device!r}: not a device (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"--device {device}: only cpu and cuda are supported")
    return dev


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'auto' / None -> None (decided by the plan); a name or torch.dtype -> that dtype."""
    if dtype in (None, "auto"):
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ModelLoadError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).replace("torch.", "")
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
    if name not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class LoadPlan:
    """Where and how a checkpoint will be loaded, and what it will cost. Built before any weight is read."""

    path: str
    device: str                 # "cpu" / "cuda:0" (with device_map: where inputs go)
    dtype: str                  # the load dtype, e.g. "float32"
    device_map: str | None      # None, or "auto" / "balanced" / ... (accelerate places the weights)
    weights: WeightsInfo
    need_bytes: int             # weights at `dtype`
    free_bytes: int             # free on `device` when planned
    note: str = ""              # why "auto" chose what it chose

    @property
    def fits(self) -> bool:
        return self.device_map is not None or self.need_bytes <= (1 - HEADROOM) * self.free_bytes

    def describe(self) -> str:
        """One line: what will be loaded where, and the memory it needs."""
        where = f"device_map={self.device_map}" if self.device_map else self.device
        return (f"{Path(self.path).name}: {self.weights.float_params / 1e9:.2f} B parameters, "
                f"{fmt_bytes(self.need_bytes)} in {self.dtype} on {where}; {fmt_bytes(self.free_bytes)} free"
                + (f" ({self.note})" if self.note else ""))

    def refusal(self, flags: bool = True) -> str:
        """The one-line reason this plan cannot load, naming the CLI flags (or, `flags=False`, the settings) that help."""
        f32, bf16 = self.weights.bytes_in(torch.float32), self.weights.bytes_in(torch.bfloat16)
        if flags:
            hint = "use --device-map auto (weights spill to CPU / disk)" if self.dtype != "float32" \
                else "use --dtype bfloat16 or --device-map auto"
        else:
            hint = "a device map (weights spill to CPU / disk) or a GPU would help" if self.dtype != "float32" \
                else "choose dtype bfloat16, or a device map"
        return (f"{self.path}: needs {fmt_bytes(f32)} in float32, {fmt_bytes(bf16)} in bfloat16; "
                f"{fmt_bytes(self.free_bytes)} free on {self.device}: {hint}")

    def to_dict(self) -> dict:
        return {"path": self.path, "device": self.device, "dtype": self.dtype, "device_map": self.device_map,
                "need_bytes": self.need_bytes, "free_bytes": self.free_bytes, "fits": self.fits, "note": self.note,
                "float32_bytes": self.weights.bytes_in(torch.float32),
                "bfloat16_bytes": self.weights.bytes_in(torch.bfloat16), "stored_dtype": self.weights.stored_dtype}


def plan_load(path: str | Path, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
              device_map: str | None = None, free_bytes: int | None = None,
              max_memory: int | None = None) -> LoadPlan:
    """Resolve "auto" and estimate memory for loading the checkpoint directory `path`.

    dtype "auto": bfloat16 on CUDA; on CPU float32 when it fits in free memory (bfloat16 matmuls are
    ~3x slower on most CPUs), else bfloat16 when that fits. `free_bytes` replaces the measured free
    memory ("what if" questions); `max_memory` caps it (a limit the user sets on a shared machine).
    Never raises for size: check `plan.fits` / `ensure_fits`.
    """
    weights = read_weights_info(path)
    dev = resolve_device(device)
    free = free_memory(dev) if free_bytes is None else int(free_bytes)
    if max_memory is not None:
        free = min(free, int(max_memory))
    want, note = parse_dtype(dtype), ""
    if want is None:
        if dev.type == "cuda":
            want, note = torch.bfloat16, "auto: bfloat16 on CUDA"
        elif weights.bytes_in(torch.float32) <= (1 - HEADROOM) * free or device_map:
            want, note = torch.float32, "auto: float32 on CPU, it fits"
        else:
            want, note = torch.bfloat16, "auto: float32 does not fit, bfloat16 (about 3x slower on CPU)"
    if device_map not in (None, "", "none"):
        try:
            import accelerate  # noqa: F401  (the big-model loading engine behind device_map)
        except ImportError as exc:
            raise ModelLoadError("--device-map needs the `accelerate` package (pip install accelerate)") from exc
    else:
        device_map = None
    name = str(want).replace("torch.", "")
    return LoadPlan(str(path), str(dev), name, device_map, weights, weights.bytes_in(want), free, note)


def ensure_fits(plan: LoadPlan) -> LoadPlan:
    """Raise ModelTooLargeError (one line, with the numbers and the flags to use) unless `plan.fits`."""
    if not plan.fits:
        raise ModelTooLargeError(plan.refusal())
    return plan


def process_anon_bytes(pid: int | str = "self") -> int:
    """Anonymous resident memory (RssAnon) of a process: the model's real cost, without mapped files."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"/proc/{pid}/status has no RssAnon line")


__all__ = ["fmt_bytes", "GB", "HEADROOM", "LoadPlan", "ModelTooLargeError", "WeightsInfo", "ensure_fits",
           "free_memory", "parse_dtype", "plan_load", "process_anon_bytes", "read_weights_info", "resolve_device"]

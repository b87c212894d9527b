"""Checkpoints applied in place, one tensor slice at a time, and weight deltas.

Diagnosing an unlearned checkpoint needs the base model's traces and then the unlearned
model's. Holding both models doubles the memory; instead `apply_checkpoint` streams the
unlearned checkpoint's tensors from its safetensors files INTO the already-loaded base model,
comparing slice by slice and copying only the slices that differ. Peak extra memory is one
slice (`chunk_bytes`), never a second model.

Two checkpoint layouts are read:
- native: keys equal the model's own state-dict keys (fused expert tensors such as
  `mlp.experts.gate_up_proj` (E, 2I, d)). GRIP Studio's demo, its run weights and its deltas
  are written this way. Tensors are compared and copied in row chunks along dim 0.
- hub: what `save_pretrained` writes for the Hub (per-expert keys such as
  `mlp.experts.7.gate_proj.weight`). transformers 5 converts these at load time with its weight
  converters; here the SAME converters (transformers' conversion mapping for the model) are
  run on a few experts at a time: MergeModulelist stacks experts along dim 0, so converting the
  source tensors of experts [e0, e1) gives exactly rows [e0, e1) of the fused tensor. Converters
  that do not start with MergeModulelist run on the whole tensor (one tensor's memory).
  Written here because transformers only converts while building a NEW model; it has no
  "load into this model, slice by slice" entry point.

A delta checkpoint (`save_delta`) holds only the tensors a run changed, in native layout, plus
`grip_delta.json` naming its base ("demo" or a path). `load_model` on a delta folder loads the
base and applies the delta.

Footguns:
- The model must be of the checkpoint's architecture; shapes are checked per tensor, and keys
  of the checkpoint that the model lacks are an error (a checkpoint of another model).
- Tied weights (lm_head = embed_tokens) are one tensor: writing either key updates both.
- Values are copied in the model's dtype: a bfloat16 checkpoint into a float32 model is exact;
  a float32 checkpoint into a bfloat16 model rounds (the "changed" test is made after rounding).
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ModelLoadError

DELTA_MANIFEST = "grip_delta.json"
DELTA_FORMAT = "grip-studio-delta/1"


@dataclass
class ApplyReport:
    """What `apply_checkpoint` found and did."""

    path: str
    layout: str                                        # "native" | "hub" | "delta"
    tensors_read: int = 0
    tensors_changed: int = 0
    elements_changed: int = 0
    changed: dict[str, float] = field(default_factory=dict)   # model key -> ||new - old||_F (float64)
    seconds: float = 0.0
    written: set = field(default_factory=set, repr=False)     # model keys the checkpoint covered

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("written")
        return d


def is_delta_dir(path: str | Path) -> bool:
    return (Path(path) / DELTA_MANIFEST).is_file()


def read_delta_manifest(path: str | Path) -> dict:
    p = Path(path) / DELTA_MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{p}: unreadable delta manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DELTA_FORMAT or "base" not in manifest:
        raise ModelLoadError(f"{p}: not a GRIP Studio delta manifest (expected format {DELTA_FORMAT!r} and a base)")
    return manifest


def _targets(model) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer by state-dict key (tied weights appear under each name)."""
    out = dict(model.named_parameters(remove_duplicate=False))
    out.update({k: v for k, v in model.named_buffers(remove_duplicate=False) if k in model.state_dict()})
    return out


class _Shards:
    """The safetensors files of a checkpoint, opened lazily (mapped, nothing read until sliced)."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.files = {}
        self.where: dict[str, str] = {}
        for f in sorted(path.glob("*.safetensors")):
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as exc:
                raise ModelLoadError(f"{f}: unreadable safetensors file ({type(exc).__name__}: {exc})") from exc
            self.files[f.name] = handle
            for key in handle.keys():
                self.where[key] = f.name
        if not self.files:
            raise ModelLoadError(f"no *.safetensors weights in {path}")

    def slice(self, key: str):
        return self.files[self.where[key]].get_slice(key)

    def tensor(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key)


def _copy_if_changed(target: torch.Tensor, rows: slice, new: torch.Tensor, report: ApplyReport, key: str) -> None:
    """Copy `new` into target[rows] when it differs (after casting to the target dtype); log ||Δ||."""
    cur = target[rows]
    new = new.to(device=cur.device, dtype=cur.dtype)
    report.written.add(key)
    if new.shape != cur.shape:
        raise ModelLoadError(f"{report.path}: tensor {key} has shape {tuple(new.shape)} there, "
                             f"{tuple(cur.shape)} in the model (a checkpoint of another architecture?)")
    if torch.equal(cur, new):
        return
    diff = new.double()
    diff.sub_(cur.double())                                  # float64 ||Δ||: chunks are sized for 8-byte elements
    report.changed[key] = float((report.changed.get(key, 0.0) ** 2 + float(diff.pow(2).sum())) ** 0.5)
    report.elements_changed += int((diff != 0).sum())
    cur.copy_(new)


def _rows_per_chunk(shape, chunk_bytes: int) -> int:
    """Rows of dim 0 per slice so that one slice in float64 (the ||Δ|| arithmetic) is <= chunk_bytes."""
    row = 8
    for s in shape[1:]:
        row *= int(s)
    return max(1, chunk_bytes // max(row, 1))


def _copy_tensor(target: torch.Tensor, shards: _Shards, ckpt_key: str, model_key: str, report: ApplyReport,
                 chunk_bytes: int) -> None:
    """Checkpoint tensor `ckpt_key` into model tensor `target`, `chunk_bytes` of rows at a time."""
    sl = shards.slice(ckpt_key)
    shape = [int(s) for s in sl.get_shape()]
    if tuple(shape) != tuple(target.shape):
        raise ModelLoadError(f"{report.path}: tensor {ckpt_key} has shape {tuple(shape)} there, "
                             f"{tuple(target.shape)} in the model (a checkpoint of another architecture?)")
    if not shape:                                                       # a scalar
        _copy_if_changed(target.view(1), slice(0, 1), shards.tensor(ckpt_key).view(1), report, model_key)
    else:
        step = _rows_per_chunk(shape, chunk_bytes)
        for r0 in range(0, shape[0], step):
            _copy_if_changed(target, slice(r0, r0 + step), sl[r0:r0 + step], report, model_key)
    report.tensors_read += 1


@torch.no_grad()
def _apply_native(model, shards: _Shards, keys: list[str], report: ApplyReport, chunk_bytes: int) -> None:
    targets = _targets(model)
    unknown = [k for k in keys if k not in targets]
    if unknown:
        raise ModelLoadError(f"{report.path}: {len(unknown)} tensor(s) the model does not have, e.g. {unknown[0]} "
                             "(a checkpoint of another architecture?)")
    for key in keys:
        _copy_tensor(targets[key], shards, key, key, report, chunk_bytes)
    report.tensors_changed = len(report.changed)


@torch.no_grad()
def _apply_hub(model, shards: _Shards, report: ApplyReport, chunk_bytes: int) -> None:
    """Hub layout: rename / convert each checkpoint key with transformers' own conversion mapping."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (MergeModulelist, WeightConverter, WeightRenaming, dot_natural_key,
                                                 rename_source_key)

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    targets = _targets(model)
    meta = {k: True for k in targets}
    direct: dict[str, str] = {}                                     # model key -> checkpoint key
    groups: dict[str, tuple] = {}                                   # model key -> (converter, {pattern: [keys]})
    for key in sorted(shards.where, key=dot_natural_key):
        new_key, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if new_key not in targets:
            raise ModelLoadError(f"{report.path}: tensor {key} maps to {new_key}, which the model does not have "
                                 "(a checkpoint of another architecture?)")
        if pattern is None:
            direct[new_key] = key
        else:
            conv = next(c for c in converters if pattern in c.source_patterns)
            groups.setdefault(new_key, (conv, defaultdict(list)))[1][pattern].append(key)
    for new_key, ckpt_key in direct.items():                       # plain renames: row chunks as native
        _copy_tensor(targets[new_key], shards, ckpt_key, new_key, report, chunk_bytes)
    for new_key, (conv, by_pattern) in groups.items():
        target = targets[new_key]
        patterns = [p for p in conv.source_patterns if p in by_pattern]
        n_src = len(by_pattern[patterns[0]])
        stacks = isinstance(conv.operations[0], MergeModulelist) and conv.operations[0].dim == 0
        per = _rows_per_chunk((n_src, *target.shape[1:]), chunk_bytes) if stacks else n_src
        for e0 in range(0, n_src, per):
            sub = {p: [shards.tensor(k) for k in by_pattern[p][e0:e0 + per]] for p in patterns}
            for op in conv.operations:
                sub = op.convert(sub, source_patterns=patterns, target_patterns=conv.target_patterns,
                                 full_layer_name=new_key, model=model, config=model.config, missing_keys=None)
            (out,) = sub.values()
            _copy_if_changed(target, slice(e0, e0 + per) if stacks else slice(None), out, report, new_key)
        report.tensors_read += sum(len(v) for v in by_pattern.values())
    report.tensors_changed = len(report.changed)


def check_same_architecture(moe, path: str | Path) -> None:
    """ModelLoadError unless checkpoint `path` (or a delta's config) is of `moe`'s architecture; reads config.json only."""
    from .load import _check_dir

    path = Path(path)
    _check_dir(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path / 'config.json'}: unreadable ({exc})") from exc
    mine = moe.model.config.to_dict()
    theirs_name = (cfg.get("architectures") or [cfg.get("model_type", "?")])[0]
    differ = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if cfg.get(k) != mine.get(k)]
    if differ:
        raise ModelLoadError(f"{path} is a {theirs_name} ({', '.join(f'{k}={cfg.get(k)}' for k in differ)}); the base is "
                             f"a {type(moe.model).__name__} ({', '.join(f'{k}={mine.get(k)}' for k in differ)}): "
                             "not the same architecture")


def _layout(model, path: Path, shards: _Shards) -> str:
    """'delta' (a GRIP Studio delta), 'native' (keys = the model's state-dict keys) or 'hub' (needs conversion)."""
    if is_delta_dir(path):
        return "delta"
    return "native" if set(shards.where) <= set(_targets(model)) else "hub"


def load_streaming(path: str | Path, dtype: torch.dtype, experts_implementation: str | None = None):
    """Build the model of checkpoint `path` with EMPTY parameters and fill them with `apply_checkpoint`.

    transformers' loader converts a Hub-layout checkpoint by materialising each fused expert tensor
    next to its per-expert sources (one fused tensor extra, 537 MB at OLMoE width); here every tensor
    is filled in row slices, so the peak stays at the model plus one slice. The skeleton comes from
    accelerate's `init_empty_weights` (parameters on the meta device, buffers such as rotary
    frequencies computed for real), each parameter is then given real, uninitialised CPU storage with
    accelerate's `set_module_tensor_to_device`. Every parameter must be covered by the checkpoint
    (tied weights by their tie); anything left uncovered is an error, never random values.
    """
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import MoEModel

    config = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    kw = {"experts_implementation": experts_implementation} if experts_implementation else {}
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
    for name, p in list(model.named_parameters()):
        set_module_tensor_to_device(model, name, "cpu", value=torch.empty(p.shape, dtype=p.dtype))
    model.tie_weights()
    if (Path(path) / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    moe = MoEModel(model.eval())
    report = apply_checkpoint(moe, path)
    tied = {k for k, v in model.named_parameters(remove_duplicate=False)} - set(dict(model.named_parameters()))
    missing = [k for k in dict(model.named_parameters()) if k not in report.written and k not in tied]
    if missing:
        raise ModelLoadError(f"{path}: the checkpoint has no values for {len(missing)} parameter(s), e.g. {missing[0]}")
    return model


def apply_checkpoint(moe, path: str | Path, chunk_bytes: int = 32 << 20) -> ApplyReport:
    """Load the weights of checkpoint `path` INTO `moe` in place, copying only the slices that differ.

    `path` is a full checkpoint (native or hub layout, sharded or not) or a delta folder. Keys a full
    checkpoint lacks (tied weights) keep the model's values. Returns what changed (per tensor ||Δ||).
    """
    path = Path(path)
    t0 = time.perf_counter()
    shards = _Shards(path)
    layout = _layout(moe.model, path, shards)
    report = ApplyReport(str(path), layout)
    if layout == "hub":
        _apply_hub(moe.model, shards, report, chunk_bytes)
    else:
        _apply_native(moe.model, shards, sorted(shards.where), report, chunk_bytes)
    report.seconds = time.perf_counter() - t0
    moe.name = str(path)
    return report


@torch.no_grad()
def changed_tensors(model, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state-dict tensors of `model` that differ from `reference` (same keys), as CPU copies."""
    out = {}
    for key, value in model.state_dict().items():
        ref = reference.get(key)
        if ref is None or ref.shape != value.shape or not torch.equal(ref.to(value.device, value.dtype), value):
            out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def save_delta(model, reference: dict[str, torch.Tensor], out_dir: str | Path, base: str,
               tokenizer=None) -> dict:
    """Write only the tensors of `model` that differ from `reference` (the base's state dict) to `out_dir`.

    `base` is what `load_model` loads first ("demo" or a checkpoint path). Returns the manifest.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = changed_tensors(model, reference)          # clones: tied keys are saved as separate copies
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    numel = sum(v.numel() for v in tensors.values())
    total = sum(v.numel() for v in model.state_dict().values())
    manifest = {"format": DELTA_FORMAT, "base": str(base), "tensors": sorted(tensors), "elements": numel,
                "share_of_model": numel / max(total, 1)}
    (out / DELTA_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def save_native(model, out_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None,
                max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write `model` in native layout (its own state-dict keys), sharded, with the index file.

    Faster to apply in place than the hub layout (`apply_checkpoint` copies row slices directly).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    plan, seen, cur, cur_bytes = [], set(), [], 0            # shard plan: lists of keys, by byte budget
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:                                    # a tied copy: stored once
            continue
        seen.add(ident)
        size = value.numel() * (torch.tensor([], dtype=dtype).element_size()
                                if dtype and value.is_floating_point() else value.element_size())
        if cur and cur_bytes + size > max_shard_bytes:
            plan.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += size
    plan.append(cur)
    names, weight_map, total = [], {}, 0
    for i, keys in enumerate(plan):                          # one shard's copy in memory at a time
        name = "model.safetensors" if len(plan) == 1 else f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {k: state[k].detach().to("cpu", dtype if (dtype and state[k].is_floating_point())
                                         else state[k].dtype).contiguous() for k in keys}
        save_file(shard, str(out / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        names.append(name)
        weight_map.update({k: name for k in keys})
        del shard
    if len(plan) > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if dtype is not None:
        model.config.dtype = str(dtype).replace("torch.", "")
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return names

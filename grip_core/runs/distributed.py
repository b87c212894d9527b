"""Data-parallel GRIP jobs under `accelerate launch` / torchrun: the torch.distributed glue (docs/distributed.md).

    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m grip_core run ...

`run_unlearning` asks `DistributedContext.from_env()` for a context. Without a multi-process
launch (no WORLD_SIZE > 1 in the environment) it is the SINGLE-process context: every method is
the identity or the plain torch call the job made before, so one-process runs are bit-identical
to a job runner that knows nothing of this file. Under a launch with N > 1 processes:

- Data parallel, every process holds the whole model. Each step's batch (config.batch_size
  examples, the GLOBAL batch) is split by example index: rank r takes examples r::N. After
  `backward`, gradients are all-reduced (mean) in flat buckets, so every process steps with the
  same gradient, and the optimizer + GRIP's projection (deterministic given identical state and
  gradient) leave identical weights on every process. `check_replicas` verifies the routers
  bitwise at the end of training and raises if they differ.
  Not the DDP wrapper, on purpose: methods run several forwards per backward (forget + retain),
  RMU stops its forward mid-way (DDP's reducer then silently skips the all-reduce), and MoE
  experts that no token picked have no gradient on some ranks. One explicit all-reduce after
  backward is exact for all of them.
- GRIP.fit: rank r streams retain examples r::N; `FitReducer` sums Grams, counts and token
  counts across processes (SUM, float64 / int64) before the eigendecomposition, and merges the
  margin-row reservoirs (global top-`max_margin_rows` of independent per-process random keys:
  the exact distributed reservoir sample) and the probes (batches interleaved rank by rank, cut
  at `probe_tokens`) so every process holds identical rows.
- Metrics (the Baseline, per-step evaluation, the final report) run on rank 0 only and are
  broadcast; only rank 0 writes the run folder (RunWriter).
- accelerate supplies the process group (gloo on CPU, NCCL on GPU), the device of each process,
  mixed-precision autocast / loss scaling (`backward`, `clip_grad_norm_`, the optimizer wrapper
  around the SAME torch optimizer that `grip.wrap` hooked, so GRIP runs once per real step).
  FSDP and DeepSpeed launches are refused with a clear error (see docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import os
import random
from datetime import timedelta
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")
_BUCKET_NUMEL = 1 << 25            # elements per all-reduce bucket (128 MB at fp32)
_CONTEXT: "DistributedContext | None" = None
_UNSUPPORTED = ("GRIP Studio's job runner does data parallelism only (accelerate distributed_type {kind} is not "
                "supported): it fits GRIP and evaluates on the whole unsharded model, and DeepSpeed ZeRO writes the "
                "stepped weights after torch's optimizer hooks (where GRIP projects) ran. Use "
                "configs/accelerate/ddp_gpu.yaml; see docs/distributed.md (FSDP and DeepSpeed).")


def launched_world_size() -> int:
    """WORLD_SIZE from the environment (set by torchrun / accelerate launch); 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class DistributedContext:
    """One process's view of a (possibly one-process) data-parallel job. See the module doc.

    The single-process context (`DistributedContext()`) makes no collective call and imports
    nothing from accelerate.
    """

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.enabled = accelerator is not None and self.world_size > 1
        self._batch_device: torch.device | None = None       # the trained model's device, set by place_model

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_env(cls) -> "DistributedContext":
        """The single context without a multi-process launch; else one shared accelerate context."""
        global _CONTEXT
        if launched_world_size() <= 1:
            return cls()
        if _CONTEXT is None:
            from accelerate import Accelerator
            from accelerate.utils import DistributedType, InitProcessGroupKwargs

            for flag, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
                if os.environ.get(flag, "false").lower() in ("1", "true"):
                    raise NotImplementedError(_UNSUPPORTED.format(kind=kind))
            timeout = int(os.environ.get("GRIP_DIST_TIMEOUT_S", "3600"))   # rank 0 evaluates while others wait
            # accelerate launch starts several CPU processes only via mpirun (MULTI_CPU); its torchrun launcher
            # (MULTI_GPU) with no visible GPU is the portable way (configs/accelerate/cpu_2proc.yaml): gloo on CPU
            cpu = (os.environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true")
                   or not torch.cuda.is_available())
            acc = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))])
            if acc.num_processes != launched_world_size():
                raise RuntimeError(f"WORLD_SIZE={launched_world_size()} but accelerate set up {acc.num_processes} "
                                   f"process(es) ({acc.distributed_type.value}): every process would write its own run")
            if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED,
                                        DistributedType.MEGATRON_LM):
                raise NotImplementedError(_UNSUPPORTED.format(kind=acc.distributed_type.value))
            _CONTEXT = cls(acc)
        return _CONTEXT

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """This process's device under a launch; None in one process (the job keeps the model where it is)."""
        return self.accelerator.device if self.enabled else None

    def __repr__(self) -> str:
        return f"DistributedContext(rank={self.rank}, world_size={self.world_size})"

    # ---- data -------------------------------------------------------------------------------
    def shard(self, examples: Sequence[T]) -> Sequence[T]:
        """Rank r's share, examples r::world_size (the sequence itself in one process)."""
        if not self.enabled:
            return examples
        part = examples[self.rank::self.world_size]
        if len(examples) and not len(part):
            raise ValueError(f"{len(examples)} examples cannot be split over {self.world_size} processes: "
                             "use a batch size >= the number of processes")
        return part

    def place_model(self, model: torch.nn.Module, batches: bool = True) -> torch.nn.Module:
        """Move a model copy onto this process's device (a launch only; one process: where it is).
        batches=True (the trained copy): `to_device` then sends batches where it lives."""
        dev = self.device
        if dev is not None and next(model.parameters()).device != dev:
            model.to(dev)
        if batches:
            self._batch_device = next(model.parameters()).device
        return model

    def to_device(self, batch: dict) -> dict:
        """The batch on the trained model's device (CPU tensors for a CPU model: the same objects)."""
        dev = self._batch_device
        if dev is None or all(v.device == dev for v in batch.values() if isinstance(v, torch.Tensor)):
            return batch
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    # ---- training ---------------------------------------------------------------------------
    def prepare_optimizer(self, optimizer: torch.optim.Optimizer):
        """accelerate's wrapper around the SAME torch optimizer (whose step hooks GRIP registered)."""
        if not self.enabled:
            return optimizer
        return self.accelerator.prepare_optimizer(optimizer, device_placement=False)

    def autocast(self):
        return self.accelerator.autocast() if self.enabled else contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, params: Iterable[torch.nn.Parameter]) -> None:
        """loss.backward(); under a launch, then average the gradients of `params` across processes."""
        if not self.enabled:
            loss.backward()
            return
        self.accelerator.backward(loss)
        self.sync_gradients(params)

    def clip_grad_norm_(self, params: list, max_norm: float):
        if not self.enabled:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.accelerator.clip_grad_norm_(params, max_norm)     # unscales fp16 gradients first

    def sync_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Mean of every gradient across processes, bucketed. A parameter without a gradient on some
        process gets zeros there; one without a gradient anywhere keeps None (as in one process)."""
        import torch.distributed as dist

        params = [p for p in dict.fromkeys(params) if p.requires_grad]
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self._comm_device())
        dist.all_reduce(has)
        grads: dict[tuple, list[torch.Tensor]] = {}
        for p, h in zip(params, has.tolist()):
            if not h:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for group in grads.values():
            for bucket in _buckets(group, _BUCKET_NUMEL):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                if flat.dtype in (torch.bfloat16, torch.float16):
                    flat = flat.float()                          # sum half-precision gradients in fp32
                dist.all_reduce(flat)
                flat.div_(self.world_size)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()

    # ---- collectives (identity in one process) ----------------------------------------------
    def _comm_device(self) -> torch.device:
        """Where collective tensors must live: the accelerator device for NCCL, CPU for gloo."""
        import torch.distributed as dist

        backend = str(dist.get_backend())
        return self.accelerator.device if ("nccl" in backend or "xccl" in backend) else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place SUM over processes (moved to the collective device and back if needed)."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        dev = self._comm_device()
        flat = tensor.reshape(-1)
        for start in range(0, flat.numel(), _BUCKET_NUMEL):            # bounded device memory for big Grams
            part = flat[start:start + _BUCKET_NUMEL]
            t = part.to(dev)
            dist.all_reduce(t)
            if t is not part:
                part.copy_(t)
        if flat.data_ptr() != tensor.data_ptr():                      # non-contiguous input: reshape copied
            tensor.copy_(flat.view_as(tensor))
        return tensor

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar tensor over processes (the tensor itself in one process)."""
        if not self.enabled:
            return value
        t = value.detach().double().reshape(1).cpu()
        return self.all_reduce_sum(t)[0] / self.world_size

    def mean_dict(self, parts: dict) -> dict:
        """Means over processes of a dict of floats (the same dict in one process)."""
        if not self.enabled or not parts:
            return parts
        keys = sorted(parts)
        t = self.all_reduce_sum(torch.tensor([float(parts[k]) for k in keys], dtype=torch.float64))
        return {**parts, **{k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}}

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (cancellation must be agreed)."""
        if not self.enabled:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([int(bool(flag))]))[0] > 0)

    def all_gather_object(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every process."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    def on_main(self, fn: Callable[..., T], *args, **kwargs) -> T | None:
        """fn(*args) on rank 0 only (RNG states preserved under a launch), None elsewhere; no collective."""
        if not self.enabled:
            return fn(*args, **kwargs)
        if not self.is_main:
            return None
        with _preserve_rng(self.accelerator.device):
            return fn(*args, **kwargs)

    def main_only(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """fn(*args) on rank 0, its result broadcast to every process; the other ranks wait.

        Under a launch, rank 0 runs it with its RNG states saved and restored, so every process
        keeps the same random streams. An exception on rank 0 is re-raised on every process.
        """
        if not self.enabled:
            return fn(*args, **kwargs)
        result, error = None, None
        if self.is_main:
            with _preserve_rng(self.accelerator.device):
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    error = exc
        box = self.broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if box[1] is not None:
            raise RuntimeError(f"rank 0 failed while this rank waited: {box[1]}")
        return box[0]

    def check_replicas(self, tensors: dict[str, torch.Tensor], what: str = "router weights") -> None:
        """Raise on every process unless `tensors` are bitwise equal on all processes."""
        if not self.enabled:
            return
        mine = {k: v.detach().cpu() for k, v in sorted(tensors.items())}
        theirs = self.all_gather_object(mine)
        bad = sorted({k for other in theirs for k in mine if k not in other or not _bitwise_equal(other[k], mine[k])})
        if bad:
            raise RuntimeError(f"{what} differ between processes after training ({len(bad)} tensors, e.g. {bad[:3]}): "
                               "the data-parallel replicas diverged, the run's numbers are not trustworthy")

    # ---- GRIP.fit ---------------------------------------------------------------------------
    def fit_reducer(self) -> "FitReducer | None":
        """The `reduce=` hook of grip.fit.fit_retain_statistics (None in one process)."""
        return FitReducer(self) if self.enabled else None


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and the sign of zero included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _buckets(tensors: list[torch.Tensor], cap: int):
    bucket, size = [], 0
    for t in tensors:
        if bucket and size + t.numel() > cap:
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


@contextlib.contextmanager
def _preserve_rng(device: torch.device):
    py, npy = random.getstate(), np.random.get_state()
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class FitReducer:
    """reduce= hook for fit_retain_statistics: sums and merges one process's FitAccumulators.

    - grams (float64), counts, rule-agreement counts, token count: all-reduced SUM. The Gram of
      expert j is a sum over tokens, so the reduced Gram equals the one-process Gram up to the
      order of float64 additions; the eigendecomposition then runs on identical input everywhere.
    - margin rows: every process kept the top-`max_margin_rows` random keys of its own tokens
      (independent keys per process: the `rank` attribute below). Gathering those and keeping the
      global top-`max_margin_rows` is exactly a reservoir sample of the whole retain set.
    - probe: each process's first batches, interleaved rank by rank (r0 b0, r1 b0, r0 b1, ...),
      kept while fewer than `probe_tokens` tokens are in; with the r::N shard the probe covers the
      same examples as the one-process probe, regrouped into other batches.
    Every process ends with identical statistics (the gathers are in rank order).
    """

    def __init__(self, ctx: DistributedContext):
        self.ctx = ctx
        self.rank = ctx.rank

    def __call__(self, acc):
        ctx = self.ctx
        for g in acc.grams:
            ctx.all_reduce_sum(g)
        for c in acc.counts:
            ctx.all_reduce_sum(c)
        acc.agree = ctx.all_reduce_sum(acc.agree.clone())
        acc.num_tokens = int(ctx.all_reduce_sum(torch.tensor([acc.num_tokens], dtype=torch.long))[0])
        self._merge_reservoir(acc)
        self._merge_probe(acc)
        return acc

    def _merge_reservoir(self, acc) -> None:
        ctx = self.ctx
        keys = ctx.all_gather_object(acc.reservoir_keys)
        all_keys = torch.cat(keys)
        keep = all_keys.topk(min(acc.max_margin_rows, all_keys.shape[0])).indices.sort().values
        parts = []
        for pos in range(len(acc.reservoir_parts)):                 # one layer at a time: bounded memory
            gathered = [p for p in ctx.all_gather_object(acc.reservoir_parts[pos]) if p is not None]
            parts.append([torch.cat(cols)[keep] for cols in zip(*gathered)] if gathered else None)
        acc.reservoir_keys, acc.reservoir_parts = all_keys[keep], parts

    def _merge_probe(self, acc) -> None:
        L = len(acc.probe_logits)
        mine = [(b, [acc.probe_logits[l][i] for l in range(L)], [acc.probe_selected[l][i] for l in range(L)])
                for i, b in enumerate(acc.probe_batches)]
        per_rank = self.ctx.all_gather_object(mine)
        batches, logits, selected = [], [[] for _ in range(L)], [[] for _ in range(L)]
        n = 0
        for i in range(max((len(r) for r in per_rank), default=0)):
            for r in per_rank:
                if i >= len(r) or n >= acc.probe_tokens:
                    continue
                b, lg, sel = r[i]
                batches.append(b)
                for l in range(L):
                    logits[l].append(lg[l])
                    selected[l].append(sel[l])
                n += lg[0].shape[0] if L else 0
        acc.probe_batches, acc.probe_logits, acc.probe_selected = batches, logits, selected

"""Quantization: round-trip weights through INT8 / NF4 / INT4 and ask again.

Low-bit rounding perturbs every weight a little. If unlearning moved the weights only a little
(just past the edge of answering), rounding can push them back; quantized unlearned models have
been reported to "remember" again. Each variant quantizes and dequantizes the chosen weights IN
PLACE (the originals are kept and written back in a `finally`), then probes:

- quant_int8  symmetric INT8, one scale per output row (per expert, per row of a fused E x out x in tensor)
- quant_int4  asymmetric INT4, one scale + zero point per `int4_group_size` inputs (weight-only INT4 style)
- quant_nf4   NF4 (QLoRA's 4-bit NormalFloat), absmax blocks of `nf4_block_size`, double-quantized scales

Which weights (`AttackConfig.quant_scope`): "experts" = routed and shared experts' weights; "linear"
= every weight matrix of the decoder layers (attention, experts, routers). Embeddings, the LM head
and norms are never quantized (as in weight-only quantization schemes).

Library: torchao (pytorch/ao). INT8 and INT4 use its affine primitives
(`choose_qparams_affine` / `quantize_affine` / `dequantize_affine`), which take N-D block sizes and so
handle fused 3-D expert tensors (E x out x in) directly with block (1, 1, group); NF4 uses
`to_nf4(...).get_original_weight()`, which takes 2-D tensors only, so a 3-D tensor is viewed as
(E*out, in) (blocks never cross a row when `in` is a multiple of the block size). torchao runs on
CPU and covers all three formats, so nothing here is hand-written but the choice of tensors and the
reshape; optimum-quanto and bitsandbytes were not needed.

Footgun: NF4 needs the tensor's size to be a multiple of the block size (and of torchao's scaler
block, 256 elements by default, reduced to fit); a tensor that is not is an error naming it.
"""
from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import torch

from ..moe import MoEModel
from ..moe.errors import ConfigError
from .base import Attack, AttackContext, register_attack, restored_parameters


def _torchao():
    """torchao's primitives; its import-time warnings about GPU-only kernels it cannot load on CPU are muted."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization.quant_primitives as qp
            from torchao.quantization import to_nf4
    finally:
        log.setLevel(level)
    return qp, to_nf4


def _affine_round_trip(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """INT8 symmetric per row (group None) or INT`bits` asymmetric per `group` inputs; torchao primitives."""
    qp, _ = _torchao()
    x = w.detach().float()
    if group is None:
        block = (*([1] * (x.dim() - 1)), x.shape[-1])
        mapping, lo, hi = qp.MappingType.SYMMETRIC, -(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1
    else:
        if x.shape[-1] % group:
            group = x.shape[-1]        # a row shorter than / not divisible by the group: one group per row
        block = (*([1] * (x.dim() - 1)), group)
        mapping, lo, hi = qp.MappingType.ASYMMETRIC, 0, 2 ** bits - 1
    qdtype = torch.int8 if group is None else torch.uint8
    scale, zero = qp.choose_qparams_affine(x, mapping, block, qdtype, quant_min=lo, quant_max=hi)
    q = qp.quantize_affine(x, block, scale, zero, qdtype, quant_min=lo, quant_max=hi)
    return qp.dequantize_affine(q, block, scale, zero, qdtype, quant_min=lo, quant_max=hi, output_dtype=torch.float32)


def _nf4_round_trip(w: torch.Tensor, block: int, name: str) -> torch.Tensor:
    _, to_nf4 = _torchao()
    x = w.detach().float().reshape(-1, w.shape[-1])                                # (rows, in)
    if x.numel() % block or x.shape[-1] % block:
        raise ConfigError(f"quant_nf4: {name} {tuple(w.shape)} is not a multiple of the NF4 block {block}; "
                          "set nf4_block_size to a divisor of its input size")
    n_blocks = x.numel() // block
    scaler = 256 if n_blocks % 256 == 0 else max(d for d in range(1, min(256, n_blocks) + 1) if n_blocks % d == 0)
    return to_nf4(x, block_size=block, scaler_block_size=scaler).get_original_weight().reshape(w.shape)


def round_trip(w: torch.Tensor, fmt: str, *, int4_group: int = 64, nf4_block: int = 64, name: str = "") -> torch.Tensor:
    """`w` quantized to `fmt` ("int8" | "int4" | "nf4") and back, in `w`'s dtype (any 2-D or 3-D weight)."""
    if fmt == "int8":
        out = _affine_round_trip(w, 8, None)
    elif fmt == "int4":
        out = _affine_round_trip(w, 4, int4_group)
    elif fmt == "nf4":
        out = _nf4_round_trip(w, nf4_block, name)
    else:
        raise ConfigError(f"unknown quantization format {fmt!r}; expected int8, int4 or nf4")
    return out.to(w.dtype)


def quant_targets(moe: MoEModel, scope: str) -> dict[str, torch.nn.Parameter]:
    """The weights a quantization attack rounds: parameter path -> parameter (>= 2-D only)."""
    model = moe.model
    params = dict(model.named_parameters())
    if scope == "experts":
        prefixes = tuple(f"{l.module_path}.experts." for l in moe.layers) + tuple(
            f"{l.shared_experts}." for l in moe.layers if l.shared_experts)
        return {k: p for k, p in params.items() if p.dim() >= 2 and k.startswith(prefixes)}
    skip = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None
            for p in m.parameters()}
    return {k: p for k, p in params.items() if p.dim() >= 2 and id(p) not in skip and ".layers." in f".{k}"}


@contextmanager
def quantized(moe: MoEModel, fmt: str, scope: str = "experts", int4_group: int = 64, nf4_block: int = 64):
    """Within the block `moe`'s target weights hold their `fmt` round trip; the originals come back after."""
    targets = quant_targets(moe, scope)
    if not targets:
        raise ConfigError(f"quantization: no {scope} weights found in {type(moe.model).__name__}")
    with restored_parameters(targets), torch.no_grad():
        for name, p in targets.items():
            p.copy_(round_trip(p, fmt, int4_group=int4_group, nf4_block=nf4_block, name=name))
        yield moe


_SETTING = {"int8": "INT8 per row", "int4": "INT4 groups of {g}", "nf4": "NF4 blocks of {b}"}


@register_attack("quant_int8", "quant_nf4", "quant_int4")
class Quantization(Attack):
    def run(self, ctx: AttackContext, names: list[str]) -> list[dict]:
        cfg, rows = ctx.config, []
        for name in names:
            fmt = name.removeprefix("quant_")
            kw = dict(fmt=fmt, scope=cfg.quant_scope, int4_group=cfg.int4_group_size, nf4_block=cfg.nf4_block_size)
            during_u = lambda: quantized(ctx.unlearned, **kw)
            attacked = ctx.probe(ctx.unlearned, during=during_u)
            shift = ctx.routing_shift(ctx.unlearned, during=during_u)
            base = ctx.probe(ctx.base, during=lambda: quantized(ctx.base, **kw)) if cfg.on_base else None
            what = "expert weights" if cfg.quant_scope == "experts" else "decoder weight matrices"
            setting = _SETTING[fmt].format(g=cfg.int4_group_size, b=cfg.nf4_block_size) + f", {what}"
            rows.append(ctx.row(name, setting, attacked, base, shift))
        return rows

"""The update ledger: where did the unlearning update land?

For a base / unlearned pair, ‖ΔΘ‖_F of every parameter group and its share of the total squared
norm (shares sum to 1):

    group          layer      expert     what
    router         MoE layer  None       the router's weight, logit bias and selection-bias buffer
    routed_expert  layer      e          expert e's slice of the fused (E x out x in) tensors, or experts.e.*
    shared_expert  layer      None       the always-on shared expert(s) (Qwen2-MoE, DeepSeek-V3, ...)
    attention      layer      None       q/k/v/o projections (and their norms' siblings inside attention)
    embedding      None       None       input embeddings and the LM head
    norm           layer/None None       RMSNorm / LayerNorm weights (final norm: layer None)
    other          layer/None None       anything else

Three ways in, none holding two full models:
- `update_ledger(base, unlearned)`: two models in memory (the job loop's copy and its base), read
  tensor by tensor;
- `ledger_from_checkpoint(base, path)`: a saved run's `model/` (a delta: only changed tensors, or
  a full native-layout checkpoint) streamed from its safetensors files in row slices and compared
  with the loaded base, which is NOT modified (peak extra memory: one slice);
- `ledger_from_deltas(deltas, base)`: {parameter path: Δ tensor} already computed (e.g. a run's
  router_deltas.safetensors, which then covers the routers only).

Footguns:
- Tied weights (lm_head = embed_tokens) are one tensor: counted once.
- Hub-layout checkpoints (per-expert keys) are not read here: load them with load_model and
  use `update_ledger`, or diagnose them in place first.
- Only groups the update touched get a row (‖Δ‖ > 0); an unchanged model gives no rows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..moe import MoEModel
from ..moe.errors import ModelLoadError, RunStoreError

LEDGER_FILE = "ledger.json"
GROUPS = ("router", "routed_expert", "shared_expert", "attention", "embedding", "norm", "other")
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)(?:\.|$)")
_EXPERT = re.compile(r"^experts\.(\d+)\.")


class _Classifier:
    """Parameter path -> (group, layer, expert or "rows" for a fused tensor with one expert per row, or None)."""

    def __init__(self, moe: MoEModel):
        self.layers = moe.layers
        model = moe.model
        self.embedding_ids = {id(p) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                              if m is not None for p in m.parameters()}
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def __call__(self, key: str) -> tuple[str, int | None, int | str | None]:
        m = _LAYER.search(key)
        layer_idx = int(m.group(1)) if m else None
        for layer in self.layers:
            if key.startswith(layer.router_path + "."):
                return "router", layer.index, None
            if key.startswith(layer.module_path + ".experts."):
                rest = key[len(layer.module_path) + 1:]
                e = _EXPERT.match(rest)
                return "routed_expert", layer.index, int(e.group(1)) if e else "rows"
            if layer.shared_experts and key.startswith(layer.shared_experts + "."):
                return "shared_expert", layer.index, None
        p = self.params.get(key)
        if (p is not None and id(p) in self.embedding_ids) or "embed" in key or key.startswith("lm_head"):
            return "embedding", None, None
        leaf = key.rsplit(".", 2)
        if any("norm" in part for part in leaf[-2:]):
            return "norm", layer_idx, None
        if "attn" in key or "attention" in key:
            return "attention", layer_idx, None
        return "other", layer_idx, None


class _Ledger:
    def __init__(self, moe: MoEModel):
        self.classify = _Classifier(moe)
        self.sq: dict[tuple, float] = {}

    def add(self, key: str, delta: torch.Tensor, row0: int = 0) -> None:
        """Add ‖delta‖² of `key` (rows [row0, row0 + len) of the tensor) to its group(s)."""
        group, layer, expert = self.classify(key)
        d = delta.detach().double()
        if expert == "rows" and d.dim() == 3:                      # fused (E, out, in): one expert per row
            per = d.pow(2).flatten(1).sum(1)                           # (rows,)
            for i, v in enumerate(per.tolist()):
                self._put((group, layer, row0 + i), v)
        else:
            self._put((group, layer, None if expert == "rows" else expert), float(d.pow(2).sum()))

    def _put(self, key: tuple, v: float) -> None:
        self.sq[key] = self.sq.get(key, 0.0) + v

    def rows(self) -> list[dict]:
        total = sum(self.sq.values())
        order = lambda k: (GROUPS.index(k[0]), -1 if k[1] is None else k[1], -1 if k[2] is None else k[2])
        return [{"group": g, "layer": l, "expert": e, "norm": v ** 0.5, "share": v / total}
                for (g, l, e), v in sorted(self.sq.items(), key=lambda kv: order(kv[0])) if v > 0]


def _unique_float_tensors(model) -> dict[str, torch.Tensor]:
    """State-dict key -> tensor for every floating parameter / persistent buffer, tied tensors once."""
    seen, out = set(), {}
    state_keys = set(model.state_dict())
    named = list(model.named_parameters(remove_duplicate=False)) + [
        (k, b) for k, b in model.named_buffers(remove_duplicate=False) if k in state_keys]
    for k, t in named:
        if not t.is_floating_point():
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        out[k] = t
    return out


@torch.no_grad()
def update_ledger(base: MoEModel, unlearned: MoEModel) -> list[dict]:
    """Ledger rows of `unlearned` - `base` (two models of the same architecture in memory); untouched groups have none."""
    ledger = _Ledger(base)
    new = _unique_float_tensors(unlearned.model)
    for key, old in _unique_float_tensors(base.model).items():
        if key not in new or new[key].shape != old.shape:
            raise ValueError(f"update ledger: {key} is missing or has another shape in the unlearned model")
        ledger.add(key, new[key].to(old.device, torch.float64) - old.double())
    return ledger.rows()


@torch.no_grad()
def ledger_from_deltas(deltas: dict[str, torch.Tensor], base: MoEModel) -> list[dict]:
    """Ledger rows of precomputed deltas {parameter path: Δ} (paths of `base`'s architecture)."""
    ledger = _Ledger(base)
    for key, d in deltas.items():
        ledger.add(key, d)
    return ledger.rows()


def ledger_from_norms(norms: dict[str, float], base: MoEModel) -> list[dict]:
    """Ledger rows from per-tensor ‖Δ‖ {parameter path: norm} (e.g. `apply_checkpoint(...).changed`).

    Footgun: one number per tensor, so a fused expert tensor lands in its layer's row with expert None
    (no per-expert split); `ledger_from_checkpoint` splits them but reads only GRIP Studio's layout.
    """
    ledger = _Ledger(base)
    for key, norm in norms.items():
        group, layer, expert = ledger.classify(key)
        ledger._put((group, layer, None if expert == "rows" else expert), float(norm) ** 2)
    return ledger.rows()


@torch.no_grad()
def ledger_from_checkpoint(base: MoEModel, path: str | Path, chunk_bytes: int = 32 << 20) -> list[dict]:
    """Ledger rows of a native-layout checkpoint or GRIP Studio delta at `path` against the loaded `base`.

    Streamed in row slices of at most `chunk_bytes` (float64); `base` is read, never written.
    """
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {path}")
    targets = _unique_float_tensors(base.model)
    aliases = {k: t for k, t in base.model.named_parameters(remove_duplicate=False)}
    ledger, done = _Ledger(base), set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                target = targets.get(key, aliases.get(key))
                if target is None:
                    raise ModelLoadError(f"{f}: tensor {key} is not a parameter of {type(base.model).__name__} "
                                         "(a Hub-layout or other-architecture checkpoint: load it with load_model "
                                         "and use update_ledger)")
                ident = (target.untyped_storage().data_ptr(), target.storage_offset())
                if ident in done or not target.is_floating_point():
                    continue
                done.add(ident)
                sl = handle.get_slice(key)
                shape = [int(s) for s in sl.get_shape()]
                if tuple(shape) != tuple(target.shape):
                    raise ModelLoadError(f"{f}: tensor {key} has shape {tuple(shape)}, the model {tuple(target.shape)}")
                if not shape:
                    ledger.add(key, handle.get_tensor(key).double().view(1) - target.double().view(1))
                    continue
                row = 8 * max(1, int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
                step = max(1, chunk_bytes // row)
                for r0 in range(0, shape[0], step):
                    new = sl[r0:r0 + step].to(torch.float64)
                    ledger.add(key, new - target[r0:r0 + step].to("cpu", torch.float64), row0=r0)
    return ledger.rows()


def save_ledger(run_dir: str | Path, rows: list[dict]) -> Path:
    """Write the ledger rows to RUN_DIR/ledger.json (atomic); returns the path."""
    from ..runs.store import atomic_write_json

    path = Path(run_dir) / LEDGER_FILE
    atomic_write_json(path, rows)
    return path


def load_ledger(run_dir: str | Path) -> list[dict] | None:
    """The rows of RUN_DIR/ledger.json, else the `ledger` field of the run's report (summary.json: every job
    writes one), or None when the run has neither."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.is_file():
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            return None
        try:
            rows = json.loads(path.read_text()).get("ledger")
        except (OSError, json.JSONDecodeError, AttributeError):
            return None
        if rows is None:
            return None
    else:
        try:
            rows = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunStoreError(f"{path}: unreadable ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and {"group", "norm", "share"} <= set(r) for r in rows):
        raise RunStoreError(f"{path}: expected a list of ledger rows (group, layer, expert, norm, share)")
    return rows


def ledger_summary(rows: list[dict]) -> dict[str, float]:
    """Share of the update by group (summed over layers and experts), every group present (0 where none)."""
    from ..viz.robustness import ledger_shares   # the one sum (plain data: the figures use it too)
    return ledger_shares(rows)

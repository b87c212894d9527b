"""Model, data and trace caching for the dashboard (no tensor math: it calls grip_core).

- The base model is an `st.cache_resource` shared by every browser session and NEVER mutated:
  every forward pass over it (tracing registers hooks on its routers) holds its lock, and
  jobs train private deep copies (`private_copy`).
- Traces are reduced to plain data (grip_core.viz.summaries) and kept with `st.cache_data`.
- What one user picked (model source, data, jobs) lives in `st.session_state`.
"""
from __future__ import annotations

import copy
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from grip_core import MoEModel, load_model
from grip_core.moe.load import REPO_ROOT

DEV_TINY = "tiny:olmoe"                     # a random tiny OLMoE with a character tokenizer (development only)
MAX_UPLOAD_MB = 5
MAX_UPLOAD_EXAMPLES = 5000
TRACE_BATCH = 32
MAX_LENGTH = 64


# ----------------------------------------------------------------------------- model

def _char_tokenizer():
    """A character-level tokenizer for the tiny development model (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for i, ch in enumerate(chr(c) for c in range(32, 127)):
        vocab[ch] = 4 + i
    vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def load_checkpoint(source: str, **opts) -> MoEModel:
    """load_model for a path typed into the browser: a failure says only "not a readable checkpoint directory",
    never whether the server has such a path (missing / not a folder / no weights read the same)."""
    from grip_core.moe.errors import ModelLoadError
    from grip_core.moe.memory import ModelTooLargeError

    try:
        return load_model(source, **opts)
    except ModelTooLargeError:
        raise                                   # the memory numbers are what the user needs to see
    except ModelLoadError:
        raise ModelLoadError(f"{source}: not a readable checkpoint directory (a folder with config.json and "
                             "*.safetensors weights that this server can read)") from None


def _load(source: str) -> MoEModel:
    """Load a model key (app/lib/loading.py): "demo", "tiny:FAMILY", a path, or "path#device,dtype[,map]"."""
    from app.lib.loading import parse_key

    name, opts = parse_key(source)
    if name.startswith("tiny:"):
        source = name
        from grip_core.moe.tiny import build_tiny_model

        model = build_tiny_model(source.split(":", 1)[1])
        try:   # as load_model does on CPU: grouped_mm is ~10x slower than eager
            from grip_core.moe.fast_experts import register

            model.set_experts_implementation(register())
        except Exception:  # noqa: BLE001 - an older transformers
            pass
        return MoEModel(model, _char_tokenizer(), name=source)
    return load_model(name, **opts) if name == "demo" else load_checkpoint(name, **opts)


@st.cache_resource(show_spinner=False, max_entries=3)
def base_model(source: str) -> MoEModel:
    """The shared, read-only base model of the model key `source` ("demo", a checkpoint directory, tiny:FAMILY,
    or "path#device,dtype[,device_map]": the same path in float32 and bfloat16 are two models)."""
    return _load(source)


def load_base(source: str) -> MoEModel:
    """base_model(source), with an out-of-memory turned into a ModelLoadError and its memory released.

    A load that raises is not cached by st.cache_resource, so no half-loaded model stays shared.
    """
    from app.lib.loading import is_oom, oom_error, release_memory

    try:
        return base_model(source)
    except Exception as exc:  # noqa: BLE001 - MemoryError and torch.OutOfMemoryError are Exceptions
        if not is_oom(exc):
            raise
        err = oom_error(source, exc)
    release_memory()                # after the except block: the traceback (and the partial model) is gone
    raise err


def load_private(source: str) -> MoEModel:
    """A fresh model of the model key `source`, owned by the caller (never the shared cache): Diagnose
    applies an unlearned checkpoint into it in place. Out-of-memory becomes a ModelLoadError."""
    from app.lib.loading import is_oom, oom_error, release_memory

    try:
        return _load(source)
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            raise
        err = oom_error(source, exc)
    release_memory()
    raise err


@st.cache_resource(show_spinner=False)
def model_lock(source: str) -> threading.RLock:
    """Held around every use of the shared base model (hooks, deep copies): sessions never collide."""
    return threading.RLock()


def private_copy(source: str) -> MoEModel:
    """A deep copy of the base model (and its tokenizer) that one job may train freely."""
    base = base_model(source)
    with model_lock(source):
        tok = copy.deepcopy(base.tokenizer) if base.tokenizer is not None else None
        return MoEModel(copy.deepcopy(base.model), tok, name=base.name)


def runs_dir() -> Path:
    """Where runs are saved and read: runs/ (GRIP_STUDIO_RUNS_DIR overrides it, e.g. for tests)."""
    return Path(os.environ.get("GRIP_STUDIO_RUNS_DIR") or REPO_ROOT / "runs")


def current_source() -> str:
    """The model this session uses: "demo" unless the user loaded another (GRIP_STUDIO_MODEL sets the default)."""
    return st.session_state.setdefault("model_source", os.environ.get("GRIP_STUDIO_MODEL", "demo"))


@st.cache_data(show_spinner=False)
def describe(source: str) -> dict:
    return base_model(source).describe()


# ----------------------------------------------------------------------------- settings that survive page switches

KEPT = "kept_settings"          # session_state: {setting name: value}; not a widget key, so never dropped


def kept(widget, label: str, key: str, default, *args, **kwargs):
    """`widget(label, *args, key=key, **kwargs)` whose value survives leaving the page and coming back.

    Streamlit drops the session_state entry of a widget that is not drawn in a run (another page),
    so the widget's key is seeded, when missing, from a plain copy in session_state[KEPT] (else
    `default`), and the copy is updated on every run. A selectbox's saved value that is no longer
    among its options (args[0]) falls back to `default`. Do not pass value= / index=: the key holds it.
    """
    store = st.session_state.setdefault(KEPT, {})
    if key not in st.session_state:
        value = store.get(key, default)
        if args and isinstance(args[0], (list, tuple)) and value not in args[0]:
            value = default
        st.session_state[key] = value
    store[key] = widget(label, *args, key=key, **kwargs)
    return store[key]


# ----------------------------------------------------------------------------- data

@dataclass
class DataChoice:
    """Which examples the pages use: a demo scenario, or uploaded files (registered by content hash)."""

    key: str                 # "demo:domain" | "demo:entities" | "upload:<sha>"
    label: str


@st.cache_resource(show_spinner=False)
def _upload_registry() -> dict:
    return {}


def register_upload(files: dict[str, tuple[str, bytes]]) -> str:
    """Parse uploaded files {split: (file name, bytes)} with grip_core.data; return a data key.

    Raises ValueError (DataFileError) with the file and line of the first problem.
    """
    from grip_core.data import read_qa_file

    h = hashlib.sha256()
    for split in sorted(files):
        name, raw = files[split]
        if len(raw) > MAX_UPLOAD_MB * 2**20:
            raise ValueError(f"{name}: {len(raw) / 2**20:.1f} MB is over the {MAX_UPLOAD_MB} MB limit")
        h.update(split.encode() + b"\0" + name.encode() + b"\0" + raw)
    key = f"upload:{h.hexdigest()[:16]}"
    reg = _upload_registry()
    if key in reg:
        return key
    splits = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, (name, raw) in files.items():
            path = Path(tmp) / f"{split}{Path(name).suffix}"
            path.write_bytes(raw)
            examples = read_qa_file(path, name=name)        # errors name the upload, not the server's temp path
            if len(examples) > MAX_UPLOAD_EXAMPLES:
                raise ValueError(f"{name}: {len(examples)} examples is over the {MAX_UPLOAD_EXAMPLES} limit")
            splits[split] = examples
    if "forget" not in splits or "retain" not in splits:
        raise ValueError("upload at least a forget file and a retain file")
    reg[key] = splits
    return key


def data_key() -> str:
    return st.session_state.setdefault("data_key", "demo:domain")


@st.cache_resource(show_spinner=False, max_entries=8)
def _demo_world(scenario: str):
    from grip_core.data import load_demo_world

    return load_demo_world(scenario, root=os.environ.get("GRIP_STUDIO_WORLD_DIR") or None)


def splits_for(key: str) -> dict[str, list]:
    """{split name: [QAExample]} for a data key: forget / retain / holdout (+ paraphrases for the demo)."""
    if key.startswith("demo:"):
        w = _demo_world(key.split(":", 1)[1])
        out = {}
        for name in ("forget", "retain", "holdout", "paraphrase_forget", "paraphrase_retain"):
            ex = getattr(w, name, None)
            if ex:
                out[name] = list(ex)
        return out
    reg = _upload_registry()
    if key not in reg:
        raise KeyError("the uploaded files are no longer in memory: upload them again on the Model page")
    return dict(reg[key])


def unlearning_data(key: str, seed: int, eval_size: int):
    """grip_core.runs.data.UnlearningData for a data key (the same split of retain as the CLI's)."""
    from grip_core.runs.data import UnlearningData

    s = splits_for(key)
    train, held = UnlearningData._split_retain(list(s["retain"]), eval_size, seed)
    return UnlearningData(list(s["forget"]), train, held, list(s.get("holdout", [])),
                          list(s.get("paraphrase_forget", [])), list(s.get("paraphrase_retain", [])),
                          name=key.split(":", 1)[1] if key.startswith("demo:") else "custom")


def sample(examples: list, n: int, seed: int = 0) -> list:
    """The first `n` examples after a fixed shuffle (stable across reruns, spread over domains)."""
    import random

    if n >= len(examples):
        return list(examples)
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return [examples[i] for i in sorted(idx[:n])]


# ----------------------------------------------------------------------------- traces (plain data out)

def _batches(moe: MoEModel, examples: list):
    from grip_core.data import encode_qa

    return [encode_qa(moe.tokenizer, examples[i:i + TRACE_BATCH], max_length=MAX_LENGTH)
            for i in range(0, len(examples), TRACE_BATCH)]


def trace_examples(source: str, examples: list, keep_inputs: bool = False, moe: MoEModel | None = None):
    """RoutingTrace of QA examples (prompt + answer) through the base model (or `moe`), under the lock."""
    if not examples:
        raise ValueError("no examples to trace")
    if moe is not None:
        return moe.trace(_batches(moe, examples), keep_inputs=keep_inputs)
    base = base_model(source)
    if base.tokenizer is None:
        raise ValueError(f"{base.name} has no tokenizer: GRIP Studio needs one to encode text")
    with model_lock(source):
        return base.trace(_batches(base, examples), keep_inputs=keep_inputs)


@st.cache_data(show_spinner=False, max_entries=64)
def split_routing(source: str, key: str, split: str, max_examples: int, answers_only: bool) -> dict:
    from grip_core.viz import routing_summary

    examples = sample(splits_for(key)[split], max_examples)
    trace = trace_examples(source, examples)
    if answers_only:
        trace = trace.answers_only()
    out = routing_summary(trace, name=split)
    out["num_examples"] = len(examples)
    return out


@st.cache_data(show_spinner=False, max_entries=32)
def label_routing(source: str, key: str, max_examples: int, answers_only: bool) -> dict | None:
    """Domain x expert matrix at every MoE layer, plus NMI per layer (None if the examples carry no domains)."""
    from grip_core.viz.summaries import label_routing as _label_routing

    s = splits_for(key)
    examples = sample([e for name in ("forget", "retain") for e in s.get(name, [])], max_examples)
    labels = [getattr(e, "domain", "") or "" for e in examples]
    if len(set(labels) - {""}) < 2:
        return None
    return _label_routing(trace_examples(source, examples), labels, answers_only)


@st.cache_data(show_spinner=False, max_entries=64)
def prompt_routing(source: str, text: str) -> dict:
    from grip_core.viz import display_tokens, token_routing

    base = base_model(source)
    if base.tokenizer is None:
        raise ValueError(f"{base.name} has no tokenizer")
    with model_lock(source):
        trace = base.trace([text], max_length=128)
    return token_routing(trace, display_tokens(base.tokenizer, trace.token_ids.tolist()))


def data_label(key: str) -> str:
    if key.startswith("demo:"):
        name = key.split(":", 1)[1]
        return {"domain": "demo · forget one domain (WMDP-like)",
                "entities": "demo · forget 10 % of entities (TOFU-like)"}.get(name, f"demo · {name}")
    return "uploaded files"


# ----------------------------------------------------------------------------- embeddings

def _embedding_trace(source: str, moe: MoEModel | None, examples: list, layer: int, answers_only: bool) -> dict:
    from grip_core.viz.summaries import embedding_points

    trace = trace_examples(source, examples, keep_inputs=True, moe=moe)
    if answers_only and trace.answer_mask is not None:
        trace = trace.answers_only()
    return embedding_points(trace, layer, (moe or base_model(source)).tokenizer)


@st.cache_data(show_spinner=False, max_entries=16)
def embedding_data(source: str, key: str, layer: int, splits: tuple[str, ...], per_split: int, answers_only: bool,
                   run_id: str | None, _after: MoEModel | None = None) -> dict:
    """Router inputs at MoE layer position `layer` of the base model (and of an unlearned model, same tokens).

    Plain data: X (n, d) float32 arrays, per-token split / top-1 expert / token string / question.
    """
    import numpy as np

    all_splits = splits_for(key)
    before = {"X": [], "top1": [], "tokens": [], "split": [], "question": []}
    after = {"X": [], "top1": []} if _after is not None else None
    for name in splits:
        examples = sample(all_splits.get(name, []), per_split)
        if not examples:
            continue
        b = _embedding_trace(source, None, examples, layer, answers_only)
        before["X"].append(b["X"])
        before["top1"] += b["top1"]
        before["tokens"] += b["tokens"]
        before["split"] += [name] * len(b["tokens"])
        before["question"] += [examples[s].question for s in b["sequence"]]
        if _after is not None:
            a = _embedding_trace(source, _after, examples, layer, answers_only)
            after["X"].append(a["X"])
            after["top1"] += a["top1"]
    if not before["X"]:
        raise ValueError("no examples in the chosen splits")
    before["X"] = np.concatenate(before["X"]).astype(np.float32)
    if after is not None:
        after["X"] = np.concatenate(after["X"]).astype(np.float32)
    return {"before": before, "after": after}


@st.cache_data(show_spinner=False, max_entries=16)
def pca_coords(source: str, key: str, layer: int, splits: tuple[str, ...], per_split: int, answers_only: bool,
               run_id: str | None, _after: MoEModel | None = None) -> dict:
    from grip_core.viz import fit_projection

    data = embedding_data(source, key, layer, splits, per_split, answers_only, run_id, _after)
    proj, before = fit_projection(data["before"]["X"], "pca")
    after = proj.transform(data["after"]["X"]) if data["after"] is not None else None
    return {"before": before, "after": after, "explained": proj.explained}


@st.cache_resource(show_spinner=False)
def _umap_jobs() -> dict:
    """Background UMAP fits shared by every session: key -> Future of {"before", "after"} coordinates.

    A separate (spawned) process, not a thread: numba's first compile holds the GIL for ~40 s and would
    freeze every page of the server. The worker stays up, so later fits skip the compile.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    return {"pool": pool, "futures": {}}


def umap_future(args: tuple, data: dict, start: bool):
    """The UMAP job for these embedding arguments: None if never started (and `start` is False)."""
    jobs = _umap_jobs()
    fut = jobs["futures"].get(args)
    if fut is None and start:
        after = data["after"]["X"] if data["after"] is not None else None
        from grip_core.viz.embed import umap_coords

        fut = jobs["pool"].submit(umap_coords, data["before"]["X"], after)
        jobs["futures"][args] = fut
    return fut

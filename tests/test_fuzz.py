"""Property-based fuzzing of everything that reads user or on-disk input (issue P).

Invariant: a reader either returns a correct result, or raises a GripStudioError whose message is ONE line
naming the file (and the line, where there is one). Never another exception, never a silently dropped run.
Examples are bounded and derandomized, so the file runs in well under a minute and the same way in CI.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grip_core.data import QAExample, read_qa_file
from grip_core.grip import GRIPConfig
from grip_core.moe.errors import GripStudioError
from grip_core.runs import RunConfig, list_runs, load_run

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)
QA_KEYS = ["question", "answer", "text", "id", "domain", "entity", "paraphrased_question", "Question", " answer "]
rows = st.one_of(st.dictionaries(st.sampled_from(QA_KEYS), json_scalars, max_size=5), json_values)


def one_line_naming(exc: BaseException, name: str) -> None:
    msg = str(exc)
    assert isinstance(exc, GripStudioError), f"{type(exc).__name__}: {msg}"
    assert "\n" not in msg and "\r" not in msg, msg
    assert msg.startswith(name), (name, msg)


def check_examples(examples) -> None:
    assert examples
    for ex in examples:
        assert isinstance(ex, QAExample)
        assert (ex.question and ex.answer) or (not ex.question and ex.text), ex


def read(tmp: Path, suffix: str, data: bytes, name: str | None = None):
    path = tmp / f"file{suffix}"
    path.write_bytes(data)
    try:
        return read_qa_file(path, name=name)
    except Exception as exc:  # noqa: BLE001 - the property is about what escapes
        one_line_naming(exc, name or str(path))
        return None


# ----------------------------------------------------------------------------- data readers


@FUZZ
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".ndjson", ".txt"]), data=st.binary(max_size=300))
def test_readers_on_random_bytes(suffix, data):
    with tempfile.TemporaryDirectory() as tmp:
        out = read(Path(tmp), suffix, data)
        if out is not None:
            check_examples(out)


@FUZZ
@given(items=st.lists(rows, max_size=6), shape=st.sampled_from(["jsonl", "array", "data", "lines-as-json"]),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]), upload=st.booleans())
def test_readers_on_random_json_shapes(items, shape, encoding, upload):
    if shape == "jsonl":
        text, suffix = "".join(json.dumps(r) + "\n" for r in items), ".jsonl"
    elif shape == "array":
        text, suffix = json.dumps(items, indent=1), ".json"
    elif shape == "data":
        text, suffix = json.dumps({"data": items}), ".json"
    else:
        text, suffix = "\n".join(json.dumps(r) for r in items), ".json"
    try:
        raw = text.encode(encoding)
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        out = read(Path(tmp), suffix, raw, name="my upload" + suffix if upload else None)
        if out is not None:
            check_examples(out)
            good = [r for r in items if isinstance(r, dict)]
            assert len(out) <= max(len(items), 1) and good


@FUZZ
@given(header=st.lists(st.sampled_from(QA_KEYS + ["x", ""]), min_size=1, max_size=4),
       body=st.lists(st.lists(st.text(max_size=10), max_size=5), max_size=5), sep=st.sampled_from([",", "\t"]))
def test_readers_on_random_csv(header, body, sep):
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=sep)
    w.writerow(header)
    w.writerows(body)
    with tempfile.TemporaryDirectory() as tmp:
        out = read(Path(tmp), ".tsv" if sep == "\t" else ".csv", buf.getvalue().encode())
        if out is not None:
            check_examples(out)


def test_reader_sizes():
    """A big file and a huge field: read whole (or refused in one line), never a crash."""
    with tempfile.TemporaryDirectory() as tmp:
        big = "".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(20000))
        assert len(read(Path(tmp), ".jsonl", big.encode())) == 20000
        huge = "question,answer\n" + "q," + "a" * 300_000 + "\n"
        out = read(Path(tmp), ".csv", huge.encode())
        assert out is None or len(out[0].answer) == 300_000
        deep = "[" * 100_000 + "]" * 100_000
        assert read(Path(tmp), ".json", deep.encode()) is None


# ----------------------------------------------------------------------------- configs

RUN_FIELDS = [f for f in RunConfig.__dataclass_fields__]
GRIP_FIELDS = [f for f in GRIPConfig.__dataclass_fields__]


@FUZZ
@given(d=st.one_of(json_values, st.dictionaries(st.sampled_from(RUN_FIELDS + ["bogus"]), json_values, max_size=5),
                   st.dictionaries(st.sampled_from(RUN_FIELDS), json_scalars, max_size=6)))
def test_runconfig_from_json(d):
    d = json.loads(json.dumps(d))        # what a config file can hold
    try:
        config = RunConfig.from_dict(d)
    except GripStudioError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    assert isinstance(config.steps, int) and config.steps >= 0 and config.batch_size >= 1
    assert RunConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config     # round-trips


@FUZZ
@given(d=st.one_of(json_values, st.dictionaries(st.sampled_from(GRIP_FIELDS + ["bogus"]), json_values, max_size=5),
                   st.dictionaries(st.sampled_from(GRIP_FIELDS), json_scalars, max_size=6)))
def test_gripconfig_from_json(d):
    d = json.loads(json.dumps(d))
    try:
        config = GRIPConfig.from_dict(d)
    except GripStudioError as exc:
        assert "\n" not in str(exc), str(exc)
        return
    assert config.mode in ("update", "gradient", "off") and config.eps_null >= 0


# ----------------------------------------------------------------------------- the run store (and what viz reads)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One real run folder of the demo model (GRIP on, so grip_ranks.json exists too)."""
    from grip_core import load_model
    from grip_core.runs import run_unlearning

    root = tmp_path_factory.mktemp("runs")
    config = RunConfig.from_dict({"method": "ga", "steps": 2, "eval_every": 1, "eval_examples": 8,
                                  "final_eval_examples": 8, "batch_size": 8, "grip_fit_examples": 32})
    result = run_unlearning(load_model("demo"), config, runs_dir=root)
    assert result.status == "completed"
    return result.run_dir


RUN_FILES = ["config.json", "status.json", "metrics.jsonl", "summary.json", "grip_ranks.json"]


def corrupt(text: str, how: str, value, data: bytes, cut: int) -> bytes:
    if how == "bytes":
        return data
    if how == "truncate":
        return text.encode()[:cut % (len(text) + 1)]
    if how == "value":
        return json.dumps(value).encode()
    if how == "line":            # one more line in a JSON-lines file / a second document
        return (text + json.dumps(value) + "\n").encode()
    if how == "splice":
        b = text.encode()
        i = cut % (len(b) + 1)
        return b[:i] + data + b[i:]
    return b""


def read_like_the_dashboard(run) -> None:
    """What app/views/compare.py and viz do with a listed run."""
    from grip_core import viz

    name = viz.run_display_name(run.config, run.run_id)
    assert isinstance(name, str)
    if run.error:
        return
    viz.grip_mode(run.config)
    viz.run_layer_series(run.summary, run.config)
    logs = {name: viz.step_log_with_base(run.steps, run.summary)}
    viz.training_curves(logs)


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(RUN_FILES), how=st.sampled_from(["bytes", "truncate", "value", "line", "splice", "empty"]),
       value=json_values, data=st.binary(max_size=40), cut=st.integers(0, 10**6))
def test_run_store_under_corruption(real_run, target, how, value, data, cut):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run_dir = root / real_run.name
        shutil.copytree(real_run, run_dir)
        f = run_dir / target
        f.write_bytes(corrupt(f.read_text(), how, value, data, cut))
        runs = list_runs(root)
        assert len(runs) == 1, "a run folder vanished from the list"
        run = runs[0]
        try:
            loaded = load_run(run_dir)
        except Exception as exc:  # noqa: BLE001
            assert isinstance(exc, GripStudioError), f"{type(exc).__name__}: {exc}"
            assert "\n" not in str(exc) and str(run_dir / target) in str(exc), str(exc)
            assert run.state == "unreadable" and run.error == str(exc)
        else:
            assert run.error is None and loaded.config == run.config
        read_like_the_dashboard(run)

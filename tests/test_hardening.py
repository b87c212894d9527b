"""Issue P: the CLI, the run store and the dashboard against bad input (one regression test per item)."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grip_core import cli
from grip_core.moe.errors import ConfigError, GripStudioError, RunStoreError
from grip_core.runs import RunConfig, UnlearningData, list_runs, load_run
from grip_core.runs.commands import run_config_from_args

REPO = Path(__file__).resolve().parents[1]
SMALL_RUN = {"eval_examples": 8, "final_eval_examples": 8, "eval_every": 0, "batch_size": 8, "grip": {"mode": "off"}}


def cli_run(argv, tmp_path, timeout=240):
    """`python -m grip_core ...` in a subprocess, in tmp_path (so nothing lands in the repo)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("GRIP_STUDIO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "grip_core", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)


def run_args(argv):
    args = cli.build_parser().parse_args(argv)
    args.explicit = cli.explicit_flags(argv)
    return args


def write_qa(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


def one_line_error(out) -> str:
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return lines[-1]


# ----------------------------------------------------------------------------- 1 the config says what made the run


def test_run_config_file_drives_the_data(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"scenario": "entities", "seed": 7, **SMALL_RUN}))
    config, data = run_config_from_args(run_args(["run", "--config", str(cfg)]))
    assert (config.scenario, config.seed) == ("entities", 7)
    want = UnlearningData.from_scenario("entities", seed=7, retain_eval_size=8)
    assert data.name == "entities"
    assert [e.id for e in data.forget] == [e.id for e in want.forget]
    assert [e.id for e in data.retain_eval] == [e.id for e in want.retain_eval]
    # an explicit flag fills a field the file leaves out ...
    config, _ = run_config_from_args(run_args(["run", "--config", str(cfg), "--steps", "3"]))
    assert config.steps == 3
    # ... and contradicting the file is an error naming both
    with pytest.raises(ConfigError, match=r'--seed 3 conflicts with "seed": 7 in .*cfg.json'):
        run_config_from_args(run_args(["run", "--config", str(cfg), "--seed", "3"]))
    with pytest.raises(ConfigError, match="--forget-file conflicts"):
        run_config_from_args(run_args(["run", "--config", str(cfg), "--forget-file", "f.jsonl",
                                       "--retain-file", "r.jsonl"]))
    # the default (not given) --seed 0 does not override the file's 7
    assert run_config_from_args(run_args(["run", "--config", str(cfg), "--method", "ga"]))[0].seed == 7


def test_custom_files_are_recorded_with_hashes(tmp_path):
    forget = write_qa(tmp_path / "f.jsonl", [(f"forget q{i}?", f"a{i}") for i in range(8)])
    retain = write_qa(tmp_path / "r.jsonl", [(f"retain q{i}?", f"b{i}") for i in range(16)])
    config, data = run_config_from_args(run_args(["run", "--model", "demo", "--forget-file", str(forget),
                                                  "--retain-file", str(retain), "--steps", "1"]))
    assert config.scenario == "custom" and data.name == "custom"
    import hashlib

    assert config.data_files["forget"]["sha256"] == hashlib.sha256(forget.read_bytes()).hexdigest()
    assert config.data_files["retain"]["path"] == str(retain.resolve())
    # a saved custom config re-runs on the same files, and refuses files that changed since
    saved = tmp_path / "saved.json"
    saved.write_text(json.dumps(config.to_dict()))
    again, data2 = run_config_from_args(run_args(["run", "--config", str(saved)]))
    assert [e.question for e in data2.forget] == [e.question for e in data.forget]
    write_qa(forget, [("changed?", "x")] * 3)
    with pytest.raises(ConfigError, match="changed since the config was written"):
        run_config_from_args(run_args(["run", "--config", str(saved)]))


def test_run_refuses_data_that_contradicts_its_config(tmp_path):
    from grip_core import load_model
    from grip_core.runs import run_unlearning

    data = UnlearningData.from_scenario("entities", seed=0, retain_eval_size=8)
    with pytest.raises(ConfigError, match="misstate"):
        run_unlearning(load_model("demo"), RunConfig(scenario="domain", steps=0), data, runs_dir=tmp_path)
    assert not list(tmp_path.iterdir())          # refused before a folder was made


# ----------------------------------------------------------------------------- 2 the run store


def _fake_run(root: Path, name: str, **files) -> Path:
    """A run folder as RunWriter leaves it; keyword `status_json="..."` replaces status.json's text, etc."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"method": "ga", "label": name}))
    (d / "status.json").write_text(json.dumps({"status": "completed"}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    for key, text in files.items():
        stem, ext = key.rsplit("_", 1)
        (d / f"{stem}.{ext}").write_text(text)
    return d


def test_list_runs_flags_unreadable_runs(tmp_path):
    good = _fake_run(tmp_path, "20240101-a-good")
    _fake_run(tmp_path, "20240101-b-status-string", status_json='"completed"')
    _fake_run(tmp_path, "20240101-c-bare-int-line", metrics_jsonl='{"step": 1, "loss": 1.0}\n5\n')
    _fake_run(tmp_path, "20240101-d-bad-json", summary_json="{not json")
    torn = _fake_run(tmp_path, "20240101-e-torn", metrics_jsonl='{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    runs = {r.run_id: r for r in list_runs(tmp_path)}
    assert len(runs) == 5                                   # nothing silently dropped
    assert runs[good.name].state == "completed" and runs[torn.name].state == "completed"
    assert len(runs[torn.name].steps) == 1                  # a torn last line is still skipped
    for name, where in (("20240101-b-status-string", "status.json"), ("20240101-c-bare-int-line", "metrics.jsonl:2"),
                        ("20240101-d-bad-json", "summary.json")):
        r = runs[name]
        assert r.state == "unreadable" and where in r.error and "\n" not in r.error, r.error
        with pytest.raises(RunStoreError, match=where.replace(".", r"\.")):
            load_run(r.path)


def test_compare_page_lists_unreadable_runs(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _fake_run(tmp_path, "20240101-b-status-string", status_json='"completed"')
    _fake_run(tmp_path, "20240101-c-bare-int-line", metrics_jsonl="5\n")
    monkeypatch.setenv("GRIP_STUDIO_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(REPO / "app" / "main.py"), default_timeout=180).run()
    at.switch_page("views/compare.py").run()
    assert not at.exception, [e.value for e in at.exception]
    text = " ".join(m.value for m in at.markdown)
    assert "unreadable" in text and "status.json" in text and "metrics.jsonl:1" in text


# ----------------------------------------------------------------------------- 3 --steps 0


def test_steps_default_comes_from_runconfig_and_zero_means_zero(tmp_path):
    assert run_config_from_args(run_args(["run"]))[0].steps == RunConfig().steps
    assert run_config_from_args(run_args(["run", "--steps", "0"]))[0].steps == 0
    with pytest.raises(ConfigError, match="--steps must be >= 0"):
        run_config_from_args(run_args(["run", "--steps", "-1"]))


# ----------------------------------------------------------------------------- 4 + 8 (end to end, one real run)


def test_collapse_is_flagged_and_files_are_0644(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "ga", "steps": 2, "scope": {"kind": "all", "lr": 1e8}, **SMALL_RUN}))
    out = cli_run(["run", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs")], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "warning: the run collapsed: retain EM fell" in out.stderr
    (run,) = list_runs(tmp_path / "runs")
    assert run.summary["headline"]["collapsed"] is True and "retain EM" in run.summary["headline"]["collapse_reason"]
    umask = os.umask(0o022)
    os.umask(umask)
    for f in ("config.json", "status.json", "summary.json", "metrics.jsonl", "router_deltas.safetensors"):
        assert stat.S_IMODE((run.path / f).stat().st_mode) == 0o666 & ~umask, f


def test_collapse_check_numbers():
    from grip_core.runs.job import collapse_check

    assert collapse_check({"retain_em": 0.0, "base_retain_em": 0.9})["collapsed"] is True
    assert collapse_check({"retain_em": 0.8, "base_retain_em": 0.9})["collapsed"] is False
    assert collapse_check({"retain_em": 0.0, "base_retain_em": 0.05})["collapsed"] is False   # nothing to lose
    assert collapse_check({"retain_em": None, "base_retain_em": 0.9})["collapsed"] is None


# ----------------------------------------------------------------------------- 5 one line per failure


@pytest.mark.parametrize("argv, message", [
    (["compare", "--methods", ","], "--methods"),
    (["study", "--seeds", "abc"], "--seeds 'abc': 'abc' is not an integer"),
    (["trace", "--file", "x.jsonl", "--out", "."], "--out .: is a directory"),
    (["run", "--config", "list.json"], "list.json: expected a JSON object"),
    (["run", "--config", "badarg.json"], "unknown method_args of 'npo' field(s) ['bogus']"),
])
def test_cli_failures_are_one_line(tmp_path, argv, message):
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "badarg.json").write_text(json.dumps({"method": "npo", "method_args": {"bogus": 1}}))
    out = cli_run(argv, tmp_path, timeout=120)
    assert out.returncode == 2
    assert message in one_line_error(out)
    assert not (tmp_path / "runs").exists()


def test_cli_unwritable_out_names_the_path(tmp_path):
    (tmp_path / "afile").write_text("")
    targets = [tmp_path / "afile" / "t.json"]
    if os.geteuid() != 0:                   # root writes anywhere, so a read-only folder only binds others
        (tmp_path / "locked").mkdir(mode=0o500)
        targets.append(tmp_path / "locked" / "t.json")
    for target in targets:
        out = cli_run(["trace", "--file", "x.jsonl", "--out", str(target)], tmp_path, timeout=120)
        line = one_line_error(out)
        assert f"--out {target}" in line and ".tmp" not in line, line
    from grip_core.runs.store import atomic_write_json

    with pytest.raises(RunStoreError) as info:           # the writer itself names the path, never its temp file
        atomic_write_json(tmp_path / "afile" / "x.json", {})
    assert str(tmp_path / "afile" / "x.json") in str(info.value) and ".tmp" not in str(info.value)


def test_unexpected_exceptions_are_one_line_with_a_hint(capsys, monkeypatch):
    from grip_core.runs import commands

    def boom(args):
        raise AttributeError("boom")
    monkeypatch.setattr(commands, "cmd_trace", boom)
    assert cli.main(["trace", "--file", "x.jsonl"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unexpected AttributeError: boom") and "--debug" in err and "\n" not in err
    with pytest.raises(AttributeError):
        cli.main(["--debug", "trace", "--file", "x.jsonl"])


# ----------------------------------------------------------------------------- 7 memory


def test_a_10mb_line_is_cut_before_tokenising(tmp_path):
    from grip_core import load_model
    from grip_core.data import QAExample, encode_qa

    tok = load_model("demo").tokenizer
    words = ("alpha beta gamma delta " * 3000)[:60_000]
    ex = QAExample("x", words, "yes")
    full = tok(["Question: " + words], add_special_tokens=True)["input_ids"][0]
    batch = encode_qa(tok, [ex], max_length=64)
    assert batch["input_ids"][0].tolist() == full[:64]     # the same tokens as tokenising it whole
    huge = QAExample("y", "", "", text="word " * 2_000_000)   # 10 MB
    t0 = time.perf_counter()
    batch = encode_qa(tok, [huge], max_length=64)
    assert time.perf_counter() - t0 < 2.0 and batch["input_ids"].shape == (1, 64)


def test_dashboard_caps_concurrent_jobs(monkeypatch):
    import threading

    from app.lib import jobs
    from grip_core import load_model

    monkeypatch.setenv("GRIP_STUDIO_MAX_JOBS", "1")
    jobs._server_jobs.clear()
    gate = threading.Event()

    class Held(jobs.JobPair):          # a real JobPair whose work waits on the gate
        def _main(self):
            gate.wait(30)
    monkeypatch.setattr(jobs, "JobPair", Held)
    monkeypatch.setattr(jobs, "st", type("S", (), {"session_state": {}, "cache_resource": jobs.st.cache_resource})())
    moe = load_model("demo")
    first = jobs.start_pair(moe, threading.RLock(), None, {}, Path("."), "demo")
    with pytest.raises(jobs.JobsBusyError, match="GRIP_STUDIO_MAX_JOBS=1"):
        jobs.start_pair(moe, threading.RLock(), None, {}, Path("."), "demo")
    gate.set()
    first._thread.join(10)
    second = jobs.start_pair(moe, threading.RLock(), None, {}, Path("."), "demo")   # a slot is free again
    second._thread.join(10)


# ----------------------------------------------------------------------------- 8 smaller ones


def test_unknown_method_writes_nothing(tmp_path):
    out = cli_run(["run", "--method", "nosuch", "--runs-dir", str(tmp_path / "runs")], tmp_path, timeout=120)
    assert "unknown unlearning method 'nosuch'" in one_line_error(out)
    out = cli_run(["compare", "--methods", "ga,nosuch", "--runs-dir", str(tmp_path / "runs")], tmp_path, timeout=120)
    assert "nosuch" in one_line_error(out)
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_is_recorded_as_cancelled(tmp_path):
    from grip_core import load_model
    from grip_core.runs import run_unlearning

    def interrupt(row):
        raise KeyboardInterrupt
    config = RunConfig.from_dict({"method": "ga", "steps": 3, **SMALL_RUN})
    with pytest.raises(KeyboardInterrupt):
        run_unlearning(load_model("demo"), config, runs_dir=tmp_path, progress=interrupt)
    (run,) = list_runs(tmp_path)
    assert run.state == "cancelled" and "interrupted" in run.status["reason"]


def test_study_checks_the_model_before_creating_out_dir(tmp_path):
    out = cli_run(["study", "--model", str(tmp_path / "nomodel"), "--out-dir", str(tmp_path / "study")], tmp_path,
                  timeout=120)
    assert "nomodel" in one_line_error(out)
    assert not (tmp_path / "study").exists()


def test_identical_forget_and_retain_are_refused_partial_overlap_warned(tmp_path):
    rows = [(f"q{i}?", f"a{i}") for i in range(12)]
    same = write_qa(tmp_path / "f.jsonl", rows)
    write_qa(tmp_path / "r.jsonl", rows)
    with pytest.raises(GripStudioError, match="same 12 examples"):
        UnlearningData.from_files(same, tmp_path / "r.jsonl")
    write_qa(tmp_path / "r2.jsonl", rows[:3] + [(f"other{i}?", f"b{i}") for i in range(12)])
    with pytest.warns(UserWarning, match="3 of 12 forget examples are also in the retain set"):
        data = UnlearningData.from_files(same, tmp_path / "r2.jsonl")
    assert data.warnings


def test_upload_errors_name_the_file_not_the_temp_path():
    from app.lib.state import register_upload

    with pytest.raises(GripStudioError) as info:
        register_upload({"forget": ("my forget.jsonl", b'{"question": "q", "answer": "a"}\n{oops\n'),
                         "retain": ("r.jsonl", b'{"question": "q2", "answer": "b"}\n')})
    msg = str(info.value)
    assert msg.startswith("my forget.jsonl:2:") and "/tmp" not in msg


def test_compare_writes_its_table_beside_the_runs_and_prints_its_phases(tmp_path):
    out = cli_run(["compare", "--methods", "ga", "--grip-modes", "off", "--steps", "3", "--workers", "1",
                   "--log-every", "2", "--final-eval-examples", "8", "--runs-dir", str(tmp_path / "runs")], tmp_path,
                  timeout=300)
    assert out.returncode == 0, out.stderr
    tables = sorted(p.name for p in (tmp_path / "runs").glob("compare-*"))
    assert [t.rsplit(".", 1)[1] for t in tables] == ["csv", "json"]
    assert not list(tmp_path.glob("compare.*"))
    (run,) = list_runs(tmp_path / "runs")
    assert run.config["scenario"] == "domain" and run.config["model"] == "demo" and run.config["steps"] == 3
    # one stderr line per phase change, and a step line every 2 steps (step 1 opens the train phase)
    lines = [l for l in out.stderr.splitlines() if l.startswith("[ga/off]")]      # splitlines: tqdm's \r too
    assert [l.split(":")[0] for l in lines] == ["[ga/off] " + p for p in
                                                ("prepare", "fit", "train", "train", "final", "done")], out.stderr
    assert re.search(r"train: step 1 / 3 · loss -?\d+\.\d{3}$", lines[2]) and "step 2 / 3 · loss" in lines[3]
    assert lines[-1].endswith("3 steps · final probes done")


def test_dashboard_checkpoint_errors_do_not_reveal_paths(tmp_path):
    from app.lib.state import load_checkpoint
    from grip_core.moe.errors import ModelLoadError

    (tmp_path / "exists").mkdir()
    messages = []
    for p in (tmp_path / "missing", tmp_path / "exists", Path("/etc/passwd")):
        with pytest.raises(ModelLoadError) as info:
            load_checkpoint(str(p))
        messages.append(str(info.value).replace(str(p), "P"))
    assert len(set(messages)) == 1 and "not a readable checkpoint directory" in messages[0]


def test_remote_code_checkpoint_is_refused_in_one_clear_line(tmp_path):
    """Item 6: a checkpoint whose architecture ships its own code is refused without pointing at an option that
    does not exist (no "trust_remote_code=True" advice, no URL made from a local path)."""
    import json

    from grip_core import load_model
    from grip_core.moe.errors import ModelLoadError
    from grip_core.moe.tiny import build_tiny_model

    d = tmp_path / "custom"
    build_tiny_model("olmoe").save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="my_secret_moe", architectures=["MySecretMoeForCausalLM"],
               auto_map={"AutoConfig": "configuration_secret.SecretConfig",
                         "AutoModelForCausalLM": "modeling_secret.SecretForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(d)
    msg = str(err.value)
    assert "ships its own model code" in msg and "never runs code" in msg, msg
    assert "trust_remote_code=True" not in msg and "https://" not in msg and "\n" not in msg


def test_save_weights_flag_with_a_config_file_sets_both_fields(tmp_path):
    """`run --config FILE --save-weights full` records save_weights and weights_format; a clash is refused."""
    import json

    from grip_core.cli import build_parser
    from grip_core.moe.errors import ConfigError
    from grip_core.runs.commands import run_config_from_args

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"method": "ga", "steps": 1}))
    args = build_parser().parse_args(["run", "--config", str(cfg), "--save-weights", "full"])
    config, _ = run_config_from_args(args)
    assert config.save_weights is True and config.weights_format == "full"
    cfg.write_text(json.dumps({"method": "ga", "steps": 1, "weights_format": "delta"}))
    with pytest.raises(ConfigError, match="--save-weights full conflicts"):
        run_config_from_args(build_parser().parse_args(["run", "--config", str(cfg), "--save-weights", "full"]))

"""The project installs: `pip install -e .` and `pip install .` into a fresh venv, then grip_core works from
any other folder (the demo model and world included) and the `grip-studio` console script runs.

To stay fast and offline, the fresh venv does not reinstall torch & co.: a .pth file makes the running
interpreter's site-packages visible to it (appended after the venv's own, whose .pth files are not run),
and pip installs only this project with `--no-deps --no-build-isolation --no-index` (setuptools comes from
those shared site-packages). So the test cannot pass by accident, it asserts where grip_core was imported
from: the checkout for the editable install, the fresh venv's own site-packages (with the packaged data,
and the checkout nowhere on sys.path) for the regular one.

The in-tree build leaves build/ and grip_studio.egg-info/ in the repo; those the test created are removed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_LEFTOVERS = ["build", "grip_studio.egg-info"]

pytestmark = pytest.mark.timeout(300)

# Run inside the fresh venv, from a folder outside the repo; prints one JSON line.
PROBE = r'''
import json, subprocess, sys, sysconfig
from pathlib import Path
import grip_core
from grip_core import _paths
from grip_core.data import load_demo_world

moe = grip_core.load_model("demo")
world = load_demo_world("domain")
bindir = Path(sysconfig.get_path("scripts"))
help_ = subprocess.run([str(bindir / "grip-studio"), "--help"], capture_output=True, text=True)
Path("probe.jsonl").write_text('{"question": "Q?", "answer": "A"}\n')
bad = subprocess.run([str(bindir / "grip-studio"), "trace", "--model", "no-such-model-dir", "--file", "probe.jsonl"],
                     capture_output=True, text=True)
print("PROBE " + json.dumps({
    "file": grip_core.__file__, "purelib": sysconfig.get_path("purelib"), "sys_path": sys.path,
    "data_dir": str(_paths.DATA_DIR), "demo_model_dir": str(_paths.DEMO_MODEL_DIR), "runs_dir": str(_paths.DEFAULT_RUNS_DIR),
    "num_moe_layers": len(moe.layers), "forget": len(world.forget), "retain": len(world.retain),
    "help_rc": help_.returncode, "help": help_.stdout, "bad_rc": bad.returncode, "bad_err": bad.stderr,
}))
'''


def _shared_site_dirs() -> list[str]:
    dirs = [*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def _run(cmd, cwd, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def clean_repo():
    """Remove the build leftovers this test creates in the repo (not ones that were there before)."""
    existed = {name for name in BUILD_LEFTOVERS if (ROOT / name).exists()}
    yield
    for name in BUILD_LEFTOVERS:
        if name not in existed:
            shutil.rmtree(ROOT / name, ignore_errors=True)


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
def test_install_into_fresh_venv(tmp_path, editable, clean_repo):
    t0 = time.perf_counter()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    py = venv / "bin" / "python"
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path).stdout.strip())
    assert purelib.is_dir() and venv.resolve() in purelib.resolve().parents
    (purelib / "_grip_test_shared_site.pth").write_text("\n".join(_shared_site_dirs()) + "\n")

    _run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          *(["-e"] if editable else []), ROOT], cwd=ROOT)
    t_install = time.perf_counter() - t0

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "probe.py").write_text(PROBE)
    out = _run([py, "probe.py"], cwd=elsewhere).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("PROBE "))
    r = json.loads(line[len("PROBE "):])

    file, data_dir = Path(r["file"]).resolve(), Path(r["data_dir"]).resolve()
    if editable:
        assert file == ROOT / "grip_core" / "__init__.py", r["file"]
        assert data_dir == ROOT / "data", r["data_dir"]        # the checkout's data/, not a copy
        assert Path(r["runs_dir"]).resolve() == ROOT / "runs"
    else:
        site_pkgs = Path(r["purelib"]).resolve()
        assert file == site_pkgs / "grip_core" / "__init__.py", f"not imported from the new venv: {r['file']}"
        assert data_dir == site_pkgs / "grip_core" / "_data", r["data_dir"]
        assert (data_dir / "demo_model" / "model.safetensors").is_file()
        venv = (ROOT / ".venv").resolve()      # the borrowed dependencies may live in the checkout's .venv
        in_repo = [p for p in r["sys_path"] if p and (Path(p).resolve() == ROOT or ROOT in Path(p).resolve().parents)
                   and venv not in Path(p).resolve().parents and Path(p).resolve() != venv]
        assert not in_repo, f"the checkout is on the installed venv's sys.path: {in_repo}"
        assert r["runs_dir"] == "runs"                          # ./runs, never inside site-packages
    assert Path(r["demo_model_dir"]).resolve() == data_dir / "demo_model"
    assert r["num_moe_layers"] == 4
    assert r["forget"] > 0 and r["retain"] > 0
    assert r["help_rc"] == 0 and r["help"].startswith("usage: grip-studio"), r["help"]
    # the console script's exit code is cli.main()'s return value (2: a missing model directory)
    assert r["bad_rc"] == 2 and "model path does not exist" in r["bad_err"], (r["bad_rc"], r["bad_err"])
    print(f"{'editable' if editable else 'regular'}: install {t_install:.1f} s, total {time.perf_counter() - t0:.1f} s")


def test_pyproject_lists_every_subpackage():
    """pyproject.toml lists packages explicitly (only grip_core ships): a new subpackage must be added there."""
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "grip_core").rglob("__init__.py")
               if "__pycache__" not in p.parts}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert on_disk == {p for p in listed if not p.startswith("grip_core._data")}
    data = PYPROJECT["tool"]["setuptools"]["package-dir"]
    assert {p for p in listed if p.startswith("grip_core._data")} == set(data)
    assert all((ROOT / d).is_dir() for d in data.values())


def _requirements(path: Path) -> dict[str, str]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name = re.match(r"[A-Za-z0-9_.\-]+", line).group(0).lower()
            reqs[name] = line
    return reqs


def test_pyproject_dependencies_mirror_requirements():
    """Same packages and bounds as requirements*.txt; only torch differs (a floor here, the CPU pin there)."""
    runtime, deps = _requirements(ROOT / "requirements.txt"), _requirements_list(PYPROJECT["project"]["dependencies"])
    assert set(runtime) == set(deps)
    assert {k: v for k, v in runtime.items() if k != "torch"} == {k: v for k, v in deps.items() if k != "torch"}
    assert runtime["torch"] == "torch==2.13.0" and deps["torch"].startswith("torch>=")
    test = _requirements(ROOT / "requirements-test.txt")
    assert test == _requirements_list(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert PYPROJECT["project"]["scripts"]["grip-studio"] == "grip_core.cli:main"


def _requirements_list(lines: list[str]) -> dict[str, str]:
    return {re.match(r"[A-Za-z0-9_.\-]+", s).group(0).lower(): s for s in lines}

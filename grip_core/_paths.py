"""Where grip_core finds its shipped data (demo model, demo world) and its default runs folder.

The demo model and world live ONCE in git, in the repo's `data/demo_model/` and `data/world/`, and are
found in either of the two ways the project is used:

- source checkout or editable install (`pip install -e .`, which the README's scripts do into .venv):
  grip_core is imported from the checkout and reads `<repo>/data/` next to it;
- regular install (`pip install .` or a wheel): pyproject.toml maps `data/demo_model` and `data/world`
  into the package as `grip_core/_data/demo_model` and `grip_core/_data/world` (and `demo_fine_model`; setuptools
  `package-dir` + `package-data`, copied at build time, not in git), so `load_model("demo")` and
  `load_demo_world()` work from site-packages in any working directory.

DATA_DIR is the first of `grip_core/_data/` (installed copy) and `<repo>/data/` (checkout) that exists.
Runs go to `<repo>/runs/` in a checkout, and to `runs/` under the current directory otherwise (never
into site-packages).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The folder holding grip_core/: the repo in a checkout / editable install, site-packages otherwise.
REPO_ROOT = PACKAGE_DIR.parent
IN_CHECKOUT = (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "data").is_dir()

_INSTALLED_DATA = PACKAGE_DIR / "_data"
DATA_DIR = _INSTALLED_DATA if _INSTALLED_DATA.is_dir() else REPO_ROOT / "data"
DEMO_MODEL_DIR = DATA_DIR / "demo_model"
DEMO_FINE_MODEL_DIR = DATA_DIR / "demo_fine_model"    # the Qwen2-MoE demo: 32 fine-grained experts + a shared one
# The names load_model accepts for the shipped demos (anything else is a local directory).
DEMO_MODELS = {"demo": DEMO_MODEL_DIR, "demo-fine": DEMO_FINE_MODEL_DIR}
WORLD_DIR = DATA_DIR / "world"
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" if IN_CHECKOUT else Path("runs")

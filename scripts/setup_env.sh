#!/usr/bin/env bash
# Create or refresh .venv at the repo root; skip pip when the requirements are unchanged.
# Usage: scripts/setup_env.sh [runtime|test]
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-runtime}"
req=requirements.txt
[ "$kind" = test ] && req=requirements-test.txt
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $py"
  "$py" -m venv .venv
fi
stamp=".venv/.installed-$kind"
want="$(cat requirements.txt "$req" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing $req into .venv (torch is pinned to the CPU build)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  echo "$want" > "$stamp"
fi
# The project itself, editable, so that the notebooks and your own scripts import this checkout's
# grip_core from anywhere. --no-deps: the requirements above are the environment. Redone when pyproject.toml
# or the checkout's location changes.
estamp=".venv/.installed-editable"
ewant="$(sha256sum pyproject.toml | cut -d' ' -f1) $PWD"
if [ "$(cat "$estamp" 2>/dev/null)" != "$ewant" ]; then
  echo "installing grip_core into .venv in editable mode (pip install -e .)"
  iso=""   # setuptools is in .venv (torch requires it): build offline with it
  .venv/bin/python -c "import setuptools" 2>/dev/null && iso="--no-build-isolation"
  .venv/bin/python -m pip install -q --no-deps $iso -e .
  echo "$ewant" > "$estamp"
fi
if [ "$kind" = test ] && ! command -v chromium >/dev/null; then
  echo "installing Debian's chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi

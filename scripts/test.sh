#!/usr/bin/env bash
# README command (b): create/refresh .venv, install, run the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh test
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "ERROR: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# README command (a): create/refresh .venv, install, open the dashboard on the embedded demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh runtime
# headless unless run from a terminal: without one, Streamlit's first-run e-mail prompt would stop the server
if [ -t 0 ]; then default_headless=false; else default_headless=true; fi
exec .venv/bin/python -m streamlit run app/main.py --server.address 127.0.0.1 --server.port "${PORT:-8501}" \
  --server.headless "${HEADLESS:-$default_headless}" --browser.gatherUsageStats false "$@"

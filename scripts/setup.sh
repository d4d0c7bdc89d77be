#!/usr/bin/env bash
# Set up openk2 in a project-local virtualenv (.venv). Idempotent; safe to re-run.
#   bash scripts/setup.sh          the package with what its commands need (train, serve, chat, agent)
#   bash scripts/setup.sh --dev    also the test dependencies (pytest, transformers for parity tests)
# torch==2.13.0 is installed first and alone: it is a CPU build available locally, while any other
# torch request resolves to a CUDA build of several GB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras="[server,agent]"
[[ "${1:-}" == "--dev" ]] && extras="[server,agent,dev]"
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
.venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip install torch==2.13.0
pip install -e ".${extras}"
.venv/bin/python -c "import openk2, torch; print(f'openk2 {openk2.__version__} ready (torch {torch.__version__})')"

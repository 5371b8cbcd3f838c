#!/usr/bin/env bash
# Compile every csrc/*.cu with the local nvcc for sm_80 and sm_90 (CI; no GPU needed).
# Exit 1 on a compile error, 2 when nvcc is missing. Extra arguments go to the checker.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" -m pdxfer.pack.compile_check "$@"

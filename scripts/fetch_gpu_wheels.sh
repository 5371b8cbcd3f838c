#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the Python 3.12 wheels that bench/gpu_check.sh needs
# on the nvidia-h200 device image, which has torch, CuPy, uvloop, xxhash and pytest but
# not these, and cannot fetch anything itself. Run it here before a device session:
#
#   bash scripts/fetch_gpu_wheels.sh
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# Versions follow this machine's .venv where it has the package, so both ends run the
# same code. Exit 1 if a wheel cannot be found, naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
version() { "$PY" -m pip show "$1" 2>/dev/null | awk '/^Version:/{print $2}'; }
platforms=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
for name in nixl nixl-cu13 pyzmq msgspec structlog pytest-asyncio; do
  v=$(version "$name")
  spec=$name${v:+==$v}
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "$spec" 2>/tmp/fetch_gpu_wheels.err; then
    echo "fetch_gpu_wheels: no Python 3.12 wheel for $spec (pip said: $(tail -1 /tmp/fetch_gpu_wheels.err))" >&2
    exit 1
  fi
done
du -sh .whl
ls .whl

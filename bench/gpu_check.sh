#!/usr/bin/env bash
# The device session's one prepared check (nvidia-h200 image: torch, CuPy, nvcc, uvloop,
# xxhash, pytest are there; nixl, nixl-cu13, pyzmq, msgspec, structlog and pytest-asyncio
# are not, and nothing can be fetched there). Carry them as wheels in .whl/ (ignored by
# git, so a fresh checkout has none; python 3.12 builds of nixl, nixl-cu13, pyzmq,
# msgspec, structlog and pytest-asyncio, ~58 MB), then:
#
#   bash scripts/fetch_gpu_wheels.sh
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# It runs every GPU test (pack kernels, devsum, VRAM regions and chunks over NIXL, the
# VRAM bench's JSON), the VRAM-to-VRAM bench, and the host-memory (DRAM) NIXL bench of
# issue 3 on that machine's 16 cores (on the 2-vCPU dev host, hashing every byte on both
# ends competes with the copy for the same cores), and leaves at most 7 files in $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/pdxfer-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing the carried wheels failed" | tee "$OUT/gpu.txt"; exit 3; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
{
  nvidia-smi -L
  python3 -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cupy', cupy.__version__)"
  python3 -c "import nixl._api; print('nixl imports')"
  ls -l /dev/nvidiactl /dev/nvidia0 2>&1
} 2>&1 | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -o timeout=240 \
  tests/pack tests/engine/test_vram_gpu.py tests/bench/test_transfer_bench.py tests/plugins/test_vllm_worker_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log"
timeout 120 python3 -m pdxfer --log-level warning bench transfer --backend nixl --device cuda \
  --chunk-size 2MiB --chunk-size 16MiB --pairs 5 --verified-baseline --json 2>"$OUT/bench_vram.err" | tee "$OUT/bench_vram.jsonl"
timeout 70 python3 -m pdxfer --log-level warning bench transfer --backend nixl \
  --chunk-size 2MiB --pairs 5 --verified-baseline --json 2>"$OUT/bench_dram.err" | tee "$OUT/bench_dram.jsonl"
echo "gpu_check: done"

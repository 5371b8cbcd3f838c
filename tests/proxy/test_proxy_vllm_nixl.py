"""The sequential flow with vLLM's stock NixlConnector moving the KV (CPU buffer, UCX over
TCP on loopback): output through the proxy equals the decode server's own greedy output.

Slow (each disaggregated request takes tens of seconds on a small CPU box), so marked
``slow`` as well as ``vllm``; skips when ``nixl`` is not importable by the vLLM
interpreter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vllm_support.fixtures import TIMINGS
from vllm_support.servers import SERVED_MODEL_NAME, ProxyProcess, VllmServer, free_port, module_available

openai = pytest.importorskip("openai")

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900),
    # vLLM's own NixlConnector: its handshake timeout kills the decode engine in some runs
    # here (seen in 1 of 3 runs by the brief, and in a fresh-clone CI run of ours).
    pytest.mark.skipif(os.environ.get("PDXFER_RUN_FLAKY") != "1",
                       reason="vLLM NixlConnector is flaky on this CPU; opt in with PDXFER_RUN_FLAKY=1"),
]

def _kv_config(role: str) -> str:
    return json.dumps({"kv_connector": "NixlConnector", "kv_role": role, "kv_buffer_device": "cpu"})


def _nixl_env() -> dict[str, str]:
    return {
        "UCX_TLS": "tcp,self,sm",
        "UCX_NET_DEVICES": "lo",
        "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()),
    }


@pytest.fixture(scope="module")
def nixl_workers(vllm_python_path: str, tiny_model_dir: Path, vllm_log_dir: Path) -> Iterator[dict[str, VllmServer]]:
    ok, why = module_available(vllm_python_path, "nixl")
    if not ok:
        pytest.skip(why)
    servers = {
        role: VllmServer(f"vllm-nixl-{role}", tiny_model_dir, log_dir=vllm_log_dir, python=vllm_python_path,
                         extra_args=["--kv-transfer-config", _kv_config(kv_role)], env=_nixl_env())
        for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer"))
    }
    try:
        t0 = time.monotonic()
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready()
        TIMINGS["nixl workers ready (s, 2 in parallel)"] = round(time.monotonic() - t0, 1)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


def test_nixl_sequential_flow_equals_single_instance(nixl_workers: dict[str, VllmServer], vllm_log_dir: Path) -> None:
    p, d = nixl_workers["prefill"], nixl_workers["decode"]
    kw = {"model": SERVED_MODEL_NAME, "prompt": "the kv cache moves from prefill to decode", "max_tokens": 16, "temperature": 0}
    direct = openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0, timeout=300)
    want = direct.completions.create(**kw)
    proxy = ProxyProcess("proxy-nixl", [p.url], [d.url], log_dir=vllm_log_dir,
                         extra_args=["--prefill-timeout", "300", "--decode-timeout", "300", "--first-token-timeout", "300",
                                     "--read-timeout", "300"])
    try:
        proxy.start()
        proxy.wait_ready()
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=300)
        t0 = time.monotonic()
        got = client.completions.create(**kw)
        TIMINGS["nixl disaggregated request, non-stream (s)"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        TIMINGS["nixl disaggregated request, stream (s)"] = round(time.monotonic() - t0, 1)
    finally:
        proxy.stop()
    assert got.choices[0].text == want.choices[0].text
    assert got.usage.completion_tokens == want.usage.completion_tokens
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want.usage.completion_tokens

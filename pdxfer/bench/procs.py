"""Start helper processes for benches and tests, and always end them by pid."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Sequence


class ChildProcess:
    """A child that prints one JSON line when ready; killed (by pid) on close."""

    def __init__(self, argv: Sequence[str], *, ready_timeout: float = 30.0, env: dict | None = None) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.pid = self.proc.pid
        self.stray: list[str] = []
        try:
            self.info: dict[str, Any] = self._read_json(ready_timeout)
        except BaseException:
            self.kill()
            raise

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.pid} printed nothing within {timeout}s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"child {self.pid} exited with {self.proc.wait(5)} before it was ready")
                return line

    def _read_json(self, timeout: float) -> dict[str, Any]:
        """The next line that is a JSON object: libraries the child loads (NIXL, UCX) may
        print lines of their own to stdout, e.g. when a peer disconnects."""
        deadline = time.monotonic() + timeout
        while True:
            line = self._readline(max(0.001, deadline - time.monotonic()))
            try:
                obj = json.loads(line)
            except ValueError:
                self.stray = (self.stray + [line.rstrip()])[-20:]  # someone else's line: kept to show
                continue
            if isinstance(obj, dict):
                return obj

    def stop(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """Ask politely (SIGTERM), read its final JSON line, and kill if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            final = self._read_json(timeout)
            self.proc.wait(timeout)
            return final
        except (TimeoutError, RuntimeError, ValueError, subprocess.TimeoutExpired):
            return None
        finally:
            self.kill()

    def finish(self, timeout: float = 15.0) -> dict[str, Any] | None:
        """For children that exit when their stdin closes: close it, read the final JSON
        line, and kill if it lingers."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            final = self._read_json(timeout)
            self.proc.wait(timeout)
            return final
        except (TimeoutError, RuntimeError, ValueError, subprocess.TimeoutExpired, OSError):
            return None
        finally:
            self.kill()

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now, for a child that must bind a known one (and rebind it after a restart)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def receiver_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "pdxfer", "--log-level", "warning", "receiver", "--exit-on-stdin-eof", *extra]

"""One NIXL agent (UCX backend) behind a lock, with a teardown that cannot crash the process.

Why a wrapper instead of `nixl_agent` directly:

- **No NIXL progress thread.** The Python binding creates its progress thread with
  `pthrDelay = 0`, i.e. `poll(timeout=0)` in a loop: a full core even when idle, which on
  a 2-core host halved WRITE throughput. Agents here are created with
  `enable_prog_thread=False`; `nixl_progress.NixlProgress` drives them instead, and only
  while something is outstanding.
- **One lock.** Without its progress or listener thread an agent runs with
  `NIXL_THREAD_SYNC_NONE`, so the UCX worker must never be entered from two threads at
  once. The event loop posts WRITEs and registers memory; the progress thread polls
  transfer states and notifications. Every call below holds `self.lock` (the binding
  releases the GIL inside, so the other thread keeps running Python meanwhile).
- **Safe teardown.** After a peer dies mid-transfer, destroying the agent without one
  more worker progress call aborts the process in UCX (`arbiter.c:36 Assertion
  ucs_arbiter_group_is_empty(group) failed`, SIGABRT, every run, with the `cma`
  transport; no ibverbs packages installed). `close()` releases handles, progresses the
  worker, forgets remote agents, deregisters, progresses again and only then drops the
  agent; an `atexit` hook does the same for agents nobody closed.
- **Environment.** UCX reads `UCX_*` when the agent's backend is created. Defaults for a
  single host are filled in only where neither the caller's environment nor the
  config set them, and NIXL's Python logger (INFO lines on *stdout*, which would corrupt
  the JSON-line protocol of `pdxfer receiver`) is moved to stderr at WARNING.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Any, Mapping

import structlog

log = structlog.get_logger("pdxfer.nixl")

# Loopback defaults. `sm` brings `cma` (process_vm_writev: the one-copy path between two
# processes on a host), which carries the WRITEs; `tcp` must stay in the list here (with
# only sm/cma, creating the UCX backend fails), and it carries the notifications: with
# UCX_PROTO_INFO=y, UCX picks "zero-copy cma/memory" for ucp_put and "tcp/lo" for every
# active message, also with posix or sysv named explicitly. The reason is NIXL's UCX
# backend parameter `ucx_error_handling_mode` ("peer" by default): UCX keeps active
# messages off the shared-memory transports when it must report a peer's failure. With
# "none" they go over sysv/memory and bare 256 KiB WRITEs ran 4.48 against 1.90 GB/s here
# (2 MiB: 5.61 against 5.32), but the 2 MiB bench ratio did not move (raw and pdxfer gained
# alike) and a peer's SIGKILL left a UCX request unreturned (a WARN at exit): we keep "peer",
# which is what turns a dead receiver into nixlRemoteDisconnectError. On a cluster set UCX_TLS
# and UCX_NET_DEVICES in the environment (or `ucx=` in the config); they win.
# Where a GPU is present, `cuda_copy` (host<->device staging) and `cuda_ipc` (GPU to GPU on
# one node) are added so VRAM regions and chunks have a transport.
UCX_DEFAULTS: dict[str, str] = {"UCX_TLS": "tcp,self,sm", "UCX_NET_DEVICES": "lo"}
_CUDA_TLS = ",cuda_copy,cuda_ipc"


def _has_nvidia_gpu() -> bool:
    """Cheap (no CUDA init, no torch import): the driver's device node exists."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")
_IMPORT_ERROR: str | None = None
_api: Any = None


def _load() -> Any:
    """Import NIXL once (it picks its CUDA 12/13 build at import); None if it is missing."""
    global _api, _IMPORT_ERROR
    if _api is not None or _IMPORT_ERROR is not None:
        return _api
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    try:
        from nixl import _api as api  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or a broken CUDA build that fails on import
        _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
        return None
    nlog = logging.getLogger("nixl")
    if "NIXL_LOG_LEVEL" not in os.environ or os.environ["NIXL_LOG_LEVEL"] == "WARN":
        nlog.setLevel(logging.WARNING)
    for h in nlog.handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stdout:
            h.setStream(sys.stderr)
    _api = api
    return api


def available() -> bool:
    return _load() is not None


def unavailable_reason() -> str:
    _load()
    return _IMPORT_ERROR or ""


def apply_ucx_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Fill in UCX settings before an agent is created; returns the effective UCX_* values.

    Precedence: the process environment (what the operator set) > `overrides` (config) >
    `UCX_DEFAULTS`. Values are only ever added to the environment, never replaced."""
    defaults = dict(UCX_DEFAULTS)
    if _has_nvidia_gpu():
        defaults["UCX_TLS"] += _CUDA_TLS
    for key, value in {**defaults, **(overrides or {})}.items():
        if not key.startswith("UCX_"):
            raise ValueError(f"UCX setting {key!r} must start with UCX_")
        os.environ.setdefault(key, str(value))
    return {k: v for k, v in os.environ.items() if k.startswith("UCX_")}


class NixlError(RuntimeError):
    """NIXL could not be loaded or an agent call failed outright."""


_live: "weakref.WeakSet[NixlAgent]" = weakref.WeakSet()


class NixlAgent:
    """A NIXL agent with the UCX backend, no NIXL threads, every call under `lock`."""

    def __init__(self, name: str, ucx: Mapping[str, str] | None = None) -> None:
        api = _load()
        if api is None:
            raise NixlError(f"nixl is not importable: {_IMPORT_ERROR}")
        self.ucx_env = apply_ucx_env(ucx)
        self.name = name
        self.lock = threading.Lock()
        cfg = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=["UCX"])
        try:
            self._agent: Any = api.nixl_agent(name, cfg)
        except Exception as exc:
            raise NixlError(f"NIXL agent {name} could not be created: {exc!r}") from None
        if "UCX" not in self._agent.backends:
            raise NixlError(f"NIXL agent {name}: UCX backend did not start (UCX_TLS={os.environ.get('UCX_TLS')};"
                            " it must include tcp on hosts without RDMA)")
        self._regs: list[Any] = []
        self._remotes: set[str] = set()
        self._leaked: list[Any] = []
        self.closed = False
        _live.add(self)

    # ------------------------------------------------------------------ setup (any thread)
    def metadata(self) -> bytes:
        with self.lock:
            return bytes(self._agent.get_agent_metadata())

    def register(self, addr: int, nbytes: int, mem: str = "DRAM", dev: int = 0) -> Any:
        """Register [addr, addr+nbytes) of host ("DRAM") or GPU `dev` ("VRAM") memory with
        UCX; returns the handle for deregister()."""
        with self.lock:
            self._check_open()
            reg = self._agent.register_memory([(addr, nbytes, dev, "")], mem)
            self._regs.append(reg)
            return reg

    def deregister(self, reg: Any) -> None:
        with self.lock:
            if self.closed:
                return
            self._regs.remove(reg)
            try:
                self._agent.deregister_memory(reg)
            except Exception as exc:
                log.warning("nixl_deregister_failed", agent=self.name, error=repr(exc))

    def add_remote(self, metadata: bytes) -> str:
        with self.lock:
            self._check_open()
            name = self._agent.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._remotes.add(name)
            return name

    def remove_remote(self, name: str) -> None:
        with self.lock:
            if self.closed or name not in self._remotes:
                return
            self._remotes.discard(name)
            self._progress_locked(2)  # let UCX finish an endpoint's error handling first
            try:
                self._agent.remove_remote_agent(name)
            except Exception as exc:
                log.debug("nixl_remove_remote_failed", agent=self.name, remote=name, error=repr(exc))

    # ------------------------------------------------------------------ data path
    def post_write(self, segments: list[tuple[int, int, int]], remote: str, notif: bytes,
                   local_mem: tuple[str, int] = ("DRAM", 0),
                   remote_mem: tuple[str, int] = ("DRAM", 0)) -> tuple[Any, str, str]:
        """One-sided WRITE of (local_addr, remote_addr, nbytes) segments as one request,
        with one notification delivered after all of them: (handle or None, state, error).
        `local_mem` / `remote_mem`: (memory kind, device id) of every local / remote segment.

        state "DONE": finished during the post (shared-memory/cma copies are synchronous)
        and the handle is already released; "PROC": poll `handle`; "ERR": failed, released."""
        with self.lock:
            if self.closed:
                return None, "ERR", "NIXL agent is closed"
            a = self._agent
            try:
                (lk, ld), (rk, rd) = local_mem, remote_mem
                h = a.initialize_xfer("WRITE", a.get_xfer_descs([(la, n, ld) for la, _, n in segments], lk),
                                      a.get_xfer_descs([(ra, n, rd) for _, ra, n in segments], rk), remote, notif)
            except Exception as exc:
                return None, "ERR", _describe(exc)
            try:
                state = a.transfer(h)
            except Exception as exc:  # nixlRemoteDisconnectError and friends
                self._release_locked(h)
                return None, "ERR", _describe(exc)
            if state == "PROC":
                return h, state, ""
            self._release_locked(h)
            return None, state, "" if state == "DONE" else "transfer posted with state ERR"

    def poll(self, handles: list[Any], want_notifs: bool) -> tuple[list[tuple[Any, str]], dict[str, list[bytes]]]:
        """Advance UCX once: states of finished handles (released here) and new notifications."""
        finished: list[tuple[Any, str]] = []
        notifs: dict[str, list[bytes]] = {}
        with self.lock:
            if self.closed:
                return [(h, "ERR") for h in handles], notifs
            a = self._agent
            if want_notifs or not handles:
                try:
                    notifs = a.get_new_notifs()  # also progresses the worker
                except Exception as exc:
                    log.warning("nixl_notifs_failed", agent=self.name, error=repr(exc))
            for h in handles:
                try:
                    state = a.check_xfer_state(h)
                except Exception:
                    state = "ERR"
                if state != "PROC":
                    self._release_locked(h)
                    finished.append((h, state))
        return finished, notifs

    def notify(self, remote: str, msg: bytes) -> bool:
        """A notification not bound to a WRITE (needs `remote`'s metadata loaded)."""
        with self.lock:
            if self.closed:
                return False
            try:
                self._agent.send_notif(remote, msg)
                return True
            except Exception as exc:
                log.debug("nixl_notify_failed", agent=self.name, remote=remote, error=repr(exc))
                return False

    def release(self, handle: Any) -> None:
        """Give up on an in-flight handle (cancels it where UCX can)."""
        with self.lock:
            if not self.closed:
                self._release_locked(handle)

    def _release_locked(self, h: Any) -> None:
        try:
            h.release()
        except Exception as exc:  # still in flight and not cancellable: keep it until close
            log.debug("nixl_release_deferred", agent=self.name, error=repr(exc))
            self._leaked.append(h)

    def _progress_locked(self, rounds: int) -> None:
        for _ in range(rounds):
            try:
                self._agent.get_new_notifs()
            except Exception:
                return

    def _check_open(self) -> None:
        if self.closed:
            raise NixlError(f"NIXL agent {self.name} is closed")

    # ------------------------------------------------------------------ teardown
    def close(self, lock_timeout: float = 5.0) -> None:
        """Tear down in the only order that survives a dead peer (see the module docstring)."""
        if not self.lock.acquire(timeout=lock_timeout):
            # Another thread is inside a UCX call that does not return: destroying the agent
            # under it would crash; leaving it is the lesser evil (logged).
            log.error("nixl_agent_close_skipped", agent=self.name, waited_s=lock_timeout)
            return
        try:
            if self.closed:
                return
            self.closed = True
            agent, self._agent = self._agent, None
            for h in self._leaked:
                try:
                    h.release()
                except Exception as exc:  # teardown goes on; the handle dies with the agent
                    log.debug("nixl_handle_release_failed", agent=self.name, error=repr(exc))
            self._leaked.clear()
            _progress(agent, 5)
            for name in list(self._remotes):
                try:
                    agent.remove_remote_agent(name)
                except Exception as exc:  # a peer that already vanished: nothing left to forget
                    log.debug("nixl_remove_remote_failed", agent=self.name, remote=name, error=repr(exc))
            self._remotes.clear()
            _progress(agent, 3)
            for reg in self._regs:
                try:
                    agent.deregister_memory(reg)
                except Exception as exc:  # the agent is going away; UCX frees the mapping with it
                    log.debug("nixl_deregister_failed", agent=self.name, error=repr(exc))
            self._regs.clear()
            _progress(agent, 3)
            del agent  # the last reference: the C++ agent and its UCX worker go away here
        finally:
            self.lock.release()
        _live.discard(self)


def _progress(agent: Any, rounds: int) -> None:
    for _ in range(rounds):
        try:
            agent.get_new_notifs()
        except Exception:
            return
        time.sleep(0.0005)  # poll-ok: teardown only; gives UCX's async thread a moment between rounds


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@atexit.register
def _close_all() -> None:
    """Agents still alive at interpreter exit (a Sender/Receiver nobody closed) are torn
    down here, before module teardown would destroy them in an order UCX cannot survive."""
    for agent in list(_live):
        try:
            agent.close(lock_timeout=2.0)
        except Exception as exc:  # at exit: report, keep closing the others
            log.warning("nixl_agent_close_at_exit_failed", agent=agent.name, error=repr(exc))

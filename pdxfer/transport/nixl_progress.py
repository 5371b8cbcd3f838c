"""The one thread per process side that talks to NIXL's data path: posts, states, notifications.

NIXL offers no callback and no file descriptor to wait on from Python: completion can
only be learned by asking (`check_xfer_state`, `get_new_notifs`). Asking from the event
loop would mean sleep-polling there; NIXL's own progress thread spins a core even when
idle. So each process side (sender, receiver) has one `NixlProgress` thread that:

- **registers and posts the WRITEs** handed to it (`post`). A WRITE over shared
  memory/cma is a copy done inside the post call (GIL released), ~0.3 ms per 2 MiB here.
  Doing it on this thread keeps the event loop free to hash and queue the next chunk
  meanwhile (with the copy on the loop thread, hash + copy ran serially: ~0.75 of raw
  NIXL). Registration happens here too, through the `RegistrationCache` this thread owns:
  registering from the loop had to wait for the agent lock held across each copy, which
  stalled the pipeline once per chunk (~0.6 of raw NIXL with one transfer in flight).
  Consecutive WRITEs to one peer go out as one NIXL request (`nixl_batch`);
- **blocks on a `threading.Event`** — zero CPU — while nothing is outstanding (no post
  queued, no WRITE in flight, nobody waiting for notifications);
- **polls while something is outstanding**, first back to back for `spin_s` after the last
  event (default 0: see below), then with sleeps that start at `min_sleep_s` and double up
  to `max_sleep_s`, cut short whenever new work is handed in. A stream of chunks keeps
  resetting the backoff, so notifications 0.3 ms apart are picked up within ~0.1 ms;
- **wakes the waiting asyncio code** with one `loop.call_soon_threadsafe` per poll that
  found anything (batched: a burst of completions costs one loop wake-up).

Priority: the thread can run some nice steps below its creator (`nice`; pdxfer's
Sender and Receiver use `nixl_nice`, default 10). Its work is bulk (copies on the sender,
hashes of landed chunks on the receiver); the event loops' work is short and on the
critical path of every transfer, and on a host with fewer cores than busy threads a
loop that waits a time slice behind a copy stalls the whole pipeline.

Why no spin by default: on this 2-vCPU host a thread polling back to back for 100 µs
after every event — i.e. all the time while chunks stream — halved the raw WRITE rate of
the peer process (6.9 → 3.0 GB/s, 2 MiB, tcp,self,sm); sleep-based backoff cost nothing
measurable. Where cores are plentiful, `spin_s` trades a core for ~0.1 ms of latency.

Thread-safety: `post`/`watch`/`want_notifs`/`kick`/`end_owner`/`run`/`stop` may be called from
any thread; the agent's lock serialises UCX calls made elsewhere (metadata, remote agents).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import structlog

from pdxfer.layout.buffers import DRAM, DeviceChunk, mem_of
from pdxfer.transport.nixl_agent import NixlAgent
from pdxfer.transport.nixl_batch import Done, WritePost, group_writes
from pdxfer.transport.nixl_regcache import Key, RegistrationCache

log = structlog.get_logger("pdxfer.nixl")

# {agent: [notification]}, or with a Prepare: ({agent: [notification]}, what it made of them)
NotifSink = Callable[[Any], None]
Prepare = Callable[[dict[str, list[bytes]]], Any]  # runs on the progress thread


# handle, loop, and per WRITE in the request: (done, registration)
_Pending = tuple[Any, asyncio.AbstractEventLoop, "list[tuple[Done, Key | None]]"]


@dataclass
class ProgressStats:
    posts: int = 0
    polls: int = 0  # agent.poll() calls
    sleeps: int = 0  # backoff sleeps taken
    idle_waits: int = 0  # times the thread parked with nothing outstanding
    completions: int = 0
    notifications: int = 0


class NixlProgress:
    def __init__(self, agent: NixlAgent, name: str, *, spin_s: float = 0.0,
                 min_sleep_s: float = 20e-6, max_sleep_s: float = 1e-3,
                 max_batch: int = 8, max_batch_bytes: int = 8 << 20, nice: int = 0) -> None:
        """`nice`: the thread runs this many nice steps below the thread that creates it
        (Linux only; see `SenderConfig.nixl_nice` for why)."""
        self.agent = agent
        self.nice = nice
        self.niceness: int | None = None  # what the thread runs at, once it has started
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.spin_s = spin_s
        self.min_sleep_s = min_sleep_s
        self.max_sleep_s = max_sleep_s
        self.stats = ProgressStats()
        self.cache = RegistrationCache(agent)  # touched by this thread only (and after stop())
        self._mu = threading.Lock()
        self._posts: list[WritePost] = []
        self._ended: list[str] = []
        self._calls: list[tuple[Callable[[], Any], "concurrent.futures.Future[Any]"]] = []
        self._incoming: list[_Pending] = []
        self._pending: list[_Pending] = []
        self._interest = 0
        self._kicked = False
        self._sink: tuple[asyncio.AbstractEventLoop, NotifSink] | None = None
        self._prepare: Prepare | None = None
        self._wake = threading.Event()
        # True only while the thread waits (parked or in a backoff sleep): only then does
        # new work set `_wake`. A busy thread finds new work at the top of its next round
        # anyway, and setting the Event for every chunk posted cost the event loop a
        # futex call per chunk.
        self._waiting = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"pdxfer-nixl-progress-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API (any thread)
    def post(self, loop: asyncio.AbstractEventLoop, done: Done, local: "memoryview | DeviceChunk | int",
             remote_addr: int, nbytes: int, remote: str, notif: bytes, owner: str = "",
             remote_mem: tuple[str, int] = (DRAM, 0)) -> None:
        """WRITE `local` (a host or GPU buffer, registered here on first use, or an already
        registered host address) to `remote` at `remote_addr` (in memory `remote_mem`) with
        `notif`; `done(state, error)` on `loop`."""
        local_mem = mem_of(local) if not isinstance(local, int) else (DRAM, 0)
        with self._mu:
            if self._stopping:
                _call(loop, _run_all, [(done, ("ERR", "NIXL progress thread stopped"))])
                return
            self._posts.append(WritePost(loop, done, local, owner, remote_addr, nbytes, remote, notif,
                                     local_mem, remote_mem))
            wake = self._waiting
        self._wake_if(wake)

    def run(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run `fn` on this thread (e.g. a change to its registration cache, which only this
        thread touches) and return its result, waiting at most `timeout`."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._mu:
            if self._stopping:
                raise RuntimeError("NIXL progress thread stopped")
            self._calls.append((fn, fut))
            wake = self._waiting
        self._wake_if(wake)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            if fut.cancel():  # not started: it never will
                raise
            return fut.result(timeout)  # already running: its effect stands, so report it

    def end_owner(self, owner: str) -> None:
        """Transfer `owner` ended: deregister the buffers only it used (on this thread)."""
        with self._mu:
            self._ended.append(owner)
            wake = self._waiting
        self._wake_if(wake)

    def watch(self, handle: Any, loop: asyncio.AbstractEventLoop, done: Done) -> None:
        """Report an already posted `handle`'s final state to `done` on `loop` (it is released here)."""
        with self._mu:
            if self._stopping:
                _call(loop, _run_all, [(done, ("ERR", "NIXL progress thread stopped"))])
                return
            self._incoming.append((handle, loop, [(done, None)]))
            wake = self._waiting
        self._wake_if(wake)

    def want_notifs(self, delta: int) -> None:
        """+1 while someone expects notifications (a granted NIXL transfer), -1 when not."""
        with self._mu:
            self._interest += delta
            if delta > 0:
                self._kicked = True  # the first notification comes soon: poll tightly
            if self._interest < 0:
                log.error("nixl_interest_negative", interest=self._interest)
                self._interest = 0
            wake = delta > 0 and self._waiting
        self._wake_if(wake)

    def kick(self) -> None:
        """Something is about to arrive (e.g. a COMMIT came before the last notification):
        poll at the shortest interval again instead of waiting out the current backoff."""
        with self._mu:
            self._kicked = True
            wake = self._waiting
        self._wake_if(wake)

    @property
    def interest(self) -> int:
        return self._interest

    @property
    def in_flight(self) -> int:
        return len(self._pending) + len(self._incoming) + len(self._posts)

    def set_sink(self, loop: asyncio.AbstractEventLoop, sink: NotifSink, prepare: Prepare | None = None) -> None:
        """Where notifications go (receiver side); without a sink they are dropped.

        `prepare`, if given, runs on this thread with each poll's {agent: [notification]},
        and `sink` then gets `(notifs, prepare(notifs))` on `loop`: for work that should
        happen the moment bytes landed (hashing them while they are still in cache)
        rather than whenever a busy loop gets to it. If `prepare` raises, the sink gets
        `(notifs, None)`: the notifications themselves are never lost."""
        self._sink = (loop, sink)
        self._prepare = prepare

    def stop(self, timeout: float = 5.0) -> list[tuple[asyncio.AbstractEventLoop, Done]]:
        """Stop the thread; returns the posts/watches that never finished (the owner fails them)."""
        with self._mu:
            self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("nixl_progress_stuck", agent=self.agent.name, timeout=timeout)
        with self._mu:
            left = [(p.loop, p.done) for p in self._posts]
            left += [(e[1], d) for e in self._pending + self._incoming for d, _ in e[2]]
            self._posts, self._pending, self._incoming = [], [], []
            calls, self._calls = self._calls, []
        for _, fut in calls:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(RuntimeError("NIXL progress thread stopped"))
        return left

    # ------------------------------------------------------------------ thread
    def _lower_priority(self) -> None:
        if not sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS would renice the whole process
            return
        tid = threading.get_native_id()
        try:
            if self.nice > 0:
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
            self.niceness = os.getpriority(os.PRIO_PROCESS, tid)
        except OSError as exc:
            log.warning("nixl_progress_nice_failed", agent=self.agent.name, nice=self.nice, error=str(exc))

    def _run(self) -> None:
        self._lower_priority()
        last_event = time.perf_counter()
        sleep = 0.0
        while True:
            with self._mu:
                self._waiting = False
                if self._stopping:
                    return
                posts, self._posts = self._posts, []
                ended, self._ended = self._ended, []
                calls, self._calls = self._calls, []
                if self._kicked:
                    self._kicked = False
                    last_event, sleep = time.perf_counter(), 0.0
                if self._incoming:
                    self._pending.extend(self._incoming)
                    self._incoming.clear()
                    last_event, sleep = time.perf_counter(), 0.0  # new work: poll tightly again
                interest = self._interest
            for fn, fut in calls:  # before the posts: a chunk of a buffer registered just now finds it
                if not fut.set_running_or_notify_cancel():
                    continue  # the caller gave up waiting
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
            if posts:
                self._post_all(posts)
                last_event, sleep = time.perf_counter(), 0.0
            for owner in ended:  # after the posts: a transfer's last WRITEs are queued before it ends
                self.cache.end_owner(owner)
            with self._mu:
                pending = list(self._pending)
            if not pending and interest <= 0:
                if posts:
                    continue  # more may have been queued while we posted
                if self._wait_for_work(60.0):  # parked: zero CPU until post()/watch()/want_notifs()/stop()
                    self.stats.idle_waits += 1
                last_event, sleep = time.perf_counter(), 0.0
                continue
            try:
                found = self._poll_once(pending, interest > 0)
            except Exception:  # never let a bug kill the only thread that completes transfers
                log.exception("nixl_progress_poll_failed", agent=self.agent.name)
                found = False
            now = time.perf_counter()
            if found or posts:
                last_event, sleep = now, 0.0
            elif now - last_event >= self.spin_s:
                sleep = min(self.max_sleep_s, max(self.min_sleep_s, sleep * 2))
                self.stats.sleeps += 1
                self._wait_for_work(sleep)  # poll-ok: backoff while a WRITE/notification is outstanding; new work cuts it short

    def _wake_if(self, waiting: bool) -> None:
        """New work was queued: set the Event only if the thread was waiting then."""
        if waiting:
            self._wake.set()

    def _wait_for_work(self, timeout: float) -> bool:
        """Wait up to `timeout` unless work came in meanwhile; False if it had (no wait)."""
        with self._mu:
            if self._posts or self._ended or self._calls or self._incoming or self._kicked or self._stopping:
                return False
            self._waiting = True
            self._wake.clear()
        self._wake.wait(timeout)
        return True

    def _post_all(self, posts: list[WritePost]) -> None:
        """Post queued WRITEs, batched into requests by `nixl_batch.group_writes`."""
        results: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., None], tuple]]] = {}
        for group in group_writes(posts, self.max_batch, self.max_batch_bytes):
            self._post_group(group, results.setdefault(group[0].loop, []))
        for loop, calls in results.items():
            if calls:
                _call(loop, _run_all, calls)

    def _post_group(self, group: list[WritePost], calls: list[tuple[Callable[..., None], tuple]]) -> None:
        segments, notifs, members = [], [], []
        for p in group:
            key: Key | None = None
            try:
                if isinstance(p.local, int):
                    laddr = p.local
                else:
                    key, laddr = self.cache.acquire(p.local, p.owner)
            except Exception as exc:
                calls.append((p.done, ("ERR", f"registering the buffer failed: {exc!r}")))
                continue
            segments.append((laddr, p.remote_addr, p.nbytes))
            notifs.append(p.notif)
            members.append((p, key))
        if not members:
            return
        handle, state, err = self.agent.post_write(segments, group[0].remote, b"".join(notifs),
                                                   group[0].local_mem, group[0].remote_mem)
        self.stats.posts += 1
        if state == "PROC":
            with self._mu:
                self._pending.append((handle, group[0].loop, [(p.done, key) for p, key in members]))
            return
        for p, key in members:
            if key is not None:
                self.cache.release(key)
            calls.append((p.done, (state, err)))

    def _poll_once(self, pending: list[_Pending], want_notifs: bool) -> bool:
        self.stats.polls += 1
        finished, notifs = self.agent.poll([e[0] for e in pending], want_notifs)
        if finished:
            done_ids = {id(h): state for h, state in finished}
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[..., None], tuple]]] = {}
            keep = []
            with self._mu:
                for entry in self._pending:
                    state = done_ids.get(id(entry[0]))
                    if state is None:
                        keep.append(entry)
                    else:
                        err = "" if state == "DONE" else "WRITE completed with state ERR"
                        for done, key in entry[2]:
                            if key is not None:
                                self.cache.release(key)
                            by_loop.setdefault(entry[1], []).append((done, (state, err)))
                self._pending = keep
            self.stats.completions += len(finished)  # NIXL requests (a batch counts once)
            for loop, calls in by_loop.items():
                _call(loop, _run_all, calls)
        if notifs:
            self.stats.notifications += sum(len(v) for v in notifs.values())
            sink, prepare = self._sink, self._prepare
            if sink is not None:
                if prepare is None:
                    _call(sink[0], sink[1], notifs)
                else:
                    try:
                        extra = prepare(notifs)
                    except Exception:
                        log.exception("nixl_notif_prepare_failed", agent=self.agent.name)
                        extra = None
                    _call(sink[0], sink[1], (notifs, extra))
            else:
                log.warning("nixl_notifs_dropped", agent=self.agent.name, count=self.stats.notifications)
        return bool(finished or notifs)


def fail_left(left: list[tuple[asyncio.AbstractEventLoop, Done]], error: str) -> None:
    """Fail what `stop()` returned on each one's loop (skipping loops already closed)."""
    for loop, done in left:
        _call(loop, _run_all, [(done, ("ERR", error))])


def _run_all(calls: list[tuple[Callable[..., None], tuple]]) -> None:
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:
            log.exception("nixl_done_callback_failed")


def _call(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], arg: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:  # the loop closed under us: its owner already failed everything
        pass

"""The receiver core's NIXL half: agent setup, GRANT addresses, notifications → transfers.

Runs on the receiver's event loop like `ReceiverCore`, which owns it. The agent (and the
registration of the whole receive region) is created on the first HELLO that asks for
"nixl", in a worker thread, so a receiver that only ever serves TCP never imports NIXL.

A NIXL chunk needs no resolver: the sender already wrote it where the GRANT said. Its
notification is the data-frame header, so `InboundTransfer.destination()` validates
slot, index, offset and length exactly as for a TCP frame; then the landed bytes'
checksum is checked and `chunk_arrived()` takes over. A host region's chunks were
already hashed on the progress thread as they landed (`LandedHashes`: measured here,
that lifted the 2 MiB bench ratio from 0.667 to 0.702 at one transfer in flight and from
0.788 to 0.844 at four, means of 3 interleaved runs); a GPU region's are hashed on the
loop (`ReceiveRegion.checksums`, one kernel launch per batch). The progress thread
polls for notifications only while some granted NIXL transfer has not ended
(`want_notifs`), and parks otherwise.
"""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any, Callable

import structlog

from pdxfer.engine.landed_hashes import LandedHashes, Prepared
from pdxfer.errors import IntegrityError, ProtocolError
from pdxfer.protocol import messages as m
from pdxfer.protocol.frames import FrameHeader
from pdxfer.protocol.inbound import InboundTransfer
from pdxfer.transport.nixl import NixlRecvSide, parse_notif  # cheap: nixl itself is imported lazily

if TYPE_CHECKING:
    from pdxfer.engine.receiver_core import ReceiverCore
    from pdxfer.engine.region import ReceiveRegion

log = structlog.get_logger("pdxfer.receiver")

Accept = Callable[[bytes], None]  # send HELLO_OK with this NIXL metadata


class NixlInbound:
    def __init__(self, core: "ReceiverCore", region: "ReceiveRegion") -> None:
        self.core = core
        self.region = region
        self.side: NixlRecvSide | None = None
        self._setup: "asyncio.Future[NixlRecvSide] | None" = None
        self._tasks: set[asyncio.Task] = set()
        self.agents: dict[str, str] = {}  # sender's NIXL agent name -> control identity (peer key)
        self.slots: set[int] = set()  # granted NIXL slots whose transfer has not ended
        # host region: chunks are hashed on the progress thread as they land
        self.early = None if region.on_gpu else LandedHashes(region.buffer, region.algorithm)
        self.unavailable = ""  # why the last setup failed (then HELLO_OK stops offering nixl)

    # ------------------------------------------------------------------ handshake
    def hello(self, identity: bytes, key: str, msg: m.Hello, accept: Accept) -> None:
        if not msg.nixl_agent:
            self.core._send(identity, m.Error(cid=msg.cid, error="protocol", detail="nixl HELLO without nixl_agent"))
            return
        if self.side is not None:
            self._accept(key, msg, accept)
            return
        task = self.core.loop.create_task(self._hello_after_setup(identity, key, msg, accept))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def begin_setup(self) -> "asyncio.Future[NixlRecvSide]":
        """Create the agent and register the region in a worker thread, once (again after a
        failure); the side is installed the moment it exists. A HELLO waits for this;
        `ReceiverConfig.nixl_eager` starts it with the receiver instead, so the first NIXL
        HELLO (say, right after a restart, when every sender reconnects at once) does not
        pay for importing nixl and creating the agent, and a host region's prefault
        starts before the first WRITE lands."""
        if self._setup is None:
            fut = self.core.loop.run_in_executor(None, self._make_side)
            fut.add_done_callback(self._setup_done)
            self._setup = fut
        return self._setup

    def _setup_done(self, fut: "asyncio.Future[NixlRecvSide]") -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if self._setup is fut:
                self._setup = None  # a later HELLO tries again
            self.unavailable = str(exc) or type(exc).__name__
            log.error("nixl_setup_failed", error=self.unavailable)
            return
        side = fut.result()
        if self._setup is not fut:  # close() ran meanwhile (it waits for a running setup and closes its side)
            return
        self.side = side
        self.unavailable = ""
        if self.early is None:
            side.start(self.core.loop, self.on_notifs)
        else:
            side.start(self.core.loop, self.on_prepared, self.early)
        log.info("nixl_ready", agent=side.name, region_bytes=side.nbytes, prefaulting=side.prefault is not None,
                 ucx_tls=side.agent.ucx_env.get("UCX_TLS"))

    async def _hello_after_setup(self, identity: bytes, key: str, msg: m.Hello, accept: Accept) -> None:
        timeout = self.core.cfg.nixl_setup_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(self.begin_setup()), timeout)
        except Exception as exc:
            if isinstance(exc, asyncio.TimeoutError):
                self.unavailable = f"NIXL agent setup took longer than nixl_setup_timeout_s={timeout}s"
            else:
                self.unavailable = str(exc) or type(exc).__name__  # _setup_done logged it
            log.error("nixl_hello_refused", peer=key, error=self.unavailable)
            self.core._send(identity, m.Error(cid=msg.cid, error="nixl_unavailable", detail=self.unavailable))
            return
        if self.side is None:  # closed while this HELLO waited
            self.core._send(identity, m.Error(cid=msg.cid, error="nixl_unavailable", detail="receiver closing"))
            return
        self._accept(key, msg, accept)

    def _make_side(self) -> NixlRecvSide:
        cfg = self.core.cfg
        side = NixlRecvSide(f"{cfg.receiver_id}-{os.urandom(3).hex()}", self.region, cfg.ucx, nice=cfg.nixl_nice)
        side.progress.spin_s = cfg.nixl_spin_s
        side.progress.max_sleep_s = cfg.nixl_max_sleep_s
        return side

    def _accept(self, key: str, msg: m.Hello, accept: Accept) -> None:
        assert self.side is not None and msg.nixl_agent
        for name in (msg.nixl_agent, *msg.nixl_workers):
            self.agents[name] = key
        self.unavailable = ""
        accept(self.side.metadata)

    # ------------------------------------------------------------------ grants
    def granted(self, slot: int, offset: int, nbytes: int) -> int:
        """A transfer to a NIXL peer was granted `nbytes` at `offset`: poll for its
        notifications from now on."""
        assert self.side is not None
        self.slots.add(slot)
        if self.early is not None:
            self.early.open(slot, offset, nbytes)
        self.side.progress.want_notifs(+1)
        return self.side.base_addr + offset

    def commit_waiting(self, slot: int) -> None:
        """COMMIT overtook the last notifications: look for them now, not after a backoff."""
        if slot in self.slots and self.side is not None:
            self.side.progress.kick()

    def ended(self, slot: int) -> None:
        if slot in self.slots:
            self.slots.discard(slot)
            if self.early is not None:
                self.early.close(slot)
            if self.side is not None:
                self.side.progress.want_notifs(-1)

    def prune_idle_peers(self) -> None:
        """NIXL peers have no connection whose close tells us they left: forget the ones
        silent for `nixl_peer_idle_s` with nothing reserved, so the peer table stays bounded."""
        core = self.core
        cutoff = core.loop.time() - core.cfg.nixl_peer_idle_s
        busy = {t.peer for t in core.inbound.values()}
        busy |= {p.identity.decode(errors="replace") for p in core.pending.values()}
        for key, info in list(core.peers.items()):
            if info.nixl_agent is not None and info.last_seen < cutoff and key not in busy:
                del core.peers[key]
                core._by_token.pop(info.conn_token, None)
                for name in [n for n, k in self.agents.items() if k == key]:
                    del self.agents[name]

    # ------------------------------------------------------------------ notifications
    def on_prepared(self, prepared: tuple[dict[str, list[bytes]], Prepared | None]) -> None:
        """Host region: the progress thread already parsed and hashed what landed
        (`LandedHashes`); None if it failed, and then the loop does both."""
        batch, done = prepared
        if done is None:
            self.on_notifs(batch)
        else:
            self.on_notifs(batch, done.sums, done.headers)

    def on_notifs(self, batch: dict[str, list[bytes]], early: "dict[tuple[int, int, int, int], int] | None" = None,
                  parsed: "list[list[FrameHeader] | ProtocolError] | None" = None) -> None:
        """Called on the loop by the progress thread with {agent name: [notification, ...]}
        and, where the thread parsed them already, each notification's headers in the
        batch's order (`parsed`). The landed chunks of the whole batch that `early` has no
        checksum for are checksummed together (on a GPU region: one kernel launch), then
        each is checked against its header."""
        now = self.core.loop.time()
        landed: list[tuple[InboundTransfer, FrameHeader, Any]] = []
        pre = iter(parsed) if parsed is not None else None
        for agent, msgs in batch.items():
            agent = agent.decode() if isinstance(agent, bytes) else agent
            key = self.agents.get(agent)
            for raw in msgs:
                headers = next(pre, None) if pre is not None else None
                try:
                    landed += self._landed(agent, key, raw, now, headers)
                except Exception:  # one bad notification must not lose the others
                    log.exception("nixl_notif_failed", agent=agent)
        if landed:
            self._check(landed, early or {})
        self.core._schedule()

    def _landed(self, agent: str, key: str | None, raw: bytes, now: float,
                parsed: "list[FrameHeader] | ProtocolError | None" = None) -> list[tuple[InboundTransfer, FrameHeader, Any]]:
        core = self.core
        if parsed is None:
            try:
                parsed = parse_notif(bytes(raw))
            except ProtocolError as exc:
                parsed = exc
        if isinstance(parsed, ProtocolError):
            log.error("nixl_notif_malformed", agent=agent, error=str(parsed))
            return []
        headers = parsed
        out = []
        for header in headers:
            t = core.inbound.get(header.slot)
            if t is None:
                if header.slot >= core._next_slot:
                    log.error("nixl_notif_unknown_slot", agent=agent, slot=header.slot)
                continue  # the transfer ended meanwhile (lease, abort): a late chunk, dropped
            if key is None or t.peer != key:
                log.error("nixl_notif_wrong_peer", agent=agent, slot=header.slot, transfer_id=t.tid)
                continue
            try:
                view = t.destination(header)
            except ProtocolError as exc:
                core._fail_transfer(t, exc, "protocol")
                continue
            core.admission.renew(t.tid, now=now)
            out.append((t, header, view))
        return out

    def _check(self, landed: list[tuple[InboundTransfer, FrameHeader, Any]], early: dict[tuple[int, int, int, int], int]) -> None:
        core = self.core
        try:
            sums = [early.get((h.slot, h.chunk_index, h.offset, h.length)) for _, h, _ in landed]
            late = [i for i, s in enumerate(sums) if s is None]
            if late:
                for i, s in zip(late, core.region.checksums([landed[i][2] for i in late])):
                    sums[i] = s
        except Exception as exc:  # e.g. the GPU kernel failed: these chunks cannot be vouched for
            log.exception("nixl_checksum_failed", chunks=len(landed))
            for t in {id(t): t for t, _, _ in landed}.values():
                core._fail_transfer(t, IntegrityError(f"checksumming landed chunks failed: {exc!r}",
                                                      transfer_id=t.tid, peer=t.peer), "integrity")
            return
        for (t, header, view), actual in zip(landed, sums):
            if core.inbound.get(t.slot) is not t:
                continue  # failed by an earlier chunk of this batch
            try:
                t.chunk_arrived(header, view, actual)
            except IntegrityError as exc:
                core._fail_transfer(t, exc, "integrity")
                continue
            if t.ready_to_verify:
                core._verify(t)

    # ------------------------------------------------------------------ shutdown
    async def close(self, timeout: float = 30.0) -> None:
        """Stop polling and tear the agent down; must run before the region is unmapped."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        side = self.side
        if side is None and self._setup is not None:
            try:
                side = await asyncio.wait_for(asyncio.shield(self._setup), timeout)
            except Exception:
                side = None
        self.side, self._setup = None, None
        if side is not None:
            await self.core.loop.run_in_executor(None, side.close)

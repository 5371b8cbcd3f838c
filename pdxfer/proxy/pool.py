"""Worker pools: per-worker load accounting, leases, and the active health checker.

A ``Lease`` is what a request holds while it uses a worker: it adds the request's
estimated tokens to the worker's outstanding work and takes them off again exactly once
(``release`` is idempotent; leases are context managers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

import aiohttp
import structlog

from pdxfer.proxy.errors import NoBackend
from pdxfer.proxy.health import HealthTracker, Transition
from pdxfer.proxy.metrics import ProxyMetrics
from pdxfer.proxy.routing import Policy
from pdxfer.proxy.upstream import bounded

log = structlog.get_logger("pdxfer.proxy.pool")


class Backend:
    def __init__(self, url: str, role: str, tracker: HealthTracker) -> None:
        self.url = url
        self.role = role
        self.health = tracker
        self.in_flight = 0
        self.outstanding_tokens = 0

    @property
    def routable(self) -> bool:
        return self.health.up

    def snapshot(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.health.state.value,
            "in_flight": self.in_flight,
            "outstanding_tokens": self.outstanding_tokens,
            "last_error": self.health.last_error,
        }


class Lease:
    def __init__(self, pool: BackendPool, backend: Backend, cost: int) -> None:
        self.pool = pool
        self.backend = backend
        self.remaining = cost
        self.released = False

    @property
    def url(self) -> str:
        return self.backend.url

    def progress(self, tokens: int) -> None:
        """A stream produced ``tokens``: that much less work is outstanding."""
        if self.released or tokens <= 0:
            return
        done = min(tokens, self.remaining)
        self.remaining -= done
        self.pool._adjust(self.backend, 0, -done)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.pool._adjust(self.backend, -1, -self.remaining)
        self.remaining = 0

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BackendPool:
    def __init__(
        self,
        role: str,
        urls: Collection[str],
        policy: Policy,
        metrics: ProxyMetrics,
        *,
        unhealthy_after: int = 2,
        healthy_after: int = 1,
    ) -> None:
        self.role = role
        self.policy = policy
        self.metrics = metrics
        self.backends = [Backend(u, role, HealthTracker(unhealthy_after, healthy_after)) for u in urls]
        self._wake = asyncio.Event()
        # label lookups are not free: resolve each worker's gauge children once
        self._g_in_flight = {b.url: metrics.backend_in_flight.labels(role, b.url) for b in self.backends}
        self._g_tokens = {b.url: metrics.backend_tokens.labels(role, b.url) for b in self.backends}
        for b in self.backends:
            metrics.backend_up.labels(role, b.url).set(1)
            self._adjust(b, 0, 0)

    # ------------------------------------------------------------ routing
    def acquire(self, cost: int, exclude: Collection[str] = ()) -> Lease:
        backend = self.policy.pick(self.backends, exclude)
        if backend is None:
            down = [b.url for b in self.backends if not b.routable]
            raise NoBackend(
                f"no healthy {self.role} worker"
                + (f" (down: {', '.join(down)})" if down else "")
                + (f" (already tried: {', '.join(exclude)})" if exclude else "")
            )
        assert isinstance(backend, Backend)
        self._adjust(backend, +1, cost)
        return Lease(self, backend, cost)

    def any_routable(self) -> bool:
        return any(b.routable for b in self.backends)

    def _adjust(self, b: Backend, requests: int, tokens: int) -> None:
        b.in_flight += requests
        b.outstanding_tokens += tokens
        self._g_in_flight[b.url].set(b.in_flight)
        self._g_tokens[b.url].set(b.outstanding_tokens)

    # ------------------------------------------------------------ health
    def report_failure(self, backend: Backend, reason: str) -> None:
        """Passive evidence that a worker is gone: out at once, probe at once."""
        self._record(backend, backend.health.request_failed(reason))
        self._wake.set()

    def _record(self, backend: Backend, t: Transition | None) -> None:
        if t is None:
            return
        self.metrics.backend_up.labels(self.role, backend.url).set(1 if backend.routable else 0)
        self.metrics.health_transitions.labels(self.role, backend.url, t.new.value).inc()
        event = log.info if t.new.value == "up" else log.warning
        event(
            "worker_health",
            role=self.role,
            backend=backend.url,
            old=t.old.value,
            new=t.new.value,
            cause=t.event.value,
            reason=t.reason,
        )

    async def probe(self, session: aiohttp.ClientSession, backend: Backend, timeout: float) -> None:
        reason: str | None = None
        try:
            async with session.get(
                backend.url + "/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                if resp.status != 200:
                    reason = f"/health answered HTTP {resp.status}"
        except asyncio.TimeoutError:
            reason = f"/health timed out after {timeout}s"
        except aiohttp.ClientError as exc:
            reason = f"/health failed: {type(exc).__name__}: {exc}"
        if reason is None:
            self._record(backend, backend.health.probe_ok())
        else:
            self._record(backend, backend.health.probe_failed(reason))

    async def probe_all(self, session: aiohttp.ClientSession, timeout: float) -> None:
        await asyncio.gather(*(self.probe(session, b, timeout) for b in self.backends))

    async def run_health_checks(
        self, session: aiohttp.ClientSession, interval: float, timeout: float
    ) -> None:
        """Probe every worker each ``interval`` s, or at once when a request reports one dead."""
        while True:
            self._wake.clear()
            await self.probe_all(session, timeout)
            try:
                await bounded(self._wake.wait(), interval)
            except asyncio.TimeoutError:
                pass  # nobody reported a dead worker: the interval is up, probe again

    def snapshot(self) -> list[dict[str, Any]]:
        return [b.snapshot() for b in self.backends]

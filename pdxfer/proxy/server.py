"""Run the proxy app until SIGTERM/SIGINT, then drain.

Shutdown order: stop listening; mark draining (``/health`` answers 503, new requests on
kept-alive connections get 503); let in-flight requests finish for up to
``drain_timeout`` seconds; cancel what is left (which closes its upstream legs, so
workers free their KV); close the upstream session.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog
from aiohttp import web

from pdxfer.proxy.app import STATE, create_app
from pdxfer.proxy.config import ProxyConfig

log = structlog.get_logger("pdxfer.proxy")


class ProxyServer:
    """An in-process proxy: ``await start()``, ``port``, ``await stop()`` (used by tests too)."""

    def __init__(self, cfg: ProxyConfig, app: web.Application | None = None) -> None:
        self.cfg = cfg
        self.app = app if app is not None else create_app(cfg)
        self.runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # client disconnect cancels the handler -> both legs
            shutdown_timeout=cfg.drain_timeout,
            access_log=None,
        )
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port, backlog=2048, reuse_address=True)
        await site.start()
        self.port = int(self.runner.addresses[0][1])  # the bound port (cfg.port may be 0)
        log.info("proxy_listening", url=self.url)

    async def stop(self) -> None:
        self.app[STATE].draining = True
        await self.runner.cleanup()


async def serve(cfg: ProxyConfig, ready: Callable[[ProxyServer], None] | None = None) -> int:
    server = ProxyServer(cfg)
    await server.start()
    if ready is not None:
        ready(server)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()  # no deadline by design: a daemon serves until SIGTERM/SIGINT
        log.info("proxy_draining", in_flight=server.app[STATE].in_flight, drain_timeout=cfg.drain_timeout)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()
    return 0

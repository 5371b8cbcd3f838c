"""A lane's data path: the NIXL side it needs before HELLO, and the path HELLO_OK opens.

Split from the lane because it is the one place that knows how each backend gets from a
receiver's HELLO_OK to something chunks can be handed to: a TCP connection to the
advertised data address (with its connection token), or a NIXL client for the
receiver's agent (its metadata loaded into every worker). Every wait here is bounded.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Awaitable, Callable

from pdxfer.errors import ProtocolError, TransferTimeout
from pdxfer.protocol import messages as m
from pdxfer.transport.tcp import DataClient

if TYPE_CHECKING:
    from pdxfer.engine.config import SenderConfig
    from pdxfer.transport.nixl import NixlDataClient, NixlSendSide

# The first NIXL lane of a Sender creates its agents (~0.5 s each, off the loop): on top
# of the handshake timeout, this long is allowed for that.
AGENT_CREATION_S = 30.0


async def nixl_side(get: "Callable[[], Awaitable[NixlSendSide]] | None", cfg: "SenderConfig",
                    peer: str) -> "NixlSendSide":
    """The Sender's NIXL side, created on first use, within a bounded wait."""
    if get is None:
        raise ProtocolError("lane has backend nixl but no NIXL side", peer=peer)
    try:
        return await asyncio.wait_for(get(), cfg.handshake_timeout_s + AGENT_CREATION_S)
    except asyncio.TimeoutError:
        raise TransferTimeout("NIXL agent not created in time", peer=peer, waiting_for="nixl_agent") from None


async def open_data(ok: m.HelloOk, nixl: "NixlSendSide | None", cfg: "SenderConfig",
                    peer: str) -> "DataClient | NixlDataClient":
    """The data path the receiver's HELLO_OK offers this lane (NIXL when `nixl` is given)."""
    if nixl is not None:
        from pdxfer.transport.nixl import NixlDataClient

        remote = await nixl.connect(ok.nixl_md, timeout=cfg.handshake_timeout_s, peer=peer)  # type: ignore[arg-type]
        return NixlDataClient(nixl, remote, peer, (ok.nixl_mem, ok.nixl_dev))
    host, _, port = ok.data_address.rpartition(":")
    return await DataClient.connect(host.strip("[]"), int(port), ok.conn_token,
                                    timeout=cfg.handshake_timeout_s, peer=peer)

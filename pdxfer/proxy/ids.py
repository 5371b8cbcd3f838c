"""Request and transfer ids.

Ids must not collide across proxy replicas (peer proxies use per-process counters, so two
replicas hand the same id to one worker). Ours are 128-bit random (uuid4 entropy), prefixed
so a log reader sees what kind of id it is. A client may bring its own ``X-Request-Id``;
it is kept when it is a sane token, and replaced otherwise (never echoed raw into logs or
upstream headers).
"""

from __future__ import annotations

import re
import secrets

REQUEST_ID_HEADER = "X-Request-Id"
_MAX_CLIENT_ID = 128
_SAFE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def new_request_id() -> str:
    return "pxr-" + secrets.token_hex(16)


def new_transfer_id() -> str:
    """The id both legs of a concurrent-flow request share; globally unique by construction."""
    return "pxt-" + secrets.token_hex(16)


def accept_request_id(client_value: str | None) -> str:
    """The client's id if it is a safe token of at most 128 chars, else a fresh one."""
    if client_value is not None:
        value = client_value.strip()
        if len(value) <= _MAX_CLIENT_ID and _SAFE.match(value):
            return value
    return new_request_id()

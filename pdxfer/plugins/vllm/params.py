"""`kv_transfer_params`: the per-request contract between proxy, prefill and decode.

vLLM passes a request's ``kv_transfer_params`` dict through unchanged to the connector and
returns whatever the prefill's connector answers from ``request_finished`` in the
response, so the dict is the only place a disaggregated request can carry routing data.
Parsing lives here, with no vLLM import, so the schema is unit-tested on its own.

Schema (all keys optional unless stated; unknown keys are ignored)::

    prefill leg (client / proxy -> prefill server)
        do_remote_decode: true            # required: "keep my KV for a remote decode"
        transfer_id: str                  # concurrent flow: shared with the decode leg
        remote_decode_url: str            # concurrent flow: the decode server's base URL
        request_id: str                   # proxy's request id (logging only)

    prefill answer (prefill server -> proxy, then proxy -> decode server), sequential flow
        do_remote_prefill: true           # required on the decode leg
        do_remote_decode: false
        transfer_id: str                  # required: pdxfer transfer id
        remote_host, remote_port          # the prefill worker's pdxfer side channel
        remote_engine_id, remote_request_id
        remote_block_ids: [[int]] | [int] # per KV-cache group (new vLLM) or flat (old)
        remote_num_tokens: int            # tokens whose KV the prefill holds
        pdxfer: 1                         # schema version

    decode leg, concurrent flow (proxy -> decode server)
        do_remote_prefill: true, transfer_id: T   # no remote_host: prefill pushes to us

With ``remote_host`` the decode worker asks the prefill worker to push (sequential flow:
the prefill's blocks are only held until then, under a lease). Without it the decode
worker just waits for transfer T to arrive at its Receiver.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

SCHEMA_VERSION = 1


class ParamsError(ValueError):
    """`kv_transfer_params` that cannot describe a transfer (the request runs without one)."""


def normalize_block_ids(raw: Any) -> tuple[tuple[int, ...], ...] | None:
    """Per-group block ids from either vLLM convention.

    New vLLM hands (and NixlConnector answers) one list per KV-cache group; old vLLM a
    flat list for the single group. Both become a tuple of per-group tuples.
    """
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)):
        raise ParamsError(f"remote_block_ids must be a list, got {type(raw).__name__}")
    if not raw:
        return ((),)
    if all(isinstance(b, (list, tuple)) for b in raw):
        groups = raw
    elif all(isinstance(b, int) and not isinstance(b, bool) for b in raw):
        groups = [raw]
    else:
        raise ParamsError("remote_block_ids must be a list of ints or a list of lists of ints")
    out = []
    for g in groups:
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in g):
            raise ParamsError("remote_block_ids entries must be non-negative ints")
        out.append(tuple(g))
    return tuple(out)


def _opt_str(p: Mapping[str, Any], key: str) -> str | None:
    v = p.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ParamsError(f"{key} must be a non-empty string, got {v!r}")
    return v


def _opt_int(p: Mapping[str, Any], key: str, lo: int = 0) -> int | None:
    v = p.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ParamsError(f"{key} must be an int >= {lo}, got {v!r}")
    return v


@dataclass(frozen=True)
class TransferParams:
    """A validated view of one request's `kv_transfer_params`."""

    do_remote_decode: bool = False  # this server is the prefill of a disaggregated request
    do_remote_prefill: bool = False  # this server is the decode: load KV from remote
    transfer_id: str | None = None
    remote_host: str | None = None
    remote_port: int | None = None
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    remote_block_ids: tuple[tuple[int, ...], ...] | None = None
    remote_num_tokens: int | None = None
    remote_decode_url: str | None = None

    @property
    def pull(self) -> bool:
        """Sequential flow: the decode asks the prefill (at remote_host:port) to push."""
        return self.remote_host is not None and self.remote_port is not None

    def validate_decode(self) -> None:
        """A decode leg needs a transfer id; an address needs both halves."""
        if not self.do_remote_prefill:
            return
        if self.transfer_id is None:
            raise ParamsError("do_remote_prefill needs transfer_id")
        if (self.remote_host is None) != (self.remote_port is None):
            raise ParamsError("remote_host and remote_port go together")


def parse_params(raw: Mapping[str, Any] | None) -> TransferParams | None:
    """Parse `request.kv_transfer_params`; None when the request is not disaggregated."""
    if not raw:
        return None
    if not isinstance(raw, Mapping):
        raise ParamsError(f"kv_transfer_params must be an object, got {type(raw).__name__}")
    dec, pre = bool(raw.get("do_remote_decode")), bool(raw.get("do_remote_prefill"))
    if dec and pre:
        raise ParamsError("do_remote_decode and do_remote_prefill are exclusive")
    if not dec and not pre:
        return None
    port = _opt_int(raw, "remote_port", 1)
    if port is not None and port > 65535:
        raise ParamsError(f"remote_port {port} out of range")
    p = TransferParams(
        do_remote_decode=dec,
        do_remote_prefill=pre,
        transfer_id=_opt_str(raw, "transfer_id"),
        remote_host=_opt_str(raw, "remote_host"),
        remote_port=port,
        remote_engine_id=_opt_str(raw, "remote_engine_id"),
        remote_request_id=_opt_str(raw, "remote_request_id"),
        remote_block_ids=normalize_block_ids(raw.get("remote_block_ids")),
        remote_num_tokens=_opt_int(raw, "remote_num_tokens"),
        remote_decode_url=_opt_str(raw, "remote_decode_url"),
    )
    if p.transfer_id is not None and len(p.transfer_id) > 256:
        raise ParamsError("transfer_id longer than 256 characters")
    p.validate_decode()
    return p


def prefill_answer(
    *,
    transfer_id: str,
    host: str,
    port: int,
    engine_id: str,
    request_id: str,
    block_ids: Sequence[Sequence[int]],
    num_tokens: int,
) -> dict[str, Any]:
    """The params a prefill returns; the proxy forwards them verbatim to the decode."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "transfer_id": transfer_id,
        "remote_host": host,
        "remote_port": port,
        "remote_engine_id": engine_id,
        "remote_request_id": request_id,
        "remote_block_ids": [list(g) for g in block_ids],
        "remote_num_tokens": num_tokens,
        "pdxfer": SCHEMA_VERSION,
    }

"""The chaos relay on real loopback sockets: it forwards both ways, and each armed fault
does to the stream exactly what it says."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from pdxfer.chaos.faults import Fault
from pdxfer.chaos.relay import Relay


@pytest.fixture
def upstream() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listening socket standing in for the receiver's data port; accepted sockets are collected."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(10)
    accepted: list[socket.socket] = []
    yield srv, accepted
    for s in accepted:
        s.close()
    srv.close()


@pytest.fixture
def relay(upstream: tuple[socket.socket, list[socket.socket]]) -> Iterator[Relay]:
    r = Relay("127.0.0.1", upstream[0].getsockname()[1], seed=3).start()
    yield r
    r.close()


def _pair(relay: Relay, upstream: tuple[socket.socket, list[socket.socket]]) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    server, _ = upstream[0].accept()
    server.settimeout(10)
    upstream[1].append(server)
    return client, server


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = s.recv(n - len(buf))
        if not got:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


def test_forwards_both_ways_untouched(relay: Relay, upstream) -> None:  # noqa: ANN001
    client, server = _pair(relay, upstream)
    with client:
        payload = bytes(range(256)) * 4096  # 1 MiB: several reads
        threading.Thread(target=client.sendall, args=(payload,), daemon=True).start()
        assert _recv_exactly(server, len(payload)) == payload
        server.sendall(b"ack")
        assert _recv_exactly(client, 3) == b"ack"
    assert relay.stats()["bytes_up"] == len(payload)


def test_corrupt_flips_one_bit_of_the_next_bytes_only(relay: Relay, upstream) -> None:  # noqa: ANN001
    client, server = _pair(relay, upstream)
    with client:
        relay.arm(Fault.CORRUPT)
        client.sendall(b"\x00" * 4096)
        got = _recv_exactly(server, 4096)
        assert sum(bin(b).count("1") for b in got) == 1
        client.sendall(b"\x00" * 4096)
        assert _recv_exactly(server, 4096) == b"\x00" * 4096
    assert relay.stats()["flips"] == 1


def test_stall_holds_the_stream_then_delivers_it(relay: Relay, upstream) -> None:  # noqa: ANN001
    client, server = _pair(relay, upstream)
    with client:
        relay.arm(Fault.STALL, 1.0)
        client.sendall(b"late")
        server.settimeout(0.3)  # well inside the 1 s hold: nothing may arrive yet
        with pytest.raises(socket.timeout):
            server.recv(4)
        server.settimeout(10)
        assert _recv_exactly(server, 4) == b"late"


def test_reset_cuts_both_sides_with_a_reset(relay: Relay, upstream) -> None:  # noqa: ANN001
    client, server = _pair(relay, upstream)
    with client:
        relay.arm(Fault.RESET)
        client.sendall(b"doomed")
        with pytest.raises(ConnectionResetError):
            while server.recv(4096):  # the relay forwards nothing before the reset
                pass
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(100):  # the client learns of it on a read or a later write
                client.sendall(b"x" * 65536)
                client.settimeout(0.05)
                try:
                    if client.recv(1) == b"":
                        raise ConnectionResetError("closed")
                except socket.timeout:
                    pass


def test_retarget_cuts_old_connections_and_dials_the_new_port(relay: Relay, upstream) -> None:  # noqa: ANN001
    client, server = _pair(relay, upstream)
    other = socket.create_server(("127.0.0.1", 0))
    other.settimeout(10)
    try:
        relay.retarget("127.0.0.1", other.getsockname()[1])
        with pytest.raises((ConnectionResetError, EOFError)):
            _recv_exactly(server, 1)
        client.close()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as c2:
            s2, _ = other.accept()
            with s2:
                c2.sendall(b"new")
                s2.settimeout(10)
                assert _recv_exactly(s2, 3) == b"new"
    finally:
        other.close()

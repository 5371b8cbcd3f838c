"""Backend selection and UCX settings: validated up front, environment wins."""

from __future__ import annotations

import pytest

from pdxfer.engine import ReceiverConfig, SenderConfig
from pdxfer.transport.nixl_agent import UCX_DEFAULTS, apply_ucx_env


def test_backend_values_are_validated():
    assert SenderConfig().backend == "tcp" and ReceiverConfig().backends == ("tcp", "nixl")
    with pytest.raises(ValueError, match="backend"):
        SenderConfig(backend="rdma")
    with pytest.raises(ValueError, match="backends"):
        ReceiverConfig(backends=("tcp", "carrier-pigeon"))
    with pytest.raises(ValueError, match="backends"):
        ReceiverConfig(backends=())
    with pytest.raises(ValueError, match="UCX_"):
        SenderConfig(backend="nixl", ucx={"TLS": "tcp"})
    assert ReceiverConfig(backends=["tcp"]).backends == ("tcp",)  # lists are accepted, stored as a tuple


def test_ucx_precedence_environment_then_config_then_defaults(monkeypatch):
    for key in list(UCX_DEFAULTS) + ["UCX_RNDV_THRESH"]:
        monkeypatch.setenv(key, "x")  # records the original state, restored after the test
        monkeypatch.delenv(key)
    monkeypatch.setenv("UCX_TLS", "tcp,self")  # what the operator set
    env = apply_ucx_env({"UCX_TLS": "tcp,self,sm,cma", "UCX_RNDV_THRESH": "8k"})
    assert env["UCX_TLS"] == "tcp,self"  # the environment is never overridden
    assert env["UCX_RNDV_THRESH"] == "8k"  # config fills what the environment left open
    assert env["UCX_NET_DEVICES"] == UCX_DEFAULTS["UCX_NET_DEVICES"]  # defaults fill the rest


def test_nixl_worker_count_is_validated():
    assert SenderConfig().nixl_workers == 2
    for bad in (0, 17):
        with pytest.raises(ValueError, match="nixl_workers"):
            SenderConfig(nixl_workers=bad)


def test_nixl_thread_nice_is_validated_on_both_ends():
    assert SenderConfig().nixl_nice == ReceiverConfig().nixl_nice == 10
    assert SenderConfig(nixl_nice=0).nixl_nice == 0 and ReceiverConfig(nixl_nice=19).nixl_nice == 19
    for cls in (SenderConfig, ReceiverConfig):
        for bad in (-1, 20, 2.5, True, "10"):
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.nixl_nice must be an int in 0\.\.19"):
                cls(nixl_nice=bad)


def test_receive_piece_size_is_validated():
    assert ReceiverConfig().recv_piece_bytes == 1 << 20
    with pytest.raises(ValueError, match="recv_piece_bytes"):
        ReceiverConfig(recv_piece_bytes=100)


@pytest.mark.parametrize("bad", ["nope", "host:", ":80", "host:0", "host:70000", "host:8x"])
def test_advertised_data_address_is_validated(bad):
    with pytest.raises(ValueError, match="advertise_data must be 'host:port'"):
        ReceiverConfig(advertise_data=bad)
    assert ReceiverConfig(advertise_data="10.0.0.7:9000").advertise_data == "10.0.0.7:9000"


def test_senders_dial_the_advertised_data_address(make_receiver, make_sender):
    """What HELLO_OK names is where the TCP data goes: through a relay here."""
    import numpy as np

    from pdxfer.chaos.relay import Relay
    from pdxfer.layout.payload import Payload

    relay = Relay("127.0.0.1", 1).start()  # pointed at the receiver once that has its port
    try:
        rx = make_receiver(advertise_data=relay.address)
        host, port = rx.data_address.rsplit(":", 1)
        relay.retarget(host, int(port))
        s = make_sender()
        h = s.open(rx.control_address, "via-relay", Payload((4096,)))
        h.put(0, np.arange(4096, dtype=np.uint8) % 251)
        h.future.result(20)
        assert relay.stats()["connections"] == 1 and relay.stats()["bytes_up"] >= 4096
    finally:
        relay.close()

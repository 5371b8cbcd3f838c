"""Sender and Receiver façades: an asyncio core on its own uvloop thread."""

from pdxfer.engine.config import ReceiverConfig, SenderConfig
from pdxfer.engine.handle import OutboundHandle
from pdxfer.engine.outctx import TransferResult
from pdxfer.engine.receiver import ReceivedTransfer, Receiver
from pdxfer.engine.sender import Sender

__all__ = ["Sender", "Receiver", "SenderConfig", "ReceiverConfig", "OutboundHandle", "ReceivedTransfer", "TransferResult"]

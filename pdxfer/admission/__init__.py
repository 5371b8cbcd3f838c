"""Receiver-side admission: reserve a transfer's whole receive buffer before any byte moves.

Sans-IO: time is passed in, nothing blocks. See :mod:`pdxfer.admission.controller` for
the rules and :mod:`pdxfer.admission.ledger` for the state tables and events.
"""

from pdxfer.admission.allocator import ExtentAllocator
from pdxfer.admission.controller import AdmissionController
from pdxfer.admission.ledger import (
    AdmissionStateError,
    Ended,
    EndReason,
    Grant,
    Granted,
    Ledger,
    Queued,
    Rejected,
    ReservationState,
    ReservationView,
)

__all__ = [
    "AdmissionController",
    "AdmissionStateError",
    "Ended",
    "EndReason",
    "ExtentAllocator",
    "Grant",
    "Granted",
    "Ledger",
    "Queued",
    "Rejected",
    "ReservationState",
    "ReservationView",
]

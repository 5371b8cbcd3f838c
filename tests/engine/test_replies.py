"""A receiver's REJECT / FAILED as the sender's typed error."""

import pytest

from pdxfer.engine.replies import failure_error, rejection_error
from pdxfer.errors import (
    AdmissionRejected, IntegrityError, LeaseExpired, ProtocolError, RejectReason, TransferAborted, TransferTimeout,
)
from pdxfer.protocol import messages as m


def test_rejection_names_reason_transfer_and_peer():
    err = rejection_error(m.Reject(cid=1, tid="t", reason="too_large", detail="9 > 8"), tid="t",
                          state="reserving", peer="tcp://d:1")
    assert isinstance(err, AdmissionRejected) and err.reason is RejectReason.TOO_LARGE
    assert err.transfer_id == "t" and err.peer == "tcp://d:1" and "9 > 8" in str(err)


def test_queue_timeout_is_our_own_deadline():
    err = rejection_error(m.Reject(cid=1, tid="t", reason="queue_timeout", detail="waited"), tid="t",
                          state="queued", peer="p")
    assert isinstance(err, TransferTimeout) and err.waiting_for == "queued"


def test_unknown_reject_reason_reads_as_bad_request():
    err = rejection_error(m.Reject(cid=1, tid="t", reason="from_the_future", detail=""), tid="t",
                          state="reserving", peer="p")
    assert isinstance(err, AdmissionRejected) and err.reason is RejectReason.BAD_REQUEST


@pytest.mark.parametrize("error, cls", [("integrity", IntegrityError), ("lease_expired", LeaseExpired),
                                        ("deadline", TransferTimeout), ("protocol", ProtocolError),
                                        ("something_new", TransferAborted)])
def test_failure_maps_to_its_typed_error(error, cls):
    err = failure_error(m.Failed(cid=1, tid="t", error=error, detail="why"), tid="t", peer="p")
    assert type(err) is cls and err.transfer_id == "t" and "why" in str(err)

"""The heartbeat rule, with time passed in."""

import pytest

from pdxfer.engine.liveness import Liveness


def test_lost_only_after_a_heartbeat_goes_unanswered_for_the_timeout():
    alive = Liveness(5.0)
    assert alive.overdue(100.0) is None  # nothing asked yet: silence is not loss
    alive.sent(100.0)
    alive.sent(103.0)  # a second heartbeat does not restart the count
    assert alive.overdue(105.0) is None
    assert alive.overdue(105.5) == pytest.approx(5.5)


def test_any_reply_or_going_idle_clears_the_count():
    alive = Liveness(1.0)
    alive.sent(0.0)
    alive.heard()
    assert alive.overdue(10.0) is None
    alive.sent(10.0)
    alive.idle()
    assert alive.overdue(20.0) is None


def test_a_stall_of_ours_with_nothing_sent_cannot_blame_the_peer():
    alive = Liveness(1.0)
    alive.sent(0.0)
    alive.heard()
    # our loop stalled for 30 s: no heartbeat went out, so nothing is overdue
    assert alive.overdue(30.0) is None
    alive.sent(30.0)
    assert alive.overdue(30.9) is None


def test_timeout_must_be_positive():
    with pytest.raises(ValueError, match="peer timeout"):
        Liveness(0)

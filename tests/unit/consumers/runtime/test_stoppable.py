"""A blocking call the daemons' stop flag does not wait for (``consumers.runtime.stoppable``)."""

from __future__ import annotations

import threading

import pytest

from consumers.runtime.stoppable import call_unless_stopped

pytestmark = pytest.mark.unit


def test_the_calls_exception_is_raised_in_the_caller() -> None:
    def refused() -> None:
        raise ConnectionRefusedError("nothing listens at 127.0.0.1:9")

    with pytest.raises(ConnectionRefusedError, match="127.0.0.1:9"):
        call_unless_stopped(refused, stopped=lambda: False)


def test_what_a_call_given_up_on_makes_later_is_discarded() -> None:
    release, discarded, stop = threading.Event(), threading.Event(), threading.Event()
    made: list[str] = []

    def connect() -> str:
        release.wait(10)
        return "client"

    stop.set()
    assert call_unless_stopped(connect, stopped=stop.is_set) is None  # stopped before it began: not even started
    stop.clear()
    threading.Timer(0.1, stop.set).start()
    assert call_unless_stopped(connect, stopped=stop.is_set,
                               discard=lambda client: (made.append(client), discarded.set())) is None
    release.set()
    assert discarded.wait(5) and made == ["client"]

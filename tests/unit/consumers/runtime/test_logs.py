"""The Kafka client's repeated complaints are folded; the daemons' own lines never are."""

from __future__ import annotations

import logging

import pytest

from consumers.runtime.logs import RepeatFilter

pytestmark = pytest.mark.unit


def test_kafka_client_repeats_are_folded_and_the_daemons_own_lines_are_not() -> None:
    now = [0.0]
    fold = RepeatFilter(window_s=60.0, clock=lambda: now[0])

    def shown(name: str, msg: str) -> bool:
        return fold.filter(logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None))

    outage = [shown("kafka.net.connection", "Connection lost: %s") for now[0] in (0.0, 0.5, 1.0, 30.0)]
    assert outage == [True, False, False, False]
    assert all(shown("crossdistil.trainer", "checkpoint failed") for now[0] in (31.0, 31.1))  # never folded
    assert shown("kafka.cluster", "No node available")  # another kind of message: shown at once
    now[0] = 61.0
    record = logging.LogRecord("kafka.net.connection", logging.ERROR, __file__, 1, "Connection lost: %s", None, None)
    assert fold.filter(record) and "[3 similar messages in the last 61 s not shown]" in record.msg


@pytest.fixture
def configure_as_a_daemon():
    """``configure`` on a root logger as a daemon starts with (no handler, so ``basicConfig`` acts); the handlers
    (pytest's) are put back at once, and the root's and ``kafka`` logger's levels after the test."""
    from consumers.runtime.logs import configure

    root, kafka = logging.getLogger(), logging.getLogger("kafka")
    levels = (root.level, kafka.level)

    def configure_fresh(level: str) -> None:
        saved = root.handlers[:]
        root.handlers.clear()
        try:
            configure(level)
        finally:
            for handler in root.handlers:
                handler.close()
            root.handlers[:] = saved

    yield configure_fresh
    root.setLevel(levels[0])
    kafka.setLevel(levels[1])


@pytest.mark.parametrize(("asked", "shown", "hidden"), [
    ("INFO", [logging.WARNING, logging.ERROR], [logging.DEBUG, logging.INFO]),
    ("warning", [logging.WARNING], [logging.INFO]),
    ("ERROR", [logging.ERROR], [logging.WARNING]),  # never below the level asked
    ("DEBUG", [logging.DEBUG, logging.INFO, logging.WARNING], []),
])
def test_the_kafka_clients_info_lines_are_shown_only_at_debug(configure_as_a_daemon, asked, shown, hidden) -> None:
    configure_as_a_daemon(asked)
    client = logging.getLogger("kafka.conn")
    assert [client.isEnabledFor(level) for level in shown] == [True] * len(shown)
    assert [client.isEnabledFor(level) for level in hidden] == [False] * len(hidden)
    daemon = logging.getLogger("crossdistil.trainer")  # the daemon's own lines follow the level asked
    assert daemon.isEnabledFor(logging.INFO) == (asked.upper() in ("DEBUG", "INFO"))

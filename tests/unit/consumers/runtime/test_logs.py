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

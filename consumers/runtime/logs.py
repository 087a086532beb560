"""Logging of the daemons: one format, and the Kafka client's repeated complaints folded.

While a broker is away, kafka-python logs the same few lines (connection refused, no node for metadata,
coordinator dead) several times a second: tens of thousands of lines an hour that bury the daemon's own. The
:class:`RepeatFilter` lets the first of each kind through, drops its repeats for ``window_s`` seconds, and
then lets the next one through with the number it dropped, so nothing is hidden for long and the log says how
much was folded. Only the ``kafka`` loggers are folded; the daemons' own lines always pass. ``configure`` also
keeps the client's INFO lines (each connection, bootstrap and group step) out unless ``--log-level DEBUG``.

>>> import logging
>>> clock = iter([0.0, 1.0, 2.0, 70.0]).__next__
>>> fold = RepeatFilter(window_s=60.0, clock=clock)
>>> def record(msg):
...     return logging.LogRecord("kafka.net", logging.ERROR, __file__, 1, msg, ("node 1",), None)
>>> [fold.filter(r) for r in (record("lost %s"), record("lost %s"), record("lost %s"), record("lost %s"))]
[True, False, False, True]
>>> r = record("lost %s"); fold.clock = lambda: 71.0; fold.filter(r)
False
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RepeatFilter(logging.Filter):
    """Folds repeats of the same (logger, level, message template) from ``prefixes`` loggers within ``window_s``."""

    def __init__(self, window_s: float = 60.0, prefixes: tuple[str, ...] = ("kafka",),
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.window_s = window_s
        self.prefixes = prefixes
        self.clock = clock
        self._seen: dict[tuple[str, int, str], list[float | int]] = {}  # key -> [last shown at, dropped since]

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= self.window_s:
            if seen is not None and seen[1]:
                record.msg = f"{record.msg} [{seen[1]} similar messages in the last {now - seen[0]:.0f} s not shown]"
            if len(self._seen) > 10_000:  # message templates are few; this only guards against formatted ones
                self._seen.clear()
            self._seen[key] = [now, 0]
            return True
        seen[1] += 1
        return False


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")  # what a daemon's --log-level takes (any case)


def configure(level: str | int = "INFO") -> None:
    """``logging.basicConfig`` on stderr with the daemons' format, and the Kafka client's repeats folded.

    The ``kafka`` loggers are held at WARNING (or the level asked, if higher) unless DEBUG is asked: kafka-python
    says at INFO every connection, bootstrap and group step, tens of lines in a short run, between the daemon's own.
    """
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr)
    logging.getLogger("kafka").setLevel(logging.NOTSET if level <= logging.DEBUG else max(level, logging.WARNING))
    fold = RepeatFilter()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(fold)


def close_quietly(what: str, close: Callable[[], object], logger: logging.Logger | None = None) -> None:
    """Run ``close`` (a client's close); a failure is logged as a warning naming ``what``, never raised: closing
    one of several clients must not keep the others open, or hide the error that led to the close.

    >>> close_quietly("producer", lambda: 1 / 0, logging.getLogger("doctest"))
    """
    try:
        close()
    except Exception as exc:
        (logger or logging.getLogger(__name__)).warning("closing the %s: %s", what, exc)

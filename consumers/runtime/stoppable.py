"""A blocking call that a stop request does not have to wait for: how the daemons connect to Kafka.

kafka-python's bootstrap blocks for up to its ``bootstrap_timeout_ms`` (10 s here) while a broker is away, and
nothing in it looks at the daemons' stop flag: a Ctrl-C or SIGTERM during it would wait that long and then report
an unreachable Kafka instead of stopping. :func:`call_unless_stopped` runs the call in a thread of its own and
returns as soon as the stop flag is set; what the call makes after that is handed to ``discard`` (a client that
nobody will use is closed).

>>> import threading, time
>>> call_unless_stopped(lambda: 42, stopped=lambda: False)
42
>>> stop = threading.Event()
>>> _ = threading.Timer(0.05, stop.set).start()
>>> call_unless_stopped(lambda: time.sleep(5), stopped=stop.is_set) is None  # back after ~0.05 s, not 5
True
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def call_unless_stopped(call: Callable[[], T], stopped: Callable[[], bool],
                        discard: Callable[[T], object] | None = None, check_s: float = 0.05) -> T | None:
    """``call()``'s result, or None as soon as ``stopped()`` is true (checked every ``check_s`` seconds, and
    before the call starts). The exception ``call`` raises is raised here. A call given up on runs to its end in
    its (daemon) thread: its result then goes to ``discard``, and its exception is dropped."""
    if stopped():
        return None
    lock = threading.Lock()
    done = threading.Event()
    results: list[T] = []
    errors: list[BaseException] = []
    abandoned = False

    def target() -> None:
        try:
            result = call()
        except BaseException as exc:  # raised by the caller below (or dropped, if it gave up)
            with lock:
                errors.append(exc)
                done.set()
            return
        with lock:
            results.append(result)
            done.set()
            given_up = abandoned
        if given_up and discard is not None:
            discard(result)

    threading.Thread(target=target, name="call-unless-stopped", daemon=True).start()
    while not done.wait(check_s):
        if stopped():
            with lock:
                if not done.is_set():
                    abandoned = True
                    return None
            break
    if errors:
        raise errors[0]
    return results[0]

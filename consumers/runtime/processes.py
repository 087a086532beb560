"""Process helpers shared by the daemons and tools: dying with the parent, the garbage collector's settings.

>>> GC_THRESHOLDS[0]
50000
"""

from __future__ import annotations

import gc
import signal
import subprocess

GC_THRESHOLDS = (50_000, 20, 10)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies, even by SIGKILL (elsewhere: no-op).

    For ``preexec_fn`` of daemons started by the demo and the tests (SIGTERM: they stop cleanly), and for the
    learner process (SIGKILL: it holds nothing worth saving), so a killed parent never leaves a broker, a
    trainer or a learner running (and spinning on a broker that is gone).
    """
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def tune_gc() -> None:
    """Set the collector up for a process that turns millions of small events into samples (trainer, backtest).

    Every event allocates a handful of dicts and lists, and with CPython's default (a young-generation
    collection every 700 net allocations) the collector keeps tracing objects that reference counting frees
    anyway: ``bench/pipeline_stages.py`` measured the trainer's core 1.4x faster with a threshold of 50,000
    (median of seven rounds). Reference cycles, which only the collector frees, just wait longer.
    Process-wide; the serving daemon keeps the default.
    """
    gc.set_threshold(*GC_THRESHOLDS)


def freeze_startup_objects() -> int:
    """Move every object alive now (imported modules, classes, functions: ~400,000 with torch) out of the
    collector's reach, so a full collection scans only what the process made since; returns their number.

    For the serving daemon, after its imports and again once its first model is served (what the HTTP server,
    the Kafka client and the model loading import lazily): a full (generation 2) collection,
    which request parsing triggers every few seconds under load, took ~390 ms with everything torch imports
    tracked (every request in flight waited for it: /score's p99 at 16 clients) and ~1 ms after the freeze.
    What is frozen is never collected, so this is only for objects that live as long as the process;
    :func:`unfreeze` before exit lets the interpreter tear them down as usual.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def unfreeze() -> None:
    """Undo :func:`freeze_startup_objects` (before exit: some extensions complain about objects never freed)."""
    gc.unfreeze()


def grow_pipe(fd: int, size: int = 1 << 20) -> None:
    """Ask Linux for a pipe buffer of ``size`` bytes (up to /proc/sys/fs/pipe-max-size), so that sending a batch
    returns at once instead of waiting for the other side to read it chunk by chunk; elsewhere: unchanged."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (OSError, ImportError):
        pass


def describe_exit(process: subprocess.Popen, timeout_s: float = 2.0) -> str:
    """How a child process ended, for an error message: "exit status N", "killed by signal N" or "still running"
    (if it has not ended within ``timeout_s``)."""
    try:
        code = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return "still running"
    return f"exit status {code}" if code >= 0 else f"killed by signal {-code}"

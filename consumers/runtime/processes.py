"""Process helpers shared by the daemons and tools: dying with the parent, the garbage collector's settings, forked
children.

>>> GC_THRESHOLDS[0]
50000
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Collection

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


def child_pids(environ: tuple[str, str] | None = None) -> list[int]:
    """The processes whose parent is this one and which have not ended (Linux: from /proc; elsewhere none); with
    ``environ`` (NAME, VALUE), only those started with that environment variable set to that value."""
    me, children = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    wanted = None if environ is None else f"{environ[0]}={environ[1]}".encode()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            if int(fields[1]) != me or fields[0] == b"Z":
                continue
            if wanted is not None:
                with open(f"/proc/{entry}/environ", "rb") as variables:
                    if wanted not in variables.read().split(b"\0"):
                        continue
        except OSError:  # gone meanwhile
            continue
        children.append(int(entry))
    return sorted(children)


def stop_children(sig: int = signal.SIGTERM, timeout_s: float = 30.0,
                  environ: tuple[str, str] | None = None) -> list[int]:
    """Send ``sig`` to every child process of this one still running (``child_pids(environ)``: with ``environ``,
    only those started with it), wait up to ``timeout_s`` for them to end, SIGKILL those left, and reap them all;
    the pids signalled.

    >>> other = subprocess.Popen(["sleep", "30"])
    >>> child = subprocess.Popen(["sleep", "30"], env={**os.environ, "STOP_CHILDREN_DOCTEST": "1"})
    >>> stop_children(timeout_s=5, environ=("STOP_CHILDREN_DOCTEST", "1")) == [child.pid], other.poll() is None
    (True, True)
    >>> other.kill(); other.wait()
    -9
    """
    pids = child_pids(environ)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline, left = time.monotonic() + timeout_s, set(pids)
    while left:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (its Popen)
                done = pid
            if done:
                left.discard(pid)
        if left and time.monotonic() >= deadline:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")  # now only reaping
        elif left:
            time.sleep(0.05)
    return pids


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


# ------------------------------------------------------------------------------------------- forked children


def can_fork() -> bool:
    """Whether :func:`fork_child` may be used here: Linux only (macOS' system libraries are not fork-safe)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


class ForkedProcess:
    """A child made by :func:`fork_child`, with the parts of ``subprocess.Popen``'s interface the callers use
    (``pid``, ``returncode``, ``poll``, ``wait``, ``kill``; ``wait`` raises ``subprocess.TimeoutExpired``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.args = f"forked child {pid}"

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere
                self.returncode = -1
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.001
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def fork_child(main: Callable[[], int], keep_fds: Collection[int]) -> ForkedProcess:
    """Run ``main()`` in a forked copy of this process (:func:`can_fork` must hold): no interpreter to start and
    nothing to import again (a learner process forked from a replay that imported torch is ready in milliseconds;
    started afresh it spends ~3.5 CPU s importing torch and ``torch._dynamo`` on a core the replay needs).

    In the child, before ``main``: every pipe and socket this process holds other than ``keep_fds`` is closed (a
    copy of another child's pipe end would keep that child from seeing its end of file), standard output and error
    get new file objects (another thread may have held the old ones' locks at the fork), and every object inherited
    is frozen out of the collector's reach (never finalised there: an inherited file object must not flush what the
    parent buffered). The child ends with ``os._exit`` (the parent's ``atexit`` handlers and finalisers never run
    there) with ``main``'s status, 1 if it raised. Only the forking thread exists in the child, so ``main`` must not
    wait on anything another thread of the parent would do; fork before this process starts thread pools that the
    child would use (torch's intra-op threads: fork only with one).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid:
        return ForkedProcess(pid)
    status = 1
    try:
        gc.freeze()
        _close_foreign_pipes(keep_fds)
        sys.stdout = open(1, "w", closefd=False, buffering=1)  # noqa: SIM115 - lives as long as the child
        sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
        status = main()
    except BaseException:  # noqa: BLE001 - the child reports and exits, whatever happened
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status if isinstance(status, int) else 1)


def _close_foreign_pipes(keep_fds: Collection[int]) -> None:
    """Close the pipes and sockets of this (forked) process except ``keep_fds`` and 0-2 (Linux: /proc/self/fd)."""
    keep = {0, 1, 2, *keep_fds}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(("pipe:", "socket:")):
                os.close(fd)

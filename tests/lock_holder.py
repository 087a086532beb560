"""Another process holding a checkpoint directory's writer lock (``CheckpointStore(dir, lock=True)``), for tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def lock_held_by_another_process(directory: Path) -> Iterator[subprocess.Popen]:
    """A child process that holds ``directory``'s lock until the block ends (then it exits and the lock goes)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from consumers.state.checkpoints import CheckpointStore; "
         f"s = CheckpointStore({str(directory)!r}, lock=True); print('locked', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.communicate("", timeout=30)

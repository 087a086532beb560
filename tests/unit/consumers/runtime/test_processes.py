"""``consumers.runtime.processes.fork_child``: a forked child's status, what it keeps and what it closes."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from consumers.runtime.processes import ForkedProcess, can_fork, describe_exit, fork_child

pytestmark = [pytest.mark.unit, pytest.mark.skipif(not can_fork(), reason="fork_child is Linux only")]


def test_a_forked_child_exits_with_its_mains_status_and_1_when_main_raises() -> None:
    assert fork_child(lambda: 7, keep_fds=()).wait(timeout=30) == 7

    def fails() -> int:
        raise RuntimeError("boom")

    assert fork_child(fails, keep_fds=()).wait(timeout=30) == 1


def test_a_forked_child_keeps_its_pipe_and_closes_every_other_so_the_parent_sees_end_of_file() -> None:
    kept_read, kept_write = os.pipe()
    other_read, other_write = os.pipe()  # a pipe the child must not hold: the parent closes its write end below

    def main() -> int:
        os.write(kept_write, b"alive")
        try:
            os.fstat(other_write)
        except OSError:
            os.write(kept_write, b" closed")
        return 0

    child = fork_child(main, keep_fds=(kept_write,))
    os.close(kept_write)
    os.close(other_write)
    assert child.wait(timeout=30) == 0
    assert os.read(kept_read, 100) == b"alive closed"
    assert os.read(other_read, 100) == b""  # end of file at once: no copy of the write end is left in the child
    os.close(kept_read)
    os.close(other_read)


def test_a_forked_child_does_not_run_the_parents_exit_handlers_or_flush_its_buffers(tmp_path) -> None:
    path = tmp_path / "parent.txt"
    with open(path, "w") as f:
        f.write("buffered by the parent")  # not flushed yet when the child starts
        child = fork_child(lambda: 0, keep_fds=())
        assert child.wait(timeout=30) == 0
    assert path.read_text() == "buffered by the parent"  # once, not twice


def test_a_forked_process_answers_like_popen_for_the_callers() -> None:
    child = fork_child(lambda: (time.sleep(60), 0)[1], keep_fds=())
    assert isinstance(child, ForkedProcess)
    assert child.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.05)
    child.kill()
    assert child.wait(timeout=30) == -9
    assert describe_exit(child) == "killed by signal 9"
    child.kill()  # gone already: nothing happens

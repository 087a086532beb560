"""``crossdistil train --world-size N --nnodes M``: the ranks of several machines under the same restart rule as
one machine's (``consumers.trainer.command.launch_ranks``, ``consumers.runtime.ranks.NodeGroup``).

Two "nodes" are two launcher processes on 127.0.0.1 with torchrun's real launcher and static rendezvous, each
running one sh worker that exits with the status the test chooses per generation (``TORCHELASTIC_RUN_ID`` is
``crossdistil-<g>``). A worker of the other node that "loses" the failed rank exits 8 a while later, as a rank does
when its collective fails: so one node's launcher always finishes its attempt before the other's.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from consumers.runtime.ranks import STATUS_DIR_ENV
from consumers.trainer import command

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[4]
WAIT_S = 60  # a node's command still running after this fails the test


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker(tmp_path: Path, body: str) -> Path:
    """An sh worker: notes each start as "<rank> <generation>" in ``starts``, then runs ``body`` (``$G`` is the
    generation, ``$D`` the test's folder)."""
    script = tmp_path / "worker.sh"
    script.write_text(f"D={shlex.quote(str(tmp_path))}; G=${{TORCHELASTIC_RUN_ID#crossdistil-}}\n"
                      f"echo \"$RANK $G\" >> \"$D/starts\"\n{body}\n")
    return script


def start_node(tmp_path: Path, node: int, port: int, script: Path, restarts: int = 2,
               timeout_s: float = 20, exit_on_stop: int = 0) -> subprocess.Popen:
    """Node ``node`` of two: ``launch_ranks`` in a process of its own, one rank, rendezvous at 127.0.0.1:port."""
    args = command.torchrun_command([], 2, restarts, 2, node, f"127.0.0.1:{port}", timeout_s)[3:]
    args = args[:args.index("-m")] + ["--monitor-interval", "0.1", "--no-python", "sh", str(script)]
    return start_launcher(tmp_path, f"node{node}", args, exit_on_stop=exit_on_stop)


def start_launcher(tmp_path: Path, name: str, args: list[str], run_dir: Path | None = None, exit_on_stop: int = 0,
                   tmpdir: Path | None = None) -> subprocess.Popen:
    """``launch_ranks(args, run_dir, exit_on_stop)`` in a process of its own, logging to ``<name>.log``, with
    ``TMPDIR`` set to ``tmpdir`` if given, else to a folder in ``tmp_path`` (a launcher a test kills cannot remove its
    temporary folder)."""
    if tmpdir is None:
        tmpdir = tmp_path / f"{name}-tmp"
        tmpdir.mkdir(exist_ok=True)
    folder = f"Path({str(run_dir)!r})" if run_dir else "None"
    code = ("import sys; from pathlib import Path; from consumers.trainer.command import launch_ranks; "
            f"sys.exit(launch_ranks({args!r}, {folder}, {exit_on_stop}))")
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir else {})}
    log = open(tmp_path / f"{name}.log", "ab")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)


def finish(tmp_path: Path, nodes: list[subprocess.Popen]) -> list[int]:
    """Each node's exit status; a node still running after ``WAIT_S`` fails the test."""
    deadline = time.monotonic() + WAIT_S
    try:
        statuses = [node.wait(timeout=max(0.1, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node still ran after {WAIT_S} s:\n{logs(tmp_path)}")
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    return statuses


def logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log")))


def starts(tmp_path: Path) -> list[str]:
    path = tmp_path / "starts"
    return sorted(path.read_text().splitlines()) if path.exists() else []


def wait_until(condition: Callable[[], bool], what: str, tmp_path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT_S} s:\n{logs(tmp_path)}")
        time.sleep(0.05)


# Generation 0: rank 1 (node 1) fails with STATUS; rank 0 (node 0) loses it and exits 8 two seconds later.
LOSES_RANK_1 = """case "$RANK:$G" in
  1:0) touch "$D/failed"; exit {status};;
  0:0) while [ ! -f "$D/failed" ]; do sleep 0.05; done; sleep 2; exit 8;;
  *) exit 0;;
esac"""


def test_two_nodes_restart_together_after_a_transient_failure_on_one_and_meet_again(tmp_path: Path) -> None:
    """Node 1's launcher ends its attempt two seconds before node 0's; it waits for node 0's decision, then both
    start generation 1 and meet there (one start each per generation), and finish with 0."""
    script, port = worker(tmp_path, LOSES_RANK_1.format(status=9)), free_port()
    nodes = [start_node(tmp_path, node, port, script) for node in (0, 1)]
    assert finish(tmp_path, nodes) == [0, 0], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "0 1", "1 0", "1 1"], logs(tmp_path)
    for node in (0, 1):
        said = (tmp_path / f"node{node}.log").read_text()
        assert "rank 1 exited with status 9: restarting the group (1 of 2 restarts)" in said, logs(tmp_path)


@pytest.mark.parametrize("status", [2, 10])
def test_a_status_a_restart_would_repeat_on_one_node_ends_every_node_with_it_after_one_start(
        tmp_path: Path, status: int) -> None:
    """Node 0's rank only lost rank 1 (8, transient): the group's decision, rank 1's status, ends node 0 too."""
    script, port = worker(tmp_path, LOSES_RANK_1.format(status=status)), free_port()
    nodes = [start_node(tmp_path, node, port, script) for node in (0, 1)]
    assert finish(tmp_path, nodes) == [status, status], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "1 0"], logs(tmp_path)
    assert "restarting the group" not in logs(tmp_path)


def test_the_restarts_are_counted_for_the_group_and_end_every_node_after_max_restarts(tmp_path: Path) -> None:
    """Every generation fails (rank 1 with 9): R = 1 restart, then both nodes end with 9."""
    body = """if [ "$RANK" = 1 ]; then touch "$D/failed-$G"; exit 9; fi
while [ ! -f "$D/failed-$G" ]; do sleep 0.05; done; sleep 1; exit 8"""
    script, port = worker(tmp_path, body), free_port()
    nodes = [start_node(tmp_path, node, port, script, restarts=1) for node in (0, 1)]
    assert finish(tmp_path, nodes) == [9, 9], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "0 1", "1 0", "1 1"], logs(tmp_path)
    assert logs(tmp_path).count("after 1 of 1 restarts (--max-restarts): giving up") == 2


# Rank 1's node is stopped: its rank checkpoints a last round (it records and exits with LAST), and rank 0, stopped
# by the ranks' agreement, exits with LAST as well.
STOPPED = """trap 'echo {last} > "${status_dir}/rank-$RANK"; touch "$D/stopped"; exit {last}' TERM
if [ "$RANK" = 1 ]; then while :; do sleep 0.05; done; fi
while [ ! -f "$D/stopped" ]; do sleep 0.05; done; exit {last}"""


@pytest.mark.parametrize(("last", "exit_on_stop", "status"), [(9, 0, 9), (0, 0, 0), (0, 75, 75)])
def test_a_stop_of_one_node_ends_every_node_with_the_status_of_the_ranks_last_round(
        tmp_path: Path, last: int, exit_on_stop: int, status: int) -> None:
    """SIGTERM to node 1's command: its agent stops its rank without keeping the status, which the rank recorded;
    9 (the last round failed) ends both nodes with 9, not 0; 0 ends both with 0 at once (node 0's agent waits at
    torch's exit barrier for node 1, which a stopped node's command checks in to), or with --exit-on-stop's status
    (node 0's rank was stopped by the group: a Job's pod of either node is made again)."""
    script = worker(tmp_path, STOPPED.format(last=last, status_dir="{" + STATUS_DIR_ENV + "}"))
    port = free_port()
    nodes = [start_node(tmp_path, node, port, script, exit_on_stop=exit_on_stop) for node in (0, 1)]
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    nodes[1].send_signal(signal.SIGTERM)
    assert finish(tmp_path, nodes) == [status, status], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "1 0"], logs(tmp_path)
    assert "the ranks were told to stop (Process " in (tmp_path / "node1.log").read_text(), logs(tmp_path)


def one_machine(tmp_path: Path, last: int) -> list[str]:
    """torchrun arguments of two sh ranks on one machine (--standalone) that note each start, then run until a
    SIGTERM, on which each records ``last`` as its status and exits with it (a stop, its last round)."""
    script = tmp_path / "worker.sh"
    script.write_text(f"trap 'echo {last} > \"${{{STATUS_DIR_ENV}}}/rank-$RANK\"; exit {last}' TERM\n"
                      f"echo $RANK >> {shlex.quote(str(tmp_path / 'starts'))}\nwhile :; do sleep 0.05; done\n")
    return ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
            "--no-python", "sh", str(script)]


def test_a_stop_of_one_machines_ranks_whose_last_round_failed_exits_9(tmp_path: Path) -> None:
    """One machine (--standalone): the ranks record 9 on SIGTERM; the command exits 9 instead of 0."""
    process = start_launcher(tmp_path, "node0", one_machine(tmp_path, 9))
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    process.send_signal(signal.SIGTERM)
    assert finish(tmp_path, [process]) == [9], logs(tmp_path)
    assert "rank 0 exited with status 9 (its last round could not be written)" in logs(tmp_path) or \
        "rank 1 exited with status 9 (its last round could not be written)" in logs(tmp_path), logs(tmp_path)


@pytest.mark.parametrize(("last", "exit_on_stop", "status"), [(0, 75, 75), (0, 0, 0), (9, 75, 9)])
def test_a_stop_ends_the_command_with_exit_on_stop_unless_the_last_round_failed(
        tmp_path: Path, last: int, exit_on_stop: int, status: int) -> None:
    """--exit-on-stop 75: a stop whose ranks recorded 0 ends the command with 75 (a Job's pod Fails, and is made
    again); 0 without it; a last round that failed (9) keeps its status."""
    process = start_launcher(tmp_path, "node0", one_machine(tmp_path, last), exit_on_stop=exit_on_stop)
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    process.send_signal(signal.SIGTERM)
    assert finish(tmp_path, [process]) == [status], logs(tmp_path)
    assert ("after the stop (--exit-on-stop)" in logs(tmp_path)) == (status == 75), logs(tmp_path)


def test_ranks_that_finish_end_the_command_with_0_whatever_exit_on_stop(tmp_path: Path) -> None:
    """The end of a finite stream (--exit-when-idle) is no stop: 0, the Job's index is complete."""
    script = worker(tmp_path, "exit 0")
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
            "--no-python", "sh", str(script)]
    assert finish(tmp_path, [start_launcher(tmp_path, "node0", args, exit_on_stop=75)]) == [0], logs(tmp_path)
    assert "the ranks finished" in logs(tmp_path)


def test_a_run_of_the_ranks_leaves_nothing_in_the_temporary_folder_nor_its_launcher_folder(tmp_path: Path) -> None:
    """torchrun's launcher makes a log folder (/tmp/torchelastic_*) per attempt unless told where: the command puts
    it in its own launcher folder, which goes when the command ends (here: a restart after 9, then 0)."""
    script = worker(tmp_path, 'if [ ! -f "$D/failed" ]; then touch "$D/failed"; exit 9; fi; exit 0')
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
            "--no-python", "sh", str(script)]
    tmpdir, launcher = tmp_path / "tmp", tmp_path / "checkpoints" / "launcher"
    tmpdir.mkdir()
    for run_dir in (None, launcher / "node-0"):
        (tmp_path / "failed").unlink(missing_ok=True)
        process = start_launcher(tmp_path, "node0", args, run_dir=run_dir, tmpdir=tmpdir)
        assert finish(tmp_path, [process]) == [0], logs(tmp_path)
        assert "restarting the group (1 of 2 restarts)" in logs(tmp_path)
        assert sorted(p.name for p in tmpdir.iterdir()) == [], run_dir
        assert not launcher.exists()


def test_what_a_command_killed_with_sigkill_left_is_removed_by_the_next_start_of_its_node(tmp_path: Path) -> None:
    """kill -9 of the command and its ranks leaves its launcher folder (the ranks' statuses, torchrun's logs); the
    next command of that node clears it at start and removes it at its end; node 1's folder is not node 0's."""
    # the killed command's ranks outlive it (torch starts them in sessions of their own): they end at "second"
    script = worker(tmp_path, 'while [ ! -f "$D/second" ]; do sleep 0.05; done; exit 0')
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
            "--no-python", "sh", str(script)]
    launcher = tmp_path / "checkpoints" / "launcher"
    other = launcher / "node-1" / "attempt-0"
    other.mkdir(parents=True)  # another node's, on a volume both share
    first = start_launcher(tmp_path, "first", args, run_dir=launcher / "node-0")
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    os.killpg(first.pid, signal.SIGKILL)  # the command, its launcher and its ranks
    first.wait()
    left = sorted(p.name for p in (launcher / "node-0").iterdir())
    assert {".lock", "attempt-0", "logs"} <= set(left), left
    (tmp_path / "second").touch()
    assert finish(tmp_path, [start_launcher(tmp_path, "second", args, run_dir=launcher / "node-0")]) == [0], \
        logs(tmp_path)
    assert not (launcher / "node-0").exists()
    assert other.is_dir()


def test_a_second_command_of_the_same_node_is_refused_and_leaves_the_first_ones_folder(tmp_path: Path) -> None:
    args = one_machine(tmp_path, 0)
    run_dir = tmp_path / "checkpoints" / "launcher" / "node-0"
    first = start_launcher(tmp_path, "first", args, run_dir=run_dir)
    try:
        wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
        assert finish(tmp_path, [start_launcher(tmp_path, "second", args, run_dir=run_dir)]) == [2], logs(tmp_path)
        said = (tmp_path / "second.log").read_text()
        assert f"in use by another crossdistil train --world-size command (pid {first.pid})" in said, said
        assert (run_dir / "attempt-0").is_dir() and len(starts(tmp_path)) == 2
    finally:
        first.send_signal(signal.SIGTERM)  # its ranks record 0 and exit
    assert finish(tmp_path, [first]) == [0], logs(tmp_path)


def test_a_replaced_node_joins_the_next_generation(tmp_path: Path) -> None:
    """Node 1's command dies with its rank (kill -9 of both: a lost machine); node 0's rank loses it (8), node 0
    waits for node 1's outcome in vain, restarts as generation 1, and a new command on node 1 joins that one."""
    body = """if [ "$RANK:$G" = 1:0 ]; then while [ ! -f "$D/killed" ]; do sleep 0.05; done; exit 9; fi
if [ "$RANK:$G" = 0:0 ]; then while [ ! -f "$D/killed" ]; do sleep 0.05; done; exit 8; fi
exit 0"""
    script, port = worker(tmp_path, body), free_port()
    # node 0 waits this long for node 1's outcome, in vain, then as long for the replacement to join generation 1,
    # which starts a Python process with torch (with 5 s this test was seen failing once, on a machine at load 13)
    timeout_s = 12
    first = (start_node(tmp_path, 0, port, script, timeout_s=timeout_s),
             start_node(tmp_path, 1, port, script, timeout_s=timeout_s))
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    os.killpg(first[1].pid, signal.SIGKILL)
    first[1].wait()
    (tmp_path / "killed").touch()
    replacement = start_node(tmp_path, 1, port, script, timeout_s=timeout_s)
    assert finish(tmp_path, [first[0], replacement]) == [0, 0], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "0 1", "1 0", "1 1"], logs(tmp_path)
    assert "(node 1 did not report)" in (tmp_path / "node0.log").read_text(), logs(tmp_path)


def test_a_rank_records_its_exit_status_where_the_launcher_reads_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(command, "_rank_status", lambda *args: 9)
    info = type("Info", (), {"rank": 1})()
    assert command._run_rank(None, info, None, None) == 9
    assert (tmp_path / "rank-1").read_text().strip() == "9"


def _raise(exc: Exception):
    def rank_status(*args: object) -> int:
        raise exc
    return rank_status


@pytest.mark.parametrize(("error", "status"), [("learner", 6), ("checkpoint", 2)])
def test_a_rank_that_ends_with_an_error_records_the_status_it_exits_with(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str, status: int) -> None:
    """A learner process that failed (6) or checkpoints that cannot be used (2), e.g. in a stop's last round: the
    launcher reads the status after the stop, which would otherwise end the command with 0."""
    from consumers.runtime.learner_process import LearnerProcessError
    from consumers.state.checkpoints import CheckpointError

    exc = LearnerProcessError("the learner process died") if error == "learner" else CheckpointError("unusable")
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(command, "_rank_status", _raise(exc))
    assert command._run_rank(None, type("Info", (), {"rank": 1})(), None, None) == status
    assert (tmp_path / "rank-1").read_text().strip() == str(status)


def test_a_rank_that_crashes_records_status_1_and_raises_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(command, "_rank_status", _raise(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        command._run_rank(None, type("Info", (), {"rank": 0})(), None, None)
    assert (tmp_path / "rank-0").read_text().strip() == "1"


@pytest.mark.parametrize(("flags", "problem"), [
    (["--world-size", "3", "--nnodes", "2", "--master-addr", "a"], "--world-size 3 is not a multiple of --nnodes 2"),
    (["--world-size", "2", "--nnodes", "2"], "--nnodes needs --master-addr HOST"),
    (["--world-size", "2", "--nnodes", "2", "--node-rank", "2", "--master-addr", "a"], "--node-rank 2: 0 to"),
    (["--nnodes", "2", "--master-addr", "a"], "--nnodes and --node-rank need --world-size N"),
])
def test_node_flags_out_of_range_are_refused_naming_the_flag(flags: list[str], problem: str) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert problem in (command.flag_problem(parser.parse_args(flags)) or "")


@pytest.mark.parametrize(("flags", "problem"), [
    (["--world-size", "2", "--exit-on-stop", "9"], "--exit-on-stop 9: 11 to 125"),
    (["--world-size", "2", "--exit-on-stop", "143"], "--exit-on-stop 143: 11 to 125"),
    (["--exit-on-stop", "75"], "--exit-on-stop 75 needs --world-size N"),
    (["--world-size", "2", "--exit-on-stop", "75"], None),
])
def test_exit_on_stop_takes_a_status_of_its_own_and_several_ranks(flags: list[str], problem: str | None) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    said = command.flag_problem(parser.parse_args(flags))
    assert said is None if problem is None else problem in (said or ""), said


def test_the_node_flags_become_a_static_rendezvous_of_the_launcher_and_leave_the_ranks_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    launched: list[tuple[list[str], Path, int]] = []
    monkeypatch.setattr(command, "launch_ranks", lambda *call: launched.append(call) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = ["--set", f"checkpoint.dir='{tmp_path / 'checkpoints'}'", "--world-size", "4", "--nnodes", "2",
             "--node-rank", "1", "--master-addr", "hostA", "--master-port", "29600", "--max-restarts", "5",
             "--exit-on-stop", "75"]
    monkeypatch.setattr(command.sys, "argv", ["crossdistil", "train", *flags])
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(flags)) == 0
    args, run_dir, exit_on_stop = launched[0]
    assert (run_dir, exit_on_stop) == (tmp_path / "checkpoints" / "launcher" / "node-1", 75)
    where = args[:args.index("-m")]
    assert where == ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2", "--master-addr", "hostA",
                     "--master-port", "29600", "--rdzv-backend", "static", "--rdzv-conf", "timeout=600",
                     "--max-restarts", "5"]
    assert args[args.index("-m"):] == ["-m", "consumers.cli", "train", "--set", flags[1]]  # no node flag left

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
               timeout_s: float = 20) -> subprocess.Popen:
    """Node ``node`` of two: ``launch_ranks`` in a process of its own, one rank, rendezvous at 127.0.0.1:port."""
    args = command.torchrun_command([], 2, restarts, 2, node, f"127.0.0.1:{port}", timeout_s)[3:]
    args = args[:args.index("-m")] + ["--monitor-interval", "0.1", "--no-python", "sh", str(script)]
    code = f"import sys; from consumers.trainer.command import launch_ranks; sys.exit(launch_ranks({args!r}))"
    log = open(tmp_path / f"node{node}.log", "ab")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
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


@pytest.mark.parametrize("last", [9, 0])
def test_a_stop_of_one_node_ends_every_node_with_the_status_of_the_ranks_last_round(tmp_path: Path,
                                                                                  last: int) -> None:
    """SIGTERM to node 1's command: its agent stops its rank without keeping the status, which the rank recorded;
    9 (the last round failed) ends both nodes with 9, not 0; 0 ends both with 0 at once (node 0's agent waits at
    torch's exit barrier for node 1, which a stopped node's command checks in to)."""
    script = worker(tmp_path, STOPPED.format(last=last, status_dir="{" + STATUS_DIR_ENV + "}"))
    port = free_port()
    nodes = [start_node(tmp_path, node, port, script) for node in (0, 1)]
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    nodes[1].send_signal(signal.SIGTERM)
    assert finish(tmp_path, nodes) == [last, last], logs(tmp_path)
    assert starts(tmp_path) == ["0 0", "1 0"], logs(tmp_path)
    assert "the ranks were told to stop (Process " in (tmp_path / "node1.log").read_text(), logs(tmp_path)


def test_a_stop_of_one_machines_ranks_whose_last_round_failed_exits_9(tmp_path: Path) -> None:
    """One machine (--standalone): the ranks record 9 on SIGTERM; the command exits 9 instead of 0."""
    script = tmp_path / "worker.sh"
    script.write_text(f"trap 'echo 9 > \"${{{STATUS_DIR_ENV}}}/rank-$RANK\"; exit 9' TERM\n"
                      f"echo $RANK >> {shlex.quote(str(tmp_path / 'starts'))}\nwhile :; do sleep 0.05; done\n")
    args = ["--standalone", "--nproc-per-node", "2", "--max-restarts", "2", "--monitor-interval", "0.1",
            "--no-python", "sh", str(script)]
    code = f"import sys; from consumers.trainer.command import launch_ranks; sys.exit(launch_ranks({args!r}))"
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=open(tmp_path / "node0.log", "ab"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    process.send_signal(signal.SIGTERM)
    assert finish(tmp_path, [process]) == [9], logs(tmp_path)
    assert "rank 0 exited with status 9 (its last round could not be written)" in logs(tmp_path) or \
        "rank 1 exited with status 9 (its last round could not be written)" in logs(tmp_path), logs(tmp_path)


def test_a_replaced_node_joins_the_next_generation(tmp_path: Path) -> None:
    """Node 1's command dies with its rank (kill -9 of both: a lost machine); node 0's rank loses it (8), node 0
    waits for node 1's outcome in vain, restarts as generation 1, and a new command on node 1 joins that one."""
    body = """if [ "$RANK:$G" = 1:0 ]; then while :; do sleep 0.05; done; fi
if [ "$RANK:$G" = 0:0 ]; then while [ ! -f "$D/killed" ]; do sleep 0.05; done; exit 8; fi
exit 0"""
    script, port = worker(tmp_path, body), free_port()
    first = start_node(tmp_path, 0, port, script, timeout_s=5), start_node(tmp_path, 1, port, script, timeout_s=5)
    wait_until(lambda: len(starts(tmp_path)) == 2, "start of both ranks", tmp_path)
    os.killpg(first[1].pid, signal.SIGKILL)
    first[1].wait()
    (tmp_path / "killed").touch()
    replacement = start_node(tmp_path, 1, port, script, timeout_s=5)
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


def test_the_node_flags_become_a_static_rendezvous_of_the_launcher_and_leave_the_ranks_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    launched: list[list[str]] = []
    monkeypatch.setattr(command, "launch_ranks", lambda argv: launched.append(argv) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = ["--set", f"checkpoint.dir='{tmp_path / 'checkpoints'}'", "--world-size", "4", "--nnodes", "2",
             "--node-rank", "1", "--master-addr", "hostA", "--master-port", "29600", "--max-restarts", "5"]
    monkeypatch.setattr(command.sys, "argv", ["crossdistil", "train", *flags])
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command.run(parser.parse_args(flags)) == 0
    args = launched[0]
    where = args[:args.index("-m")]
    assert where == ["--nnodes", "2", "--node-rank", "1", "--nproc-per-node", "2", "--master-addr", "hostA",
                     "--master-port", "29600", "--rdzv-backend", "static", "--rdzv-conf", "timeout=600",
                     "--max-restarts", "5"]
    assert args[args.index("-m"):] == ["-m", "consumers.cli", "train", "--set", flags[1]]  # no node flag left

"""Two machines' ranks under ``crossdistil train --world-size 2 --nnodes 2`` (deploy/compose/ranks.yml,
deploy/k8s-ranks), as two commands on 127.0.0.1 against the real local broker: after a kill -9 of rank 1 both
nodes restart the group together and it trains every impression exactly once; a model that diverges ends both
nodes' commands with 10 after one start, with nothing written or published after the last good round. And on
one machine, a stop of the command whose ranks' last round cannot be written exits 9, not 0.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.runtime.config import load_config
from consumers.runtime.local_kafka import free_port
from consumers.runtime.processes import die_with_parent
from consumers.state.checkpoints import CheckpointStore
from consumers.state.ledger import read_ledger
from consumers.trainer.kafka_io import newest_published_version
from tests.integration.test_ranks_kafka import (
    FILE_LIMIT,
    complete_round,
    rank_pids,
    rank_starts,
    ranks_config,
    start_ranks,
    stop_and_wait,
    wait_for,
)
from tests.integration.test_trainer_kafka import POSITIVES, TASKS, assert_exactly_once, kuairand_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
__all__ = ["kuairand_topics"]  # the module fixture, shared with the one-trainer tests


def start_nodes(config: Path, ledger: Path, logs: list[Path], restarts: int = 3) -> list[subprocess.Popen]:
    """Node 0 and node 1 of ``crossdistil train --world-size 2 --nnodes 2``, rendezvous at 127.0.0.1."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
         "--exit-when-idle", "4", "--torch-threads", "1", "--world-size", "2", "--nnodes", "2", "--node-rank", str(n),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", str(restarts)],
        cwd=REPO, stdout=open(logs[n], "ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}, preexec_fn=die_with_parent)
        for n in range(2)]


def test_two_nodes_restart_together_after_a_kill_and_train_every_impression_once(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    config = ranks_config(tmp_path, kafka_broker, kuairand_topics, "trainer.toml")
    ledger, checkpoints = tmp_path / "ledger", tmp_path / "checkpoints"
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = start_nodes(config, ledger, logs)
    try:
        wait_for(lambda: complete_round(checkpoints) >= 2, "second checkpoint round", nodes[0], logs[0])
        pid = rank_pids(logs[1])[1]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: rank_pids(logs[1]).get(1) != pid, "restart of rank 1", nodes[1], logs[1])
        for node, log in zip(nodes, logs):
            assert stop_and_wait(node, log) == 0, log.read_text(errors="replace")[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for log in logs:
        text = log.read_text(errors="replace")
        assert "rank 1 was killed by signal 9 (SIGKILL): restarting the group (1 of 3 restarts)" in text, text[-4000:]
    assert "rank 1/2 restored round" in logs[1].read_text(), logs[1].read_text()[-3000:]
    rows = read_ledger(ledger / "rank-0") + read_ledger(ledger / "rank-1")
    assert_exactly_once(rows)
    assert {task: sum(r[f"label/{task}"] for r in rows) for task in TASKS} == POSITIVES


def test_a_model_that_diverges_on_two_nodes_ends_both_with_10_after_one_start(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """A good model checkpoints and publishes, stopped by SIGTERM to node 1's command (both end with 0); restarted
    with model.options.lr = 1e30 it diverges, and neither node starts its rank again (--max-restarts 2)."""
    checkpoints, ledger = tmp_path / "checkpoints", tmp_path / "ledger"
    good = ranks_config(tmp_path, kafka_broker, kuairand_topics, "good.toml")
    logs = [tmp_path / f"good{n}.log" for n in range(2)]
    nodes = start_nodes(good, ledger, logs)
    try:
        wait_for(lambda: complete_round(checkpoints) >= 1, "a first checkpoint round", nodes[0], logs[0])
        nodes[1].send_signal(signal.SIGTERM)  # a stop of one node stops the group: a last round, then 0 on both
        assert [stop_and_wait(node, log) for node, log in zip(nodes, logs)] == [0, 0], logs[1].read_text()[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    last_good = complete_round(checkpoints)
    version = CheckpointStore(checkpoints / "rank-0").latest(with_tensors=False).metadata["publish_version"]
    kafka = load_config(good, env={}).kafka
    assert version >= 1 and newest_published_version(kafka) == version

    diverging = ranks_config(tmp_path, kafka_broker, kuairand_topics, "diverging.toml", lr=1e30)
    logs = [tmp_path / f"diverging{n}.log" for n in range(2)]
    nodes = start_nodes(diverging, ledger, logs, restarts=2)
    try:
        statuses = [stop_and_wait(node, log) for node, log in zip(nodes, logs)]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    text = "\n".join(log.read_text(errors="replace") for log in logs)
    assert statuses == [10, 10], text[-6000:]
    assert rank_starts(logs[0]) == 1 and "restarting the group" not in text, text[-6000:]
    assert complete_round(checkpoints) == last_good
    assert max(CheckpointStore(checkpoints / "rank-0").steps()) == last_good
    assert newest_published_version(kafka) == version


def test_a_stop_of_the_command_whose_last_round_cannot_be_written_exits_9_without_a_restart(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """No file may grow over ``FILE_LIMIT`` (as on a full disk): every round fails; SIGTERM to ``crossdistil train
    --world-size 2`` stops the ranks, whose last round fails too. torch's agent keeps no status of ranks it stopped:
    the command reads the ones they recorded."""
    config, log = ranks_config(tmp_path, kafka_broker, kuairand_topics, "trainer.toml"), tmp_path / "ranks.log"

    def small_files() -> None:
        die_with_parent()
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    process = start_ranks(config, tmp_path / "ledger", log, restarts=2, preexec=small_files)
    try:
        wait_for(lambda: "could not be written ([Errno 27]" in log.read_text(errors="replace"), "a failed round",
                 process, log)
        process.send_signal(signal.SIGTERM)
        status = stop_and_wait(process, log)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    assert status == 9, text[-5000:]
    assert rank_starts(log) == 1 and "restarting the group" not in text, text[-5000:]
    assert re.search(r"the ranks were told to stop \(Process \d+ got signal: 15; each checkpoints its part of a "
                     r"last round\): rank \d exited with status 9 \(its last round could not be written\)", text)
    assert complete_round(tmp_path / "checkpoints") == 0

"""Several trainer ranks, one model (``consumers.trainer.ranked``), against the real local broker.

Two gloo ranks under torchrun (``crossdistil train --world-size 2``) read KuaiRand from 4-partition topics: every
impression must be trained exactly once over the union of the ranks' ledgers, with its exact labels, after kill -9
of rank 1 twice and of rank 0 once at random moments (torchrun restarts the group, which resumes from the newest
complete checkpoint round); and ``crossdistil serve`` must serve the model rank 0 published, scoring exactly as
the final checkpoint's model. ``crossdistil train --world-size 2 --max-restarts R`` restarts the ranks after a
transient failure only: a model that diverges (exit 10) is started once and publishes nothing after the last good
round; a last round that cannot be written (exit 9) is restarted R times and then ends the command with 9.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from consumers.runtime.config import load_config, to_toml, toml_value
from consumers.runtime.local_kafka import free_port
from consumers.runtime.processes import die_with_parent
from consumers.state.checkpoints import CheckpointStore
from consumers.state.ledger import read_ledger
from consumers.trainer.kafka_io import newest_published_version
from tests.integration.test_trainer_kafka import (
    POSITIVES,
    SMALL_MODEL,
    TASKS,
    assert_exactly_once,
    kuairand_topics,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 420
__all__ = ["kuairand_topics"]  # the module fixture, shared with the one-trainer tests


def start_ranks(config: Path, ledger: Path, log: Path, restarts: int = 6, preexec=die_with_parent,
                flags: tuple[str, ...] = (), env: dict[str, str] | None = None) -> subprocess.Popen:
    """``crossdistil train --world-size 2`` with ``flags`` more, and ``env`` over this process's environment."""
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
         "--exit-when-idle", "4", "--torch-threads", "1", "--world-size", "2", "--max-restarts", str(restarts),
         *flags], cwd=REPO, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo", **(env or {})}, preexec_fn=preexec)


def rank_starts(log: Path) -> int:
    """How often rank 0 started (its banner), over every attempt of the group."""
    return len(re.findall(r"rank 0/2 \(gloo, mode \w+\), pid \d+", log.read_text(errors="replace")))


def rank_pids(log: Path) -> dict[int, int]:
    """The newest process id of each rank, from the ranks' banners."""
    pids: dict[int, int] = {}
    for rank, pid in re.findall(r"rank (\d+)/2 \(gloo, mode \w+\), pid (\d+)", log.read_text(errors="replace")):
        pids[int(rank)] = int(pid)
    return pids


def complete_round(checkpoints: Path) -> int:
    try:
        return int(json.loads((checkpoints / "rank-0" / "round.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return 0


def wait_for(condition, what: str, process: subprocess.Popen, log: Path, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the ranks exited ({process.returncode}) while waiting for {what}:\n" \
                                       f"{log.read_text(errors='replace')[-5000:]}"
        assert time.monotonic() < deadline, \
            f"no {what} within {timeout_s} s:\n{log.read_text(errors='replace')[-5000:]}"
        time.sleep(0.05)


def test_two_ranks_train_every_impression_once_across_kill_9_and_serve_the_model(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "trainer.toml", kafka_broker, kuairand_topics, every_steps=5,
                          max_poll_records=200)
    config.write_text(to_toml(load_config(config, env={}, overrides=["distributed.timeout_s=60.0"])))
    log, ledger, checkpoints = tmp_path / "ranks.log", tmp_path / "ledger", tmp_path / "checkpoints"
    rng = random.Random(int(os.environ.get("CROSSDISTIL_TEST_SEED", "5")))
    process = start_ranks(config, ledger, log)
    try:
        for kills, rank in enumerate((1, 0, 1)):
            before = complete_round(checkpoints)
            wait_for(lambda before=before: complete_round(checkpoints) > before, "new checkpoint round", process, log)
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment: mid-poll, mid-step, mid-round, mid-publication
            pid = rank_pids(log)[rank]
            os.kill(pid, signal.SIGKILL)
            print(f"\nkill {kills + 1}: rank {rank} (pid {pid}) after round {complete_round(checkpoints)}")
            wait_for(lambda rank=rank, pid=pid: rank_pids(log).get(rank) != pid, "restart of the group", process, log)
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text(errors="replace")[-6000:]
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    restored = re.findall(r"rank 0/2 restored round (\d+)", text)
    print(f"\nrank 0 resumed from rounds {restored}")
    assert len(restored) >= 3, text[-4000:]
    rows = read_ledger(ledger / "rank-0") + read_ledger(ledger / "rank-1")
    assert_exactly_once(rows)
    assert {task: sum(r[f"label/{task}"] for r in rows) for task in TASKS} == POSITIVES
    assert read_ledger(ledger / "rank-0") and read_ledger(ledger / "rank-1"), "one rank trained nothing"
    check_served(config, checkpoints, tmp_path)


def check_served(config: Path, checkpoints: Path, tmp_path: Path) -> None:
    """``crossdistil serve`` on the serving topic scores like the model of rank 0's final round."""
    from consumers.state.checkpoints import CheckpointStore
    from consumers.state.learner_state import learner_state
    from models.features import encode_rows
    from models.learner import Learner

    final = CheckpointStore(checkpoints / "rank-0").latest()
    assert final.step == complete_round(checkpoints)
    version = final.metadata["publish_version"]
    learner = Learner.from_state_dict(learner_state(final.metadata, final.tensors))
    port = free_port()
    serve_log = tmp_path / "serve.log"
    serving = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--config", str(config), "--set", f"serving.port={port}",
         "--set", "metrics.port=0"], cwd=REPO, stdout=open(serve_log, "ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
    probe = [{"impression_id": f"p{u}", "ts_ms": 1_650_000_000_000 + u, "user_id": str(u), "item_id": str(7 * u),
              "features": {"hour": str(u % 24), "weekday": str(u % 7), "duration_ms": 1000.0 * u}} for u in range(32)]
    try:
        deadline = time.monotonic() + 120
        body: dict = {}
        while body.get("model_version") != version:
            assert serving.poll() is None and time.monotonic() < deadline, serve_log.read_text()[-3000:]
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=json.dumps(probe).encode(),
                                                 method="POST", headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=5) as response:
                    body = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.wait(timeout=30)
    expected = learner.predict(encode_rows(probe, learner.config.features, learner.config.tasks))
    for task in TASKS:
        assert torch.allclose(torch.tensor(body["probabilities"][task]), expected[task], atol=1e-6), task


def test_two_nodes_with_static_node_ranks_resume_after_a_kill_and_train_every_impression_once(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """The two-host setup of docs/scaling.md (deploy/compose/ranks.yml, deploy/k8s-ranks), on 127.0.0.1: one torchrun
    agent per node, static node ranks, node 0 hosting the rendezvous; rank 1 is killed once."""
    config = write_config(tmp_path / "trainer.toml", kafka_broker, kuairand_topics, every_steps=5,
                          max_poll_records=200)
    config.write_text(to_toml(load_config(config, env={}, overrides=["distributed.timeout_s=60.0"])))
    ledger, checkpoints, port = tmp_path / "ledger", tmp_path / "checkpoints", free_port()
    logs = [tmp_path / f"node{n}.log" for n in range(2)]
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(n),
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "3",
         "--log-dir", str(tmp_path / f"torchrun-{n}"),  # not a /tmp/torchelastic_* folder left behind
         "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger), "--exit-when-idle", "4",
         "--torch-threads", "1"], cwd=REPO, stdout=open(logs[n], "ab"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}, preexec_fn=die_with_parent)
        for n in range(2)]
    try:
        wait_for(lambda: complete_round(checkpoints) >= 2, "second checkpoint round", nodes[0], logs[0])
        pid = rank_pids(logs[1])[1]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: rank_pids(logs[1]).get(1) != pid, "restart of rank 1", nodes[1], logs[1])
        for node, log in zip(nodes, logs):
            assert node.wait(timeout=RUN_TIMEOUT_S) == 0, log.read_text(errors="replace")[-5000:]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert re.findall(r"rank 1/2 restored round (\d+)", logs[1].read_text()), logs[1].read_text()[-3000:]
    rows = read_ledger(ledger / "rank-0") + read_ledger(ledger / "rank-1")
    assert_exactly_once(rows)
    assert {task: sum(r[f"label/{task}"] for r in rows) for task in TASKS} == POSITIVES



def ranks_config(tmp_path: Path, kafka_broker: str, topics: dict[str, str], name: str, **options: float) -> Path:
    """Two ranks' configuration with this test's own checkpoint.dir and serving topic; ``options``: model options
    over the small model's (e.g. ``lr``)."""
    config = write_config(tmp_path / name, kafka_broker, topics, model_topic=f"model-{tmp_path.name}",
                          every_steps=5, max_poll_records=200)
    overrides = ["distributed.timeout_s=60.0", "publish.enabled=true",
                 f"model.options={toml_value({**SMALL_MODEL, **options})}"]
    config.write_text(to_toml(load_config(config, env={}, overrides=overrides)))
    return config


def stop_and_wait(process: subprocess.Popen, log: Path) -> int:
    """The command's exit status; a command still running after ``RUN_TIMEOUT_S`` is killed (and fails the test)."""
    try:
        return process.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the ranks still ran after {RUN_TIMEOUT_S} s:\n{log.read_text(errors='replace')[-5000:]}")


def test_a_model_that_diverges_under_two_ranks_exits_10_at_once_and_publishes_nothing_after_the_last_good_round(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """A good model checkpoints and publishes a round, then restarts with model.options.lr = 1e30 (retunable):
    it diverges within a few steps, and ``--max-restarts 2`` does not start it again (it would diverge again on the
    same events, twice more, restoring the same round)."""
    checkpoints, ledger = tmp_path / "checkpoints", tmp_path / "ledger"
    good, good_log = ranks_config(tmp_path, kafka_broker, kuairand_topics, "good.toml"), tmp_path / "good.log"
    process = start_ranks(good, ledger, good_log)
    try:
        wait_for(lambda: complete_round(checkpoints) >= 1, "a first checkpoint round", process, good_log)
        process.send_signal(signal.SIGTERM)  # a stop: every rank checkpoints its part of a last round, rank 0 publishes
        assert stop_and_wait(process, good_log) == 0, good_log.read_text(errors="replace")[-5000:]
    finally:
        if process.poll() is None:
            process.kill()
    last_good = complete_round(checkpoints)
    version = CheckpointStore(checkpoints / "rank-0").latest(with_tensors=False).metadata["publish_version"]
    kafka = load_config(good, env={}).kafka
    assert version >= 1 and newest_published_version(kafka) == version

    diverging = ranks_config(tmp_path, kafka_broker, kuairand_topics, "diverging.toml", lr=1e30)
    log = tmp_path / "diverging.log"
    process = start_ranks(diverging, ledger, log, restarts=2)
    try:
        status = stop_and_wait(process, log)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    print(f"\nlast good round {last_good} (version {version}); exit {status}, rank 0 started {rank_starts(log)} times")
    assert status == 10, text[-5000:]
    assert f"rank 0/2 restored round {last_good}" in text and "the model diverged: " in text, text[-5000:]
    assert rank_starts(log) == 1 and "restarting the group" not in text, text[-5000:]
    assert re.search(r"rank \d exited with status 10 \(the model diverged\): the group is not restarted", text)
    assert complete_round(checkpoints) == last_good
    assert max(CheckpointStore(checkpoints / "rank-0").steps()) == last_good  # no part of a later round either
    assert newest_published_version(kafka) == version


FILE_LIMIT = 1 << 20  # bytes: each rank's part of a round is larger (rank 0's holds the model and its optimizer state)


def test_a_last_round_that_cannot_be_written_is_restarted_max_restarts_times_then_ends_the_command_with_9(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """Status 9 is transient (a full disk may be freed): restarted. No file may grow over ``FILE_LIMIT``, so the
    ranks' parts of every round fail, as on a full disk; rank 0 is stopped once its group failed a round, so that
    the ranks' last round fails too (exit 9): twice, with ``--max-restarts 1``."""
    config, log = ranks_config(tmp_path, kafka_broker, kuairand_topics, "trainer.toml"), tmp_path / "ranks.log"
    failed = re.compile(r"rank 0/2: its part of checkpoint round \d+ could not be written \(\[Errno 27\]")

    def failed_since_start() -> int:
        text = log.read_text(errors="replace")
        starts = list(re.finditer(r"rank 0/2 \(gloo, mode \w+\), pid \d+", text))
        return len(failed.findall(text, starts[-1].end())) if starts else 0

    def small_files() -> None:
        die_with_parent()
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))

    process = start_ranks(config, tmp_path / "ledger", log, restarts=1, preexec=small_files)
    try:
        for start in (1, 2):
            wait_for(lambda start=start: rank_starts(log) == start and failed_since_start() >= 1,
                     f"a failed round after start {start}", process, log)
            os.kill(rank_pids(log)[0], signal.SIGTERM)  # a stop of the ranks (not of the command): a last round
        status = stop_and_wait(process, log)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    print(f"\nexit {status}, rank 0 started {rank_starts(log)} times")
    assert status == 9, text[-5000:]
    assert rank_starts(log) == 2 and "restarting the group (1 of 1 restarts)" in text, text[-5000:]
    assert re.search(r"rank \d exited with status 9 after 1 of 1 restarts \(--max-restarts\): giving up", text)
    assert complete_round(tmp_path / "checkpoints") == 0


def test_a_stop_with_exit_on_stop_checkpoints_a_last_round_exits_with_that_status_and_leaves_nothing_behind(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    """deploy/k8s-ranks passes ``--exit-on-stop 75``: a stop (a preempted pod's SIGTERM) still checkpoints every
    rank's part of a last round, and the command exits 75 (the Job makes the pod again) instead of 0. The command's
    TMPDIR is a folder of the test: torchrun's logs and the ranks' statuses live in checkpoint.dir/launcher/node-0
    while it runs, which goes when it ends, so that folder stays empty (torchrun left a torchelastic_* folder there
    per start of the ranks)."""
    config, log = ranks_config(tmp_path, kafka_broker, kuairand_topics, "trainer.toml"), tmp_path / "ranks.log"
    checkpoints, tmpdir = tmp_path / "checkpoints", tmp_path / "tmp"
    tmpdir.mkdir()
    process = start_ranks(config, tmp_path / "ledger", log, flags=("--exit-on-stop", "75"),
                          env={"TMPDIR": str(tmpdir)})
    try:
        wait_for(lambda: complete_round(checkpoints) >= 1, "a first checkpoint round", process, log)
        assert (checkpoints / "launcher" / "node-0" / "attempt-0").is_dir()
        process.send_signal(signal.SIGTERM)
        status = stop_and_wait(process, log)
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    print(f"\nexit {status}; in TMPDIR after: {sorted(p.name for p in tmpdir.iterdir())}")
    assert status == 75, text[-5000:]
    assert "crossdistil train: exiting with status 75 after the stop (--exit-on-stop)" in text, text[-5000:]
    last = re.findall(r"rank 0/2: checkpoint round (\d+) \(shutdown\)", text)
    assert last and complete_round(checkpoints) == int(last[-1]), text[-5000:]
    assert f"rank 1/2: checkpoint round {last[-1]} (shutdown)" in text
    assert rank_starts(log) == 1
    # torchinductor_<user>: torch's compile cache, one folder per user that every run reuses, not one per run
    assert sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")) == []
    assert not (checkpoints / "launcher").exists()

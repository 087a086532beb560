"""Acceptance of ``crossdistil train`` against a real broker: the daemon runs as a subprocess, as a user runs it.

KuaiRand is streamed once per module into its own topics (4 partitions); every test reads them with its own
consumer group, checkpoint directory, ledger and serving topic, so the tests do not interfere.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from consumers.ledger import read_ledger
from consumers.local_kafka import ensure_topics
from models.metrics import auc

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMPRESSIONS = 41_828
POSITIVES = {"click": 27_484, "long_view": 19_320, "like": 33_745}
TASKS = ("click", "long_view", "like")
RUN_TIMEOUT_S = 240
# Longer than every real delay of the data (play time <= 613 s, likes 2 s after it).
WINDOWS = "{click = 30, long_view = 700, like = 700}"
SMALL_MODEL = ("{embedding_dim = 8, hidden_dims = [32], tower_dims = [16], "
               "features = {categorical = ['user_id', 'item_id', 'hour', 'weekday'], numeric = ['duration_ms'], "
               "hash_buckets = 65536}}")


def make_topics(bootstrap: str, tag: str) -> dict[str, str]:
    topics = {"impressions": f"imp-{tag}", "feedback": f"fb-{tag}", "dead_letters": f"dl-{tag}", "model": f"model-{tag}"}
    ensure_topics(bootstrap, 4, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    return topics


def stream_kuairand(bootstrap: str, source: Path, topics: dict[str, str], envelope: int = 1) -> dict:
    from streamer.stream import stream_dataset

    return stream_dataset("kuairand", str(source), f"kafka://{bootstrap}", envelope=envelope,
                          impression_topic=topics["impressions"], feedback_topic=topics["feedback"])


@pytest.fixture(scope="module")
def kuairand_topics(kafka_broker: str) -> dict[str, str]:
    """KuaiRand streamed once (single events, keyed by user) into 4-partition topics of this module."""
    source = REPO.parent / "shared" / "data" / "kuairand"
    if not source.is_dir():
        pytest.skip(f"real data not available: {source} does not exist (it lives outside the repository)")
    topics = make_topics(kafka_broker, "kuairand-" + uuid.uuid4().hex[:6])
    summary = stream_kuairand(kafka_broker, source, topics)
    assert summary["impressions"] == IMPRESSIONS
    return topics


def write_config(path: Path, bootstrap: str, topics: dict[str, str], *, model_topic: str | None = None,
                 every_steps: int = 40, batch_size: int = 256) -> Path:
    """A small-model trainer configuration of its own group, checkpoint directory and serving topic."""
    group = f"trainer-{uuid.uuid4().hex[:8]}"
    path.write_text(f"""
[kafka]
bootstrap = "{bootstrap}"
group_id = "{group}"
impressions_topic = "{topics['impressions']}"
feedback_topic = "{topics['feedback']}"
dead_letter_topic = "{topics['dead_letters']}"
model_topic = "{model_topic or topics['model']}"
client_options = {{session_timeout_ms = 6000, heartbeat_interval_ms = 1000}}

[join]
attribution_window_s = {WINDOWS}
idle_timeout_s = 600.0

[batching]
batch_size = {batch_size}
max_batch_delay_s = 2.0

[model]
tasks = ["click", "long_view", "like"]
device = "cpu"
options = {SMALL_MODEL}

[checkpoint]
dir = "{path.parent / 'checkpoints'}"
every_steps = {every_steps}
every_s = 0.0
keep_last = 2

[metrics]
port = 0
""")
    return path


def start_trainer(config: Path, ledger: Path, idle_s: float = 4.0) -> subprocess.Popen:
    log = open(config.parent / "trainer.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
         "--exit-when-idle", str(idle_s)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_finished(process: subprocess.Popen, config: Path, timeout_s: float = RUN_TIMEOUT_S) -> None:
    try:
        rc = process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        rc = None
    log = (config.parent / "trainer.log").read_text(errors="replace")
    assert rc == 0, f"trainer exited with {rc}:\n{log[-6000:]}"


def run_trainer(config: Path, ledger: Path) -> None:
    wait_finished(start_trainer(config, ledger), config)


def tail_auc(rows: list[dict], task: str, share: float = 0.2) -> float:
    tail = rows[int(len(rows) * (1 - share)):]
    return auc(np.array([r[f"label/{task}"] for r in tail]), np.array([r[f"pred/{task}"] for r in tail]))


def assert_exactly_once(rows: list[dict]) -> None:
    counts = Counter(r["impression_id"] for r in rows)
    twice = [i for i, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} impressions trained more than once, e.g. {twice[:5]}"
    assert len(counts) == IMPRESSIONS, f"{IMPRESSIONS - len(counts)} impressions never trained"


def test_trainer_consumes_kuairand_and_trains_every_impression_once_with_exact_labels(
        kafka_broker: str, kuairand_topics: dict[str, str], tmp_path: Path) -> None:
    config = write_config(tmp_path / "trainer.toml", kafka_broker, kuairand_topics)
    started = time.monotonic()
    run_trainer(config, tmp_path / "ledger")
    rows = read_ledger(tmp_path / "ledger")
    assert_exactly_once(rows)
    positives = {task: sum(r[f"label/{task}"] for r in rows) for task in TASKS}
    assert positives == POSITIVES
    aucs = {task: tail_auc(rows, task) for task in ("click", "long_view")}
    print(f"\nprequential AUC over the last 20% of samples: {aucs} ({time.monotonic() - started:.0f} s)")
    assert aucs["click"] > 0.55 and aucs["long_view"] > 0.55

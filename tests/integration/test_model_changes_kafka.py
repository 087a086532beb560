"""A running model's configuration changed against a real broker: a trainer of two tasks trains on KuaiRand, stops,
is restarted with a lower learning rate (a retuned restore), stops again, and a new trainer of three tasks starts
from its checkpoint (a warm start resuming its cut of the stream). Every impression is trained exactly once across
the three runs and both models, with exact labels (but for the new task's, of the few impressions held at the
cut)."""

from __future__ import annotations

import random
import re
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from consumers.state.ledger import read_ledger
from models.metrics import auc
from tests.integration.test_trainer_kafka import (  # noqa: F401  (module fixtures, used by name)
    IMPRESSIONS,
    POSITIVES,
    REPO,
    RUN_TIMEOUT_S,
    SMALL_MODEL,
    WINDOWS,
    assignments,
    kuairand_topics,
    make_topics,
    newest_checkpoint_step,
    start_trainer,
    uninterrupted,
    wait_finished,
)
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration


def config(directory: Path, bootstrap: str, topics: dict[str, str], checkpoints: Path, tasks: list[str],
           **settings) -> Path:
    """A small-model trainer of ``tasks`` that checkpoints often and reads slowly (so it can be stopped mid-stream)."""
    directory.mkdir(parents=True, exist_ok=True)
    serving_topic = f"model-{uuid.uuid4().hex[:8]}"
    return write_trainer_config(directory / "trainer.toml", bootstrap, {**topics, "model": serving_topic}, {
        "kafka.max_poll_records": 200,
        "join.attribution_window_s": WINDOWS,  # like's window too: its feedback is ignored by the two-task model
        "join.idle_timeout_s": 600.0,
        "batching.batch_size": 256,
        "batching.max_batch_delay_s": 2.0,
        "model.tasks": tasks,
        "checkpoint.dir": str(checkpoints),
        "checkpoint.every_steps": 5,
        "checkpoint.every_s": 0.0,
        "checkpoint.keep_last": 2,
        **settings,
    })


def stop_mid_stream(config_path: Path, ledger: Path, checkpoints: Path, rng: random.Random) -> str:
    """Start a trainer, let it write a checkpoint of its own and train a moment more, then SIGTERM it (exit 0, a last
    checkpoint); its log."""
    log = config_path.parent / "trainer.log"
    before, assigned = newest_checkpoint_step(checkpoints), assignments(log)
    process = start_trainer(config_path, ledger)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while assignments(log) <= assigned or newest_checkpoint_step(checkpoints) <= before:
        assert process.poll() is None, f"trainer exited early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no checkpoint within {RUN_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 0.3))
    assert process.poll() is None, f"trainer finished the stream before the stop:\n{log.read_text()[-4000:]}"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
    return log.read_text()


def stream_part(bootstrap: str, topics: dict[str, str], routed: list) -> None:
    from streamer.sinks import open_sink
    from streamer.stream import stream_events

    sink = open_sink(f"kafka://{bootstrap}", (topics["impressions"], topics["feedback"]), envelope=1)
    stream_events(routed, sink, impression_topic=topics["impressions"], feedback_topic=topics["feedback"])


def newest_cut(checkpoints: Path) -> tuple[int, int]:
    """(records read, impressions pending in the join) as of the newest checkpoint (read-only: the live trainer's
    folder is left as it is)."""
    from consumers.trainer.checkpointing import read_checkpoint

    if newest_checkpoint_step(checkpoints) < 0:
        return 0, 0
    meta = read_checkpoint(checkpoints).metadata
    return sum(offset for _, _, offset in meta["positions"]), len(meta["join_state"]["pending"])


def test_a_retuned_restart_then_a_warm_started_model_with_a_task_added_train_every_impression_once(
        kafka_broker: str, uninterrupted: dict, tmp_path: Path) -> None:  # noqa: F811
    """KuaiRand's first half is streamed; a two-task model trains on it, stops, and trains on with a lower learning
    rate to its end; then the second half is streamed and a three-task model warm-started from the first one's
    checkpoint trains it (and the impressions held at the cut)."""
    from streamer.datasets import open_dataset
    from streamer.stream import merge_events

    source = REPO.parent / "shared" / "data" / "kuairand"
    topics = make_topics(kafka_broker, "changes-" + uuid.uuid4().hex[:6])
    routed = list(merge_events(open_dataset("kuairand", source).interactions(), impression_topic=topics["impressions"],
                               feedback_topic=topics["feedback"]))
    half = len(routed) // 2
    stream_part(kafka_broker, topics, routed[:half])
    rng = random.Random(7)
    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    two, three = ["click", "long_view"], ["click", "long_view", "like"]

    # 1. a model of two tasks trains, then stops
    first = config(old_dir / "first", kafka_broker, topics, old_dir / "checkpoints", two,
                   **{"model.options": SMALL_MODEL})
    stop_mid_stream(first, old_dir / "ledger", old_dir / "checkpoints", rng)

    # 2. restarted with a lower learning rate: restored (not refused), said once, trained on to the first half's end
    # (partitions at their end stop holding the watermark back after 20 s: a restart whose first assignment is
    # empty, as kafka-python's sometimes is, forgets their clocks and would hold the join's impressions that long)
    retuned = config(old_dir / "retuned", kafka_broker, topics, old_dir / "checkpoints", two,
                     **{"model.options": {**SMALL_MODEL, "lr": 0.0005}, "checkpoint.every_s": 1.0,
                        "join.idle_timeout_s": 20.0})
    process = start_trainer(retuned, old_dir / "ledger")
    log_path, deadline = old_dir / "retuned" / "trainer.log", time.monotonic() + RUN_TIMEOUT_S
    while ("crossdistil train: consuming" not in log_path.read_text()  # restored, its stop handler in place
           or (cut := newest_cut(old_dir / "checkpoints"))[0] < half or cut[1] > 1000):  # all read, all but the tail
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()  # trained
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    log = (old_dir / "retuned" / "trainer.log").read_text()
    assert re.search(r"ckpt-\d{12}\.cdckpt: model\.options\.lr was 0\.001, now 0\.0005 \(retuned on restore\)", log)
    assert "trainer: restored " in log

    # 3. the second half arrives; a new model of three tasks starts from the old one's weights and its cut
    stream_part(kafka_broker, topics, routed[half:])
    warm = config(new_dir, kafka_broker, topics, new_dir / "checkpoints", three,
                  **{"model.options": {**SMALL_MODEL, "lr": 0.0005},
                     "checkpoint.warm_start": str(old_dir / "checkpoints")})
    wait_finished(start_trainer(warm, new_dir / "ledger"), warm)
    log = (new_dir / "trainer.log").read_text()
    assert "warm start: a new model from " in log and "the stream resumes from the old checkpoint's cut" in log
    held = int(re.search(r"warm start: the (\d+) samples held at the cut", log).group(1))
    said = [line[line.index("warm start"):][:300] for line in log.splitlines() if "warm start: " in line]
    print("\n" + "\n".join(said))

    old_rows, new_rows = read_ledger(old_dir / "ledger"), read_ledger(new_dir / "ledger")
    ids = [r["impression_id"] for r in old_rows + new_rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} impressions trained twice"
    assert len(set(ids)) == IMPRESSIONS, f"{IMPRESSIONS - len(set(ids))} impressions never trained"
    assert IMPRESSIONS // 4 < len(old_rows) and IMPRESSIONS // 4 < len(new_rows)
    for task in two:  # exact labels across the change
        assert sum(r[f"label/{task}"] for r in old_rows + new_rows) == POSITIVES[task]
    # like: exact, but for samples held at the cut, whose like feedback before the cut the old model ignored
    truth = {r["impression_id"]: r["label/like"] for r in uninterrupted["rows"]}
    missed = [r["impression_id"] for r in new_rows if r["label/like"] != truth[r["impression_id"]]]
    assert all(truth[i] == 1 for i in missed) and len(missed) <= held, (len(missed), held)

    def tail_auc(rows: list[dict], task: str) -> float:
        return auc(np.array([r[f"label/{task}"] for r in rows]), np.array([r[f"pred/{task}"] for r in rows]))

    later = set(r["impression_id"] for r in new_rows)
    reference = [r for r in uninterrupted["rows"] if r["impression_id"] in later]
    aucs = {task: (round(tail_auc(new_rows, task), 4), round(tail_auc(reference, task), 4)) for task in three}
    print(f"{len(old_rows)} impressions trained by the two-task model, {len(new_rows)} by the warm-started "
          f"three-task one ({held} held at the cut, {len(missed)} like labels missed there); prequential AUC over the "
          f"latter's impressions (warm-started, uninterrupted three-task run): {aucs}")
    assert aucs["click"][0] > 0.55 and aucs["like"][0] > 0.55

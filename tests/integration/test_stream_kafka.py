"""Acceptance of ``crossdistil stream``: the whole KuaiRand file into a real broker and into an event log, read
back as a third party would, from the contract alone (kafka-python and msgpack; no project imports for reading).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from tests.topic_reader import read_topic as topic_records

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
IMPRESSIONS = 41_828
FEEDBACK = {"click": 27_484, "long_view": 19_320, "like": 33_745}
READ_DEADLINE_S = 180


def crossdistil_stream(*args: str) -> subprocess.CompletedProcess:
    """Run the real command line, as a user would."""
    result = subprocess.run([sys.executable, "-m", "consumers.cli", "stream", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"crossdistil stream failed:\n{result.stdout}\n{result.stderr}"
    return result


def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, dict]]:
    """Every (key, event) on a topic, batch envelopes unwrapped, reading up to the end offsets as they are now."""
    out: list[tuple[bytes | None, dict]] = []
    for record in topic_records(bootstrap, topic, timeout_s=READ_DEADLINE_S):
        value = msgpack.unpackb(record.value, raw=False)
        out += [(record.key, event) for event in (value["batch"] if "batch" in value else [value])]
    return out


def assert_kuairand_counts(impressions: list[dict], feedback: list[dict]) -> None:
    assert len(impressions) == IMPRESSIONS
    assert len({e["impression_id"] for e in impressions}) == IMPRESSIONS
    assert Counter(e["task"] for e in feedback) == FEEDBACK
    assert all(e["v"] == 1 and e["value"] > 0 for e in feedback)


@pytest.fixture
def kuairand_dir(shared_data: Path) -> Path:
    return shared_data / "kuairand"


def test_kuairand_into_kafka_reads_back_exactly_with_a_plain_consumer(kafka_broker: str, kuairand_dir: Path,
                                                                       unique_topic) -> None:
    impressions_topic, feedback_topic = unique_topic("impressions"), unique_topic("feedback")
    crossdistil_stream("--dataset", "kuairand", "--source", str(kuairand_dir), "--to", f"kafka://{kafka_broker}",
                       "--impressions-topic", impressions_topic, "--feedback-topic", feedback_topic, "--quiet")
    shown = read_topic(kafka_broker, impressions_topic)
    fed = read_topic(kafka_broker, feedback_topic)
    assert_kuairand_counts([e for _, e in shown], [e for _, e in fed])
    user_of = {e["impression_id"]: e["user_id"] for _, e in shown}
    assert all(key == e["user_id"].encode("utf-8") for key, e in shown)
    assert all(key == user_of[e["impression_id"]].encode("utf-8") for key, e in fed)  # same key as the impression


def test_kuairand_in_envelopes_of_100_reads_back_the_same_counts(kafka_broker: str, kuairand_dir: Path,
                                                                  unique_topic) -> None:
    impressions_topic, feedback_topic = unique_topic("impressions"), unique_topic("feedback")
    crossdistil_stream("--dataset", "kuairand", "--source", str(kuairand_dir), "--to", f"kafka://{kafka_broker}",
                       "--impressions-topic", impressions_topic, "--feedback-topic", feedback_topic,
                       "--envelope", "100", "--quiet")
    shown = read_topic(kafka_broker, impressions_topic)
    fed = read_topic(kafka_broker, feedback_topic)
    assert_kuairand_counts([e for _, e in shown], [e for _, e in fed])


def test_kuairand_into_an_event_log_reads_back_with_msgpack_alone(kuairand_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "kuairand.evlog"
    result = crossdistil_stream("--dataset", "kuairand", "--source", str(kuairand_dir), "--to", f"file://{log}")
    assert "27,484" in result.stdout  # the summary table
    with log.open("rb") as handle:
        records = list(msgpack.Unpacker(handle, raw=False))
    impressions = [r["event"] for r in records if r["topic"] == "impressions"]
    feedback = [r["event"] for r in records if r["topic"] == "feedback"]
    assert len(impressions) + len(feedback) == len(records)
    assert_kuairand_counts(impressions, feedback)
    times = [r["event"]["ts_ms"] for r in records]
    assert all(a <= b for a, b in zip(times, times[1:])), "event time goes backwards in the log"


def test_an_event_log_replays_into_kafka_under_its_logged_topics(kafka_broker: str, tmp_path: Path,
                                                                  unique_topic) -> None:
    log = tmp_path / "synthetic.evlog"
    topics = ["--impressions-topic", unique_topic("impressions"), "--feedback-topic", unique_topic("feedback")]
    crossdistil_stream("--dataset", "synthetic", "--option", "n_events=2000", "--to", f"file://{log}", *topics,
                       "--quiet")
    with log.open("rb") as handle:
        logged = [(r["topic"], r["key"].encode("utf-8"), r["event"]) for r in msgpack.Unpacker(handle, raw=False)]
    crossdistil_stream("--dataset", "log", "--source", f"file://{log}", "--to", f"kafka://{kafka_broker}", *topics,
                       "--quiet")
    for topic in (topics[1], topics[3]):
        expected = sorted(((key, e["impression_id"], e["ts_ms"]) for t, key, e in logged if t == topic))
        got = sorted((key, e["impression_id"], e["ts_ms"]) for key, e in read_topic(kafka_broker, topic))
        assert got == expected


def topics_limited_to(bootstrap: str, unique_topic, max_message_bytes: int, partitions: int) -> dict[str, str]:
    """New impressions and feedback topics whose max.message.bytes is ``max_message_bytes``."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topics = {"impressions": unique_topic("impressions"), "feedback": unique_topic("feedback")}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, partitions, 1, topic_configs={"max.message.bytes": str(max_message_bytes)})
                             for t in topics.values()])
        admin.wait_for_topics(list(topics.values()), timeout_ms=30_000)
    finally:
        admin.close()
    return topics


def test_envelopes_over_the_topics_message_limit_go_as_halves_and_every_event_arrives(kafka_broker: str,
                                                                                       unique_topic) -> None:
    """Topics at a small max.message.bytes (a production cluster's default is 1 MiB; envelopes may be 16 MiB):
    the broker would refuse an envelope over it for good, and kafka-python's idempotent producer would then fail
    every later send. The sink sends such an envelope as halves, in order, and every event arrives once."""
    topics = topics_limited_to(kafka_broker, unique_topic, max_message_bytes=20_000, partitions=2)
    result = crossdistil_stream("--dataset", "synthetic", "--option", "n_events=3000", "--to",
                                f"kafka://{kafka_broker}", "--impressions-topic", topics["impressions"],
                                "--feedback-topic", topics["feedback"], "--envelope", "2000")
    assert "envelopes were over their topic's max.message.bytes and went as halves" in result.stdout, result.stdout
    shown = [event for _, event in read_topic(kafka_broker, topics["impressions"])]
    assert len(shown) == 3000 and len({e["impression_id"] for e in shown}) == 3000
    assert len(read_topic(kafka_broker, topics["feedback"])) > 0


def test_an_event_over_its_topics_message_limit_stops_the_stream_with_a_clear_error(kafka_broker: str,
                                                                                     unique_topic) -> None:
    """A single event the broker would refuse for good (its topic's max.message.bytes below it) is said at once,
    naming the topic and its limit, instead of poisoning the producer for every later event."""
    topics = topics_limited_to(kafka_broker, unique_topic, max_message_bytes=1_100, partitions=1)
    result = subprocess.run([sys.executable, "-m", "consumers.cli", "stream", "--dataset", "synthetic", "--option",
                             "n_events=50", "--to", f"kafka://{kafka_broker}", "--impressions-topic",
                             topics["impressions"], "--feedback-topic", topics["feedback"], "--quiet"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    assert f"is over topic {topics['impressions']}'s max.message.bytes (1,100, less 1024 bytes of framing)" in \
        result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]

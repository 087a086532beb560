"""The local Kafka broker (consumers/runtime/local_kafka.py) against kafka-python: the guarantees the daemons rely
on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from consumers.runtime.local_kafka import LocalKafka, free_port
from streamer.events import DEAD_LETTER_TOPIC, FEEDBACK_TOPIC, IMPRESSION_TOPIC, MODEL_TOPIC
from streamer.topics import MODEL_MAX_MESSAGE_BYTES, ensure_topics

pytestmark = pytest.mark.integration

kafka = pytest.importorskip("kafka", reason="kafka-python is a dependency of the project")

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition  # noqa: E402
from kafka.admin import ConfigResource, ConfigResourceType  # noqa: E402

POLL_DEADLINE_S = 30.0
START_TIMEOUT_S = 180.0  # a cold JVM on a busy shared machine


def _create_topic(bootstrap: str, name: str, partitions: int = 1) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics({name: {"num_partitions": partitions, "replication_factor": 1}})
        admin.wait_for_topics([name], timeout_ms=30_000)
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, values: list[bytes], **config) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", **config)
    try:
        for value in values:
            producer.send(topic, value=value, key=b"user-1")
        producer.flush(timeout=30)
    finally:
        producer.close()


def _consume(consumer: KafkaConsumer, count: int, deadline_s: float = POLL_DEADLINE_S) -> list:
    """Poll until ``count`` records arrived or the deadline passes (the caller asserts on what came)."""
    records: list = []
    deadline = time.monotonic() + deadline_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500, max_records=count - len(records)).values():
            records.extend(batch)
    return records


def _group_consumer(bootstrap: str, topic: str, group: str, **config) -> KafkaConsumer:
    return KafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
        auto_offset_reset="earliest", **config,
    )


def test_messages_produced_are_consumed_in_order_through_a_consumer_group(kafka_broker, unique_topic) -> None:
    topic = unique_topic("roundtrip")
    _create_topic(kafka_broker, topic)
    values = [f"event-{i}".encode() for i in range(20)]
    _produce(kafka_broker, topic, values)

    consumer = _group_consumer(kafka_broker, topic, unique_topic("group"))
    try:
        records = _consume(consumer, len(values))
    finally:
        consumer.close()

    assert [r.value for r in records] == values


def test_committed_offsets_survive_into_a_new_consumer_of_the_same_group(kafka_broker, unique_topic) -> None:
    topic, group = unique_topic("commit"), unique_topic("group")
    _create_topic(kafka_broker, topic)
    _produce(kafka_broker, topic, [f"event-{i}".encode() for i in range(10)])
    partition = TopicPartition(topic, 0)

    first = _group_consumer(kafka_broker, topic, group)
    try:
        records = _consume(first, 6)
        assert len(records) == 6
        first.commit()  # commits the position: the offset after the last record returned
        assert first.committed(partition) == 6
    finally:
        first.close()

    second = _group_consumer(kafka_broker, topic, group)
    try:
        assert second.committed(partition) == 6
        rest = _consume(second, 4)
    finally:
        second.close()

    assert [r.offset for r in rest] == [6, 7, 8, 9]
    assert [r.value for r in rest] == [f"event-{i}".encode() for i in range(6, 10)]


def test_ensure_topics_creates_the_default_topics_then_is_a_no_op(kafka_broker, unique_topic) -> None:
    # Unique names, so the answer does not depend on which other test created the default topics first.
    names = {
        "impression_topic": unique_topic("impressions"), "feedback_topic": unique_topic("feedback"),
        "dead_letter_topic": unique_topic("dead-letters"), "model_topic": unique_topic("model-updates"),
    }
    first = ensure_topics(kafka_broker, partitions=3, **names)
    second = ensure_topics(kafka_broker, partitions=3, **names)

    assert first == {name: "created" for name in names.values()}
    assert second == {name: "exists" for name in names.values()}
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker)
    try:
        partitions = {role: consumer.partitions_for_topic(name) for role, name in names.items()}
    finally:
        consumer.close()
    assert partitions == {
        "impression_topic": {0, 1, 2}, "feedback_topic": {0, 1, 2}, "dead_letter_topic": {0, 1, 2}, "model_topic": {0},
    }


def test_the_model_topic_is_compacted_and_admits_16_mib_messages(kafka_broker) -> None:
    ensure_topics(kafka_broker)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, MODEL_TOPIC)], config_filter="all")
    finally:
        admin.close()

    configs = _flatten_topic_configs(described, MODEL_TOPIC)
    assert configs["cleanup.policy"] == "compact"
    assert int(configs["max.message.bytes"]) == MODEL_MAX_MESSAGE_BYTES


def _flatten_topic_configs(described, topic: str) -> dict[str, str]:
    """``{name: value}`` from kafka-python's describe_configs answer ``{type: {resource: {name: {...}}}}``."""
    by_type = described if isinstance(described, dict) else {}
    for resources in by_type.values():
        if topic in resources:
            return {name: entry["value"] if isinstance(entry, dict) else entry
                    for name, entry in resources[topic].items()}
    raise AssertionError(f"describe_configs did not describe {topic}: {described!r}")


def test_a_5_mb_message_round_trips_through_the_model_topic(kafka_broker) -> None:
    ensure_topics(kafka_broker)
    payload = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    start = _end_offset(kafka_broker, MODEL_TOPIC)
    _produce(kafka_broker, MODEL_TOPIC, [payload], max_request_size=MODEL_MAX_MESSAGE_BYTES)

    consumer = KafkaConsumer(bootstrap_servers=kafka_broker, enable_auto_commit=False,
                             fetch_max_bytes=2 * MODEL_MAX_MESSAGE_BYTES,
                             max_partition_fetch_bytes=MODEL_MAX_MESSAGE_BYTES)
    try:
        partition = TopicPartition(MODEL_TOPIC, 0)
        consumer.assign([partition])
        consumer.seek(partition, start)
        records = _consume(consumer, 1)
    finally:
        consumer.close()

    assert len(records) == 1
    assert records[0].value == payload


def _end_offset(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partition = TopicPartition(topic, 0)
        return consumer.end_offsets([partition])[partition]
    finally:
        consumer.close()


def test_the_default_topic_names_are_the_event_contracts() -> None:
    events = pytest.importorskip("streamer.events")
    assert (IMPRESSION_TOPIC, FEEDBACK_TOPIC, MODEL_TOPIC, DEAD_LETTER_TOPIC) == (
        events.IMPRESSION_TOPIC, events.FEEDBACK_TOPIC, events.MODEL_TOPIC, events.DEAD_LETTER_TOPIC,
    )


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory):
    """A second broker of our own, so that stopping it cannot disturb the session broker. Its cluster id starts
    with "-" (1 in 64 random ids do), the case that once made storage formatting take the id for an option."""
    import consumers.runtime.local_kafka as local_kafka

    random_id = local_kafka.new_cluster_id

    def dashed_cluster_id() -> str:
        while not (cluster_id := random_id()).startswith("-"):
            pass
        return cluster_id

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(local_kafka, "new_cluster_id", dashed_cluster_id)
        local = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("lifecycle"))
        assert local.start(timeout_s=START_TIMEOUT_S) is True
    yield local
    local.stop()


class TestLifecycle:
    """start / status / stop of a broker this module owns."""

    def test_a_cluster_id_that_starts_with_a_dash_formats_and_runs(self, own_broker: LocalKafka) -> None:
        import json

        state = json.loads((own_broker.data_dir / "local-kafka.json").read_text())
        assert state["cluster_id"].startswith("-") and own_broker.status().running

    def test_status_reports_running_with_pid_bootstrap_and_data_dir(self, own_broker: LocalKafka) -> None:
        status = own_broker.status()
        assert status.running and status.pid is not None
        assert status.bootstrap == own_broker.bootstrap
        assert Path(status.data_dir) == own_broker.data_dir
        assert Path(status.log_file).is_file()

    def test_a_second_start_is_a_no_op(self, own_broker: LocalKafka) -> None:
        pid = own_broker.status().pid
        assert own_broker.start(timeout_s=5) is False
        assert own_broker.status().pid == pid

    def test_another_instance_on_the_same_data_dir_sees_the_running_broker(self, own_broker: LocalKafka) -> None:
        # What 'crossdistil kafka status' does from a fresh process: only the data dir is known.
        other = LocalKafka(data_dir=own_broker.data_dir)
        assert other.bootstrap == own_broker.bootstrap
        assert other.status().pid == own_broker.status().pid

    def test_the_jvm_keeps_its_temporary_files_in_the_data_dir(self, own_broker: LocalKafka) -> None:
        # Java's java.io.tmpdir is /tmp whatever TMPDIR says; what the JVM unpacks there (lz4-java's native library)
        # is the broker's, and a killed broker left it in /tmp
        command = Path(f"/proc/{own_broker.status().pid}/cmdline").read_bytes().split(b"\0")
        assert f"-Djava.io.tmpdir={own_broker.data_dir / 'tmp'}".encode() in command
        assert (own_broker.data_dir / "tmp").is_dir()

    def test_stop_ends_the_broker_and_a_restart_keeps_its_data(self, own_broker: LocalKafka, unique_topic) -> None:
        topic = unique_topic("durable")
        _create_topic(own_broker.bootstrap, topic)
        _produce(own_broker.bootstrap, topic, [b"kept"])

        assert own_broker.stop() is True
        assert not own_broker.status().running
        assert not own_broker.pid_file.exists()
        assert own_broker.stop() is False

        assert own_broker.start(timeout_s=START_TIMEOUT_S) is True
        consumer = KafkaConsumer(topic, bootstrap_servers=own_broker.bootstrap, auto_offset_reset="earliest")
        try:
            assert [r.value for r in _consume(consumer, 1)] == [b"kept"]
        finally:
            consumer.close()


def test_a_broker_that_cannot_start_reports_its_log(tmp_path: Path) -> None:
    # A heap too small for the JVM makes it exit at once: the error must name the log and quote the reason.
    from consumers.runtime.local_kafka import LocalKafkaError

    local = LocalKafka(port=free_port(), data_dir=tmp_path, heap="2m")
    with pytest.raises(LocalKafkaError) as caught:
        local.start(timeout_s=60)
    message = str(caught.value)
    assert "exited during startup" in message
    assert str(tmp_path / "broker.out") in message and str(local.log_file) in message
    assert "Error occurred during initialization of VM" in message
    assert not local.status().running


def test_a_port_taken_by_something_else_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    import socket

    from consumers.runtime.local_kafka import LocalKafkaError

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(LocalKafkaError, match=f"already listens on 127.0.0.1:{port}"):
            LocalKafka(port=port, data_dir=tmp_path).start(timeout_s=5)


def test_the_cli_reports_status_with_exit_code_3_when_not_running(tmp_path: Path, capsys) -> None:
    from consumers.cli import main

    assert main(["kafka", "status", "--data-dir", str(tmp_path)]) == 3
    assert "not running" in capsys.readouterr().out


def test_a_controller_port_taken_before_the_jvm_binds_it_is_replaced_once(tmp_path, monkeypatch) -> None:
    """The race CI met: a port that looked free when chosen is someone else's by the time the JVM binds it."""
    import socket

    import consumers.runtime.local_kafka as local_kafka

    port = free_port()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))  # the port our chooser will pick, held as a client's local port would be
    monkeypatch.setattr(local_kafka, "port_bindable", lambda p, host="127.0.0.1": True)  # the check saw it free
    broker = LocalKafka(port=port, data_dir=tmp_path / "broker", controller_port=None)
    broker._controller_port = taken.getsockname()[1]
    try:
        assert broker.start(timeout_s=START_TIMEOUT_S) is True
        assert broker._controller_port != taken.getsockname()[1]
    finally:
        broker.stop()
        taken.close()

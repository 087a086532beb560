"""crossdistil inspect serving against the real broker: the publications on a serving topic, newest first, each
complete or not, read without a consumer group with serving's start-up loop (consumers.runtime.topic_range)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from consumers.cli import main
from consumers.tools.inspect import EXIT_KAFKA, EXIT_OK
from tests.integration.test_serving_kafka import (
    Publisher,
    checkpoint_messages,
    make_learner,
    publisher,  # noqa: F401 (fixture)
    topic,  # noqa: F401 (fixture)
    train,
)

pytestmark = pytest.mark.integration


def test_inspect_serving_lists_each_publication_newest_first_complete_or_not(
        kafka_broker: str, topic: str, publisher: Publisher, capsys) -> None:  # noqa: F811
    from kafka import KafkaAdminClient

    learner = make_learner()
    sent = []
    for version in (1, 2):
        train(learner, 1)
        sent.append(checkpoint_messages(learner, version))
        publisher.send(sent[-1])
    train(learner, 1)
    publisher.send(checkpoint_messages(learner, 3)[:-1])  # a publication cut short: no manifest
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    groups_before = admin.list_groups()

    assert main(["inspect", "serving", "--bootstrap", kafka_broker, "--topic", topic, "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["topic"] == topic and report["end_offset"] == report["records"] == len(sum(sent, [])) + len(
        checkpoint_messages(learner, 3)) - 1
    found = report["publications"]
    assert [(p["version"], p["complete"]) for p in found] == [(3, False), (2, True), (1, True)]
    assert found[0]["problem"].startswith("no manifest") and found[0]["chunks_present"] == found[0]["chunks"] > 1
    assert [p["step"] for p in found[1:]] == [2, 1]
    assert found[1]["chunks"] == found[1]["chunks_present"] > 1 and found[1]["wire_format"] == 1
    assert found[1]["serving_format"] and found[1]["tasks"] == ["click", "like"]
    assert admin.list_groups() == groups_before  # read without a group: nothing committed anywhere
    admin.close()

    assert main(["inspect", "serving", "--bootstrap", kafka_broker, "--topic", topic]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"serving topic {topic} at {kafka_broker}") and "3 publications" in lines[0]
    assert lines[1].split()[:2] == ["VERSION", "STEP"] and lines[2].split()[0] == "3" and "complete" in lines[3]

    assert main(["inspect", "serving", "--bootstrap", kafka_broker, "--topic", topic, "--newest", "2", "--json"]) == 0
    newest = json.loads(capsys.readouterr().out)
    assert newest["publications_seen"] == 3 and newest["publications"] == found[:2]  # every one read, two listed


def test_inspect_serving_of_a_topic_that_does_not_exist_says_so(kafka_broker: str,
                                                                unique_topic: Callable[[str], str], capsys) -> None:
    missing = unique_topic("nowhere")
    assert main(["inspect", "serving", "--bootstrap", kafka_broker, "--topic", missing]) == EXIT_KAFKA
    assert f"topic {missing} does not exist" in capsys.readouterr().err

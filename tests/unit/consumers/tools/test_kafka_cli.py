"""``crossdistil kafka``'s help and messages (no broker is started)."""

from __future__ import annotations

import argparse

import pytest

from consumers.tools import kafka

pytestmark = pytest.mark.unit


def help_text() -> str:
    parser = argparse.ArgumentParser(prog="crossdistil kafka")
    kafka.add_arguments(parser)
    return " ".join(parser.format_help().split())


def test_the_help_shows_the_defaults_of_partitions_and_timeout() -> None:
    from streamer.topics import DEFAULT_PARTITIONS

    assert kafka.DEFAULT_PARTITIONS_SHOWN == DEFAULT_PARTITIONS  # the number shown is the one used
    text = help_text()
    assert f"(up only; default: {DEFAULT_PARTITIONS})" in text
    assert "seconds to wait for the broker to start or stop (default: 90)" in text


def test_status_of_a_broker_not_running_suggests_starting_that_broker(tmp_path, capsys) -> None:
    from consumers.cli import main

    data_dir = tmp_path / "my kafka"
    assert main(["kafka", "status", "--data-dir", str(data_dir), "--port", "19092"]) == 3
    assert capsys.readouterr().out == (f"Kafka is not running (data dir {data_dir}); start it with: crossdistil "
                                       f"kafka up --data-dir '{data_dir}' --port 19092\n")  # quoted for a shell
    assert main(["kafka", "status", "--data-dir", str(tmp_path)]) == 3
    assert capsys.readouterr().out.endswith(f"start it with: crossdistil kafka up --data-dir {tmp_path}\n")

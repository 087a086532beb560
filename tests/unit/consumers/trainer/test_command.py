"""``crossdistil train``'s start, without a broker: a mistake is one line with status 2 before anything connects, a
stop while it connects is status 0, and a start that ends before training leaves no folder behind."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from kafka.errors import KafkaTimeoutError

from consumers.cli import build_parser, main
from consumers.runtime.config import load_config
from consumers.trainer.daemon import Trainer

pytestmark = pytest.mark.unit

DEAD = "kafka.bootstrap='127.0.0.1:9'"  # nothing listens there: a connection is refused at once
SMALL = "model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4}"


def train(tmp_path: Path, *flags: str, checkpoints: str = "checkpoints") -> int:
    sets = [DEAD, SMALL, "metrics.port=0", f"checkpoint.dir='{tmp_path / checkpoints}'"]
    return main(["train", "--log-level", "warning", *[a for s in sets for a in ("--set", s)], *flags])


def one_line_error(capfd: pytest.CaptureFixture[str]) -> str:
    err = capfd.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_kafka(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to connect is recorded and refused at once (so a test that should not get there says so)."""
    attempts: list[str] = []

    def connect(k, **_kwargs):
        attempts.append(k.bootstrap)
        raise KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9")

    monkeypatch.setattr("consumers.trainer.daemon.connect", connect)
    return attempts


@pytest.mark.parametrize("option, problem", [
    ("model.options.rung='mtll'", "rung must be one of"),
    ("model.options.bogus=1", "bogus"),
])
def test_a_bad_model_option_is_one_line_with_status_2_before_kafka(
        option: str, problem: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], no_kafka: list[str]) -> None:
    assert train(tmp_path, "--set", option) == 2
    error = one_line_error(capfd)
    assert error.startswith("crossdistil train: configuration error in [model]: ") and problem in error, error
    assert not no_kafka and not (tmp_path / "checkpoints").exists()


def test_a_value_a_part_of_the_trainer_refuses_is_one_line_with_status_2(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args, **_kwargs):
        raise ValueError("max_batch_delay_s must be None or a finite number >= 0, got nan")

    monkeypatch.setattr(Trainer, "__init__", refuse)
    assert train(tmp_path) == 2
    assert one_line_error(capfd) == ("crossdistil train: configuration error: max_batch_delay_s must be None or a "
                                      "finite number >= 0, got nan")


@pytest.mark.parametrize("flag", ["--ledger", "checkpoint.dir"])
def test_a_checkpoint_or_ledger_folder_that_is_a_file_is_one_line_naming_it(
        flag: str, tmp_path: Path, capfd: pytest.CaptureFixture[str], no_kafka: list[str]) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    flags = ["--ledger", str(afile)] if flag == "--ledger" else ["--set", f"checkpoint.dir='{afile}'"]
    assert train(tmp_path, *flags) == 2
    assert one_line_error(capfd) == f"crossdistil train: {flag} {afile}: {afile} is a file, not a folder"
    assert not no_kafka


@pytest.mark.parametrize("flags, problem", [
    (["--torch-threads", "-2"], "--torch-threads -2: at least 1 (or 0 for torch's choice)"),
    (["--exit-when-idle", "-5"], "--exit-when-idle -5: a finite number of seconds >= 0"),
    (["--exit-when-idle", "nan"], "--exit-when-idle nan: a finite number of seconds >= 0"),
])
def test_a_flag_out_of_range_is_one_line_with_status_2(
        flags: list[str], problem: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    assert train(tmp_path, *flags) == 2
    assert one_line_error(capfd) == f"crossdistil train: {problem}"


@pytest.mark.parametrize("command", ["train", "serve"])
def test_the_log_level_is_one_of_the_logging_levels_in_any_case(command: str) -> None:
    assert build_parser().parse_args([command, "--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([command, "--log-level", "verbose"])
    assert refused.value.code == 2


def test_a_metrics_port_in_use_is_one_line_with_status_2_and_the_new_folder_is_removed(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], no_kafka: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert train(tmp_path, "--set", f"metrics.port={port}", checkpoints="new/checkpoints") == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in one_line_error(capfd)
    assert not no_kafka and not (tmp_path / "new").exists()


def test_a_trainer_that_cannot_reach_kafka_exits_3_and_leaves_no_new_empty_folder(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], no_kafka: list[str]) -> None:
    (tmp_path / "kept").mkdir()
    assert train(tmp_path, "--ledger", str(tmp_path / "kept" / "ledger"), checkpoints="kept/a/checkpoints") == 3
    assert "Kafka at 127.0.0.1:9 is not reachable" in capfd.readouterr().err and no_kafka
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not list((tmp_path / "kept").iterdir())


def test_a_stop_while_connecting_ends_the_trainer_at_once_with_status_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def slow_connect(_k, **_kwargs):  # kafka-python's bootstrap gives up after 10 s
        time.sleep(3)
        raise KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9")

    monkeypatch.setattr("consumers.trainer.daemon.connect", slow_connect)
    cfg = load_config(None, env={}, overrides=[DEAD, SMALL, "metrics.port=0",
                                               f"checkpoint.dir='{tmp_path / 'checkpoints'}'"])
    trainer = Trainer(cfg)
    reached: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: reached.append(signum))  # not the daemon's
    try:
        threading.Timer(0.3, lambda: signal.raise_signal(signal.SIGTERM)).start()
        started = time.monotonic()
        assert trainer.run() == 0
        assert time.monotonic() - started < 2.5 and not reached
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "stopped before Kafka was reached" in capfd.readouterr().out
    assert not (tmp_path / "checkpoints").exists()


def test_a_sigterm_while_the_trainer_is_built_ends_the_start_with_status_0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    def built_slowly(*_args, **_kwargs):
        signal.raise_signal(signal.SIGTERM)  # arrives while the model is built, before the daemon's own handlers
        raise ValueError("the build went on after the SIGTERM")

    monkeypatch.setattr(Trainer, "__init__", built_slowly)
    reached: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: reached.append(signum))  # not the command's
    try:
        assert train(tmp_path) == 0 and not reached
        assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert one_line_error(capfd) == "crossdistil train: stopped while starting; nothing was trained"

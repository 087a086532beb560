"""Every client of the project against a broker that only talks TLS + SASL (PLAIN, SCRAM-SHA-256/512), with the
password from the environment: stream -> train -> serve -> backtest end to end, and wrong credentials or a
plaintext client fail at once with a sentence that says what is wrong.

The broker is a second local Kafka (its own JVM and data dir) with a SASL_SSL listener; its CA and keystore are
made by ``keytool`` (``consumers.runtime.local_kafka.make_tls_material``). No password is written to a file of
the repository: the tests hand it to every command as ``CROSSDISTIL_KAFKA_PASSWORD``.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from consumers.runtime.local_kafka import LocalKafka, free_port
from consumers.runtime.processes import die_with_parent
from streamer.kafka_security import LoginRefused, WrongListener, check_listener, check_login
from streamer.kafka_settings import client_security
from tests.trainer_config import write_trainer_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
USER = "alice"
LIMIT = 3000  # impressions streamed: enough to train, publish and serve a model
FAIL_FAST_S = 30.0  # a refused login or a wrong listener must end a command within this (bootstrap: 10 s)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):
    password = secrets.token_urlsafe(16)
    broker = LocalKafka(port=free_port(), data_dir=tmp_path_factory.mktemp("secure-kafka"), heap="512m",
                        sasl_ssl_port=free_port(), users={USER: password})
    broker.start(timeout_s=240, preexec_fn=die_with_parent)
    try:
        yield broker, password
    finally:
        broker.stop()


def cli(*args: str, password: str | None, timeout_s: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CROSSDISTIL_KAFKA_PASSWORD"}
    if password is not None:
        env["CROSSDISTIL_KAFKA_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "consumers.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def security_flags(broker: LocalKafka) -> list[str]:
    return ["--security-protocol", "SASL_SSL", "--sasl-username", USER, "--ssl-cafile", str(broker.ca_file)]


def trainer_config(path: Path, broker: LocalKafka, topics: dict[str, str], **settings) -> Path:
    return write_trainer_config(path, broker.secure_bootstrap, topics, {
        "kafka.security_protocol": "SASL_SSL", "kafka.sasl_username": USER, "kafka.ssl_cafile": str(broker.ca_file),
        "join.attribution_window_s": {"click": 30, "long_view": 700, "like": 700},
        "model.tasks": ["click", "long_view", "like"],
        "model.options": {"embedding_dim": 4, "hidden_dims": [8], "tower_dims": [4]},
        "checkpoint.dir": str(path.parent / "checkpoints"), **settings,
    })


def test_stream_train_serve_and_backtest_over_sasl_ssl_with_the_password_from_the_environment(
        secure_broker, shared_data: Path, tmp_path: Path) -> None:
    broker, password = secure_broker
    tag = uuid.uuid4().hex[:6]
    topics = {"impressions": f"imp-{tag}", "feedback": f"fb-{tag}", "model": f"model-{tag}"}
    streamed = cli("stream", "--dataset", "kuairand", "--source", str(shared_data / "kuairand"), "--limit", str(LIMIT),
                   "--to", f"kafka://{broker.secure_bootstrap}", "--impressions-topic", topics["impressions"],
                   "--feedback-topic", topics["feedback"], "--compression", "zstd", "--quiet",
                   *security_flags(broker), password=password)
    assert streamed.returncode == 0, streamed.stderr

    # the trainer logs in with SCRAM-SHA-256, serving with SCRAM-SHA-512, stream and backtest (the flags) with PLAIN
    config = trainer_config(tmp_path / "trainer.toml", broker, topics, **{"kafka.sasl_mechanism": "SCRAM-SHA-256"})
    trained = cli("train", "--config", str(config), "--exit-when-idle", "5", "--torch-threads", "1",
                  password=password)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"{LIMIT} samples trained" in trained.stdout, trained.stdout[-2000:]

    port = free_port()
    serving = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "serve", "--config", str(config), "--set", f"serving.port={port}",
         "--set", 'kafka.sasl_mechanism="SCRAM-SHA-512"', "--log-level", "WARNING"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "CROSSDISTIL_KAFKA_PASSWORD": password}, preexec_fn=die_with_parent)
    try:
        health = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and serving.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    health = json.loads(response.read())
                    break
            except OSError:
                time.sleep(0.5)
        assert health is not None and health["model_version"] >= 1, serving.poll()
    finally:
        serving.terminate()
        serving.wait(timeout=30)

    replay = cli("backtest", "--kafka", broker.secure_bootstrap, "--config", str(config), "--out",
                 str(tmp_path / "backtest"), "--no-plots", "--quiet", *security_flags(broker), password=password)
    assert replay.returncode == 0, replay.stderr[-3000:]
    summary = json.loads((tmp_path / "backtest" / "summary.json").read_text())
    assert summary["configurations"]["trainer"]["trained_samples"] == LIMIT


def test_a_wrong_password_ends_every_command_at_once_with_the_reason(secure_broker, tmp_path: Path) -> None:
    broker, _ = secure_broker
    topics = {"impressions": "imp-denied", "feedback": "fb-denied"}
    config = trainer_config(tmp_path / "trainer.toml", broker, topics)
    refused = f"refused the SASL PLAIN login of user '{USER}'"
    for args, status in ((["train", "--config", str(config)], 3),
                         (["serve", "--config", str(config), "--set", "serving.port=0"], 3),
                         (["stream", "--dataset", "synthetic", "--source", "-", "--limit", "10", "--to",
                           f"kafka://{broker.secure_bootstrap}", "--quiet", *security_flags(broker)], 2),
                         (["backtest", "--kafka", broker.secure_bootstrap, "--config", str(config), "--out",
                           str(tmp_path / "bt"), "--quiet", *security_flags(broker)], 3)):
        started = time.monotonic()
        result = cli(*args, password="not-the-password", timeout_s=120)
        seconds = time.monotonic() - started
        assert result.returncode == status and refused in result.stderr, (args[0], result.returncode, result.stderr)
        # the broker's own reason: check_login's answer, not kafka-python's bootstrap timeout
        assert "Invalid username or password" in result.stderr, (args[0], result.stderr)
        assert "kafka.bootstrap=" not in result.stderr and "check --to" not in result.stderr  # the address is fine
        assert seconds < FAIL_FAST_S, f"{args[0]} took {seconds:.0f} s to give up"


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_check_login_tells_a_refused_login_from_an_accepted_one(secure_broker, mechanism: str) -> None:
    broker, password = secure_broker

    def login(user: str, secret: str) -> None:
        check_login(broker.secure_bootstrap, client_security("SASL_SSL", mechanism, user, str(broker.ca_file),
                                                             env={"CROSSDISTIL_KAFKA_PASSWORD": secret}))

    login(USER, password)  # accepted: returns
    for user, secret in ((USER, "not-the-password"), ("mallory", password)):
        with pytest.raises(LoginRefused, match=f"refused the SASL {mechanism} login of user '{user}'"):
            login(user, secret)
    # what it cannot judge it leaves to the client: a SASL client at the plaintext listener, nothing listening
    plain_listener = client_security("SASL_PLAINTEXT", mechanism, USER, env={"CROSSDISTIL_KAFKA_PASSWORD": password})
    check_login(broker.bootstrap, plain_listener)
    check_login(f"127.0.0.1:{free_port()}", plain_listener)


def test_check_listener_tells_a_listener_of_the_other_protocol(secure_broker) -> None:
    broker, password = secure_broker
    env = {"CROSSDISTIL_KAFKA_PASSWORD": password}
    tls = client_security("SASL_SSL", "PLAIN", USER, str(broker.ca_file), env=env)
    check_listener(broker.secure_bootstrap, tls)  # the right ones: nothing to say
    check_listener(broker.bootstrap, {})
    for options in ({}, client_security("SASL_PLAINTEXT", "PLAIN", USER, env=env)):
        with pytest.raises(WrongListener, match="is a TLS listener: set the security protocol to SSL or SASL_SSL"):
            check_listener(broker.secure_bootstrap, options)
    for options in (tls, client_security("SSL", cafile=str(broker.ca_file))):
        with pytest.raises(WrongListener, match="is a plaintext listener, not TLS"):
            check_listener(broker.bootstrap, options)
    # a certificate the client does not trust is TLS all the same: left to the client, which names it
    check_listener(broker.secure_bootstrap, client_security("SSL"))


def test_a_tls_client_at_the_plaintext_listener_ends_the_trainer_at_once(secure_broker, tmp_path: Path) -> None:
    broker, password = secure_broker
    config = trainer_config(tmp_path / "trainer.toml", broker, {"impressions": "i", "feedback": "f"},
                            **{"kafka.bootstrap": broker.bootstrap})
    started = time.monotonic()
    result = cli("train", "--config", str(config), password=password, timeout_s=120)
    assert result.returncode == 3 and "is a plaintext listener, not TLS" in result.stderr, result.stderr
    assert "kafka.bootstrap=" not in result.stderr  # the address is fine; the protocol is not
    assert time.monotonic() - started < FAIL_FAST_S


def test_a_plaintext_client_at_the_tls_listener_and_a_missing_password_are_named(secure_broker, tmp_path) -> None:
    broker, password = secure_broker
    started = time.monotonic()
    plain = cli("stream", "--dataset", "synthetic", "--source", "-", "--limit", "10", "--to",
                f"kafka://{broker.secure_bootstrap}", "--quiet", password=password, timeout_s=120)
    assert plain.returncode == 2 and "is a TLS listener" in plain.stderr, plain.stderr
    assert time.monotonic() - started < FAIL_FAST_S

    config = trainer_config(tmp_path / "trainer.toml", broker, {"impressions": "i", "feedback": "f"})
    missing = cli("train", "--config", str(config), password=None, timeout_s=120)
    assert missing.returncode == 2 and "CROSSDISTIL_KAFKA_PASSWORD" in missing.stderr, missing.stderr

"""Shared pytest fixtures and the automatic ``unit`` / ``integration`` markers.

* ``kafka_broker`` (session): the bootstrap string of a fresh, real Kafka broker on a free port in a temporary
  directory, stopped when the session ends. Integration tests never mock Kafka: without Java the fixture fails
  (it does not skip), so a CI without a broker shows red rather than a quiet green.
* ``unique_topic`` (function): a factory of topic names no other test uses, so tests share one broker safely.
* ``shared_data``: the real data sets in ``../shared/data``; tests that need it skip when it is absent.
* ``session_tmpdir`` (session, automatic): ``TMPDIR`` and ``tempfile.tempdir`` point at a folder under pytest's
  basetemp for the whole session (each xdist worker its own), so nothing the tests or the processes they start
  (brokers, trainers) make with ``tempfile`` lands in /tmp; what is still in it at the end is listed in a warning.

Every test under ``tests/integration`` is marked ``integration`` and every test under ``tests/unit`` ``unit``,
so ``pytest -m unit`` never starts a broker even if a module forgets its ``pytestmark``.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# onnxruntime (the ONNX export tests) writes a telemetry session file, .ses, into the TMPDIR it sees when it loads,
# which is collection time, before session_tmpdir: /tmp. Without telemetry it writes nothing.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Generous: on a busy 2-core machine a cold JVM takes 10-30 s to format storage and unfence.
BROKER_START_TIMEOUT_S = float(os.environ.get("CROSSDISTIL_TEST_KAFKA_TIMEOUT_S", "180"))

_MARK_BY_DIR = {"integration": "integration", "unit": "unit"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests by their directory: tests/integration -> integration, tests/unit -> unit."""
    for item in items:
        try:
            relative = Path(str(item.path)).resolve().relative_to(TESTS_DIR)
        except ValueError:
            continue
        mark = _MARK_BY_DIR.get(relative.parts[0]) if len(relative.parts) > 1 else None
        if mark is not None and item.get_closest_marker(mark) is None:
            item.add_marker(getattr(pytest.mark, mark))


# torch makes its compile cache, torchinductor_<user>, in the temporary folder when parts of it load (empty here: the
# tests compile nothing); a cache meant to stay, not a leftover
_CACHES = ("torchinductor_",)


class LeftoverTempFiles(UserWarning):
    """Temporary files or folders that the tests, or the code they ran, made and did not remove."""


@pytest.fixture(scope="session", autouse=True)
def session_tmpdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's temporary folder, ``<basetemp>/tmpdir``: ``TMPDIR`` (inherited by every process a test starts)
    and ``tempfile.tempdir`` (this process's ``tempfile``) point there until the session ends. It goes with pytest's
    basetemp (the newest three are kept), so a test that forgets to clean up no longer fills /tmp; it is warned
    about instead (a ``LeftoverTempFiles`` warning that names what was left)."""
    folder = tmp_path_factory.getbasetemp() / "tmpdir"  # basetemp first: it is made in the former TMPDIR
    folder.mkdir()
    former_env, former_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = former_tempdir
        if former_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = former_env
        left = sorted(path.name for path in folder.iterdir() if not path.name.startswith(_CACHES))
        if left:
            warnings.warn(LeftoverTempFiles(
                f"{len(left)} temporary file(s) or folder(s) left by the tests in {folder}: {', '.join(left)}; find "
                "the test with TMPDIR=<an empty folder> pytest <one file>, and use tmp_path there (or clean up what "
                "the code under test makes)"), stacklevel=1)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers (``127.0.0.1:PORT``) of a fresh local Kafka broker that lives for the test session."""
    from consumers.runtime.local_kafka import LocalKafka, LocalKafkaError, free_port

    data_dir = tmp_path_factory.mktemp("kafka")
    broker = LocalKafka(port=free_port(), data_dir=data_dir)
    try:
        broker.start(timeout_s=BROKER_START_TIMEOUT_S)
    except LocalKafkaError as exc:
        pytest.fail(
            f"integration tests need a real Kafka broker and could not start one: {exc}\n"
            "Install Java 17+ and Maven (deploy/kafka/fetch.sh resolves the jars), or set CROSSDISTIL_KAFKA_LIBS.",
            pytrace=False,
        )
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Make topic names unique to this test: ``unique_topic("impressions")`` -> ``"impressions-<test>-<hex>"``."""
    test_name = re.sub(r"[^A-Za-z0-9._-]", "-", request.node.name)[:80]

    def make(prefix: str = "t") -> str:
        return f"{prefix}-{test_name}-{uuid.uuid4().hex[:8]}"

    return make


@pytest.fixture
def shared_data() -> Path:
    """The read-only real data sets, ``../shared/data`` relative to the repository root."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} does not exist (it lives outside the repository)")
    return SHARED_DATA

"""``crossdistil demo`` as a user runs it: a subprocess that starts Kafka, the streamer, the trainer, serving
and Prometheus, and that leaves no process behind when it is interrupted or when one of its parts fails.

Every test runs the real command (``python -m consumers.cli demo``) in its own session, so a SIGINT sent to its
process group is exactly what Ctrl-C in a terminal does. Liveness is checked through /proc (no psutil).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from consumers.runtime.local_kafka import pid_alive
from consumers.tools.demo import scrape, value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
FIRST_AUC_DEADLINE_S = 180.0   # a cold broker (10-30 s) + torch import + the first closed attribution windows
EXIT_DEADLINE_S = 150.0        # the trainer's final checkpoint, then every child with its stop deadline


def start_demo(tmp_path: Path, *flags: str) -> tuple[subprocess.Popen[str], Path]:
    """The demo as a subprocess in its own session (process group = its pid), output to a file."""
    run_dir = tmp_path / "run"
    out = (tmp_path / "demo.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "demo", "--out", str(run_dir), *flags],
        cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True,
    )
    out.close()
    return proc, run_dir


def read_run_info(run_dir: Path) -> dict:
    """RUN/demo.json, or {} while it does not exist yet."""
    try:
        return json.loads((run_dir / "demo.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def output(tmp_path: Path) -> str:
    """Everything the demo printed so far."""
    return (tmp_path / "demo.out").read_text(errors="replace")


def wait_for_exit(proc: subprocess.Popen[str], timeout_s: float, tmp_path: Path) -> int:
    """The exit status; on timeout kill the demo's group (so the test leaves nothing) and fail."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the demo did not exit within {timeout_s:.0f} s; output:\n{output(tmp_path)[-4000:]}")


def kill_leftovers(pids: set[int]) -> list[int]:
    """SIGKILL whatever is still alive (so a failing test does not leak processes); return those pids."""
    alive = [pid for pid in pids if pid_alive(pid)]
    for pid in alive:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return alive


def assert_nothing_left(pids: set[int], tmp_path: Path) -> None:
    """No recorded process is alive; give the kernel a short deadline to reap the last exits."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in pids):
        time.sleep(0.1)
    alive = kill_leftovers(pids)
    assert not alive, f"processes left running after the demo exited: {alive}; output:\n{output(tmp_path)[-3000:]}"


def test_ctrl_c_after_live_auc_stops_every_process_and_exits_0(tmp_path: Path) -> None:
    proc, run_dir = start_demo(tmp_path, "--dataset", "synthetic", "--limit", "400000", "--speed", "20")
    seen: set[int] = set()
    auc = None
    try:
        deadline = time.monotonic() + FIRST_AUC_DEADLINE_S
        while time.monotonic() < deadline and proc.poll() is None:
            info = read_run_info(run_dir)
            seen.update(int(pid) for pid in info.get("pids", {}).values())
            port = info.get("ports", {}).get("trainer")
            if port and "trainer" in info.get("pids", {}):
                samples, _ = scrape(f"http://127.0.0.1:{port}/metrics", timeout_s=2.0)
                auc = value(samples, "crossdistil_auc", task="click", role="student", window="lifetime")
                if auc is not None:
                    break
            time.sleep(0.5)
        assert proc.poll() is None, f"the demo ended before Ctrl-C:\n{output(tmp_path)[-4000:]}"
        assert auc is not None, f"no per-task AUC within {FIRST_AUC_DEADLINE_S:.0f} s:\n{output(tmp_path)[-4000:]}"
        info = read_run_info(run_dir)
        seen.update(int(pid) for pid in info["pids"].values())
        assert {"kafka", "trainer", "serving", "stream"} <= set(info["pids"]), info["pids"]

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does: the foreground group gets SIGINT
        code = wait_for_exit(proc, EXIT_DEADLINE_S, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_leftovers(seen)

    text = output(tmp_path)
    assert code == 0, f"exit status {code}:\n{text[-4000:]}"
    assert 0 < auc <= 1
    assert_nothing_left(seen | {proc.pid}, tmp_path)
    assert "SIGINT received" in text
    assert str(run_dir / "checkpoints") in text  # it says where the checkpoints are
    assert any((run_dir / "checkpoints").iterdir()), "the trainer wrote no checkpoint"
    assert (run_dir / "metrics" / "trainer.prom").is_file()


def test_a_failing_stream_stops_every_process_and_exits_1(tmp_path: Path) -> None:
    bad = tmp_path / "not-kuairand.tsv"
    bad.write_text("this\tis\tnot\nKuaiRand\tat\tall\n")
    proc, run_dir = start_demo(tmp_path, "--dataset", "kuairand", "--source", str(bad))
    seen: set[int] = set()
    try:
        # Record pids while it runs: the failure comes after Kafka and the daemons started.
        deadline = time.monotonic() + EXIT_DEADLINE_S
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(int(pid) for pid in read_run_info(run_dir).get("pids", {}).values())
            time.sleep(0.2)
        code = wait_for_exit(proc, 1.0, tmp_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seen.update(int(pid) for pid in read_run_info(run_dir).get("pids", {}).values())
        kill_leftovers(seen)

    text = output(tmp_path)
    assert code == 1, f"exit status {code}:\n{text[-4000:]}"
    assert "stream exited with status" in text and "stream.log" in text, text[-3000:]
    assert {"kafka", "trainer", "stream"} <= set(read_run_info(run_dir)["pids"]), "the failure came too early to test"
    assert_nothing_left(seen | {proc.pid}, tmp_path)


def test_a_missing_source_is_a_usage_error_before_anything_starts(tmp_path: Path) -> None:
    proc, run_dir = start_demo(tmp_path, "--dataset", "kuairand", "--source", str(tmp_path / "nowhere"))
    code = wait_for_exit(proc, 60.0, tmp_path)
    assert code == 2
    assert "KuaiRand not found" in output(tmp_path)
    assert not run_dir.exists()

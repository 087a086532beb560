"""``crossdistil``'s entry point: how a command ends when its output pipe is closed early."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]


def test_a_closed_stdout_ends_a_command_quietly_with_the_sigpipe_status() -> None:
    # as `crossdistil backtest ... | head -1` does: no traceback, status 128 + SIGPIPE
    code = """
import sys
import consumers.tools.backtest as backtest
from consumers.cli import main

def run(args):
    for _ in range(100_000):
        print("x" * 100)
    return 0

backtest.run = run
sys.exit(main(["backtest", "--log", "file:///nowhere", "--out", "/nowhere"]))
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.read(10)
    child.stdout.close()
    status = child.wait(timeout=60)
    error = child.stderr.read().decode()
    assert status == 141 and "Traceback" not in error, error


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a machine without a GPU")
@pytest.mark.parametrize("argv", [
    ["train", "--check-config", "--set", "model.device=cuda"],
    ["train", "--device", "cuda:0"],  # the daemon itself, before it opens Kafka
    ["serve", "--set", "serving.device=cuda"],
    ["evaluate", "--dataset", "synthetic", "--source", "x", "--device", "cuda", "--out", "/nowhere"],
])
def test_a_gpu_asked_for_on_a_machine_without_one_is_a_configuration_error(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from consumers.cli import main

    assert main(argv) == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err

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

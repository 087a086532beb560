"""The test session's temporary folder (``session_tmpdir`` in tests/conftest.py): what the tests and the processes
they start make with ``tempfile`` goes under pytest's basetemp, not /tmp."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit


def test_tempfile_makes_its_files_in_the_session_folder_under_pytests_basetemp(
        session_tmpdir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    assert Path(tempfile.gettempdir()) == session_tmpdir
    assert session_tmpdir.parent == tmp_path_factory.getbasetemp()


def test_a_process_a_test_starts_makes_its_temporary_files_there_too(session_tmpdir: Path) -> None:
    child = subprocess.run([sys.executable, "-c", "import tempfile; print(tempfile.gettempdir())"],
                           capture_output=True, text=True, check=True, timeout=60)
    assert Path(child.stdout.strip()) == session_tmpdir

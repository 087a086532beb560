"""The bench's shell scripts (run rarely, some only on machines lent for minutes) parse, and say how to call them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.sh"))


def test_there_are_scripts_to_check() -> None:
    assert {"gpu_checks.sh", "many_cores.sh"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_parses(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", ["gpu_checks.sh", "many_cores.sh", "device.sh"])
def test_a_device_script_without_its_arguments_says_its_usage_and_does_nothing(name: str, tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(BENCH / name)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and f"usage: bench/{name}" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["gpu", "many-cores"])
def test_the_device_run_without_the_prepared_folder_says_how_to_make_it_and_does_nothing(mode: str,
                                                                                        tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "bench").mkdir(parents=True)
    script = checkout / "bench" / "device.sh"
    script.write_text((BENCH / "device.sh").read_text())
    done = subprocess.run(["bash", str(script), mode, str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and "bash bench/device.sh prepare" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout"]  # no output folder
    assert sorted(p.name for p in checkout.iterdir()) == ["bench"]  # nothing installed, unpacked or run

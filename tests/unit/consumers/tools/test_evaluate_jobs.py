"""``crossdistil evaluate --jobs N``: the runs of a grid trained by N processes give the results of one process."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from consumers.tools import evaluate

pytestmark = pytest.mark.unit


def grid(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(["--dataset", "synthetic", "--source", "-", "--option", "n_events=900",
                              "--option", "tasks=click,like,follow", "--tasks", "click,like", "--aux-tasks", "follow",
                              "--configs", "mtl,crossdistil", "--seeds", "2", "--mode", "both", "--curve-points", "2",
                              "--threads", "1", "--device", "cpu", "--out", str(out), *extra])


def without_times(doc: dict) -> list[dict]:
    return [{k: v for k, v in run.items() if k != "seconds"} for run in doc["runs"]]


def test_runs_in_several_processes_equal_the_runs_of_one_in_the_same_order(tmp_path: Path) -> None:
    assert evaluate.run(grid(tmp_path / "one")) == 0
    assert evaluate.run(grid(tmp_path / "two", "--jobs", "2")) == 0
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert len(one["runs"]) == 8 and without_times(two) == without_times(one)  # bit for bit, in the grid's order
    assert two["environment"]["jobs"] == 2 and two["environment"]["threads"] == 1


def test_a_failing_run_in_a_process_fails_the_grid_with_its_error(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = grid(tmp_path, "--jobs", "2", "--cuda-graphs", "--configs", "mtl")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):  # said before any process starts
        evaluate.run_grid(args)
    args = grid(tmp_path, "--jobs", "2", "--model-option", "kd_temperature=0", "--configs", "mtl")
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):  # the grid's own check, before any run
        evaluate.run_grid(args)
    # without that check (here only: the processes import their own), the run in a process meets the bad option
    monkeypatch.setattr(evaluate, "_check_run_configs", lambda *args: None)
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):  # raised in a process, re-raised here
        evaluate.run_grid(args)


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        evaluate.run_grid(grid(tmp_path, "--jobs", "0"))


def test_runs_finished_by_the_processes_are_on_disk_before_a_later_run_fails(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run is kept as it finishes (--resume then skips it), not when the whole grid has finished."""
    monkeypatch.setattr(evaluate, "_check_run_configs", lambda *args: None)  # so that a run fails, in its process
    args = grid(tmp_path, "--jobs", "2", "--configs", "mtl,river_lr", "--mode", "split", "--aux-tasks", "",
                "--model-option", "river.lr=-1")  # the river runs, after the two mtl runs, fail
    with pytest.raises(ValueError, match="lr must be > 0"):
        evaluate.run_grid(args)
    kept = [json.loads(line) for line in (tmp_path / evaluate.RUN_LOG).read_text().splitlines()[1:]]
    assert kept and all(run["config"] == "mtl" for run in kept)


def test_a_grid_killed_while_its_processes_run_keeps_the_runs_they_finished(tmp_path: Path) -> None:
    """kill -9 of ``crossdistil evaluate --jobs 2`` mid-grid: the runs finished by then are in the run log."""
    import os
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "consumers.cli", "evaluate", "--dataset", "synthetic", "--source", "-",
               "--option", "n_events=3000", "--configs", "mtl,aux", "--seeds", "4", "--mode", "both",
               "--threads", "1", "--device", "cpu", "--jobs", "2", "--out", str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(evaluate.__file__).resolve().parents[2], start_new_session=True)
    log, deadline = tmp_path / evaluate.RUN_LOG, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if log.exists() and len(log.read_text().splitlines()) >= 2:  # the header and a finished run
                break
            time.sleep(0.05)
        assert process.poll() is None, "the grid ended before a finished run was on disk"
        time.sleep(0.5)  # each run takes longer: the others are still running (all at once, they would all be in)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "results.json").exists() and log.exists()
    assert len(log.read_text().splitlines()) < 1 + 16  # killed mid-grid, with runs still to come

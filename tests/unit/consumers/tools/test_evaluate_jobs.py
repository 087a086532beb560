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


def test_a_failing_run_in_a_process_fails_the_grid_with_its_error(tmp_path: Path) -> None:
    args = grid(tmp_path, "--jobs", "2", "--cuda-graphs", "--configs", "mtl")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):  # said before any process starts
        evaluate.run_grid(args)
    args = grid(tmp_path, "--jobs", "2", "--model-option", "kd_temperature=0", "--configs", "mtl")
    with pytest.raises(ValueError, match="kd_temperature must be > 0"):  # raised in a process, re-raised here
        evaluate.run_grid(args)


def test_jobs_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        evaluate.run_grid(grid(tmp_path, "--jobs", "0"))

"""``crossdistil evaluate``'s flags as a new user meets them: what ``--help`` says is required and what a data set
needs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from consumers.tools import evaluate

pytestmark = pytest.mark.unit


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossdistil evaluate")
    evaluate.add_arguments(parser)
    return parser


def test_out_is_required_by_the_parser_and_help_says_so(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["--dataset", "synthetic"])
    assert exit_.value.code == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err
    usage = parser().format_usage()
    assert "--out OUT" in usage and "[--out OUT]" not in usage


def test_help_shows_the_default_device() -> None:
    assert "cuda[:N] (default auto)" in " ".join(parser().format_help().split())


def test_the_synthetic_data_set_runs_without_a_source(tmp_path: Path) -> None:
    args = parser().parse_args(["--dataset", "synthetic", "--option", "n_events=300", "--configs", "mtl",
                                "--seeds", "1", "--curve-points", "2", "--threads", "1", "--device", "cpu",
                                "--out", str(tmp_path)])
    assert evaluate.run(args) == 0
    assert (tmp_path / "results.json").exists()


def test_a_data_set_read_from_files_still_asks_for_its_source(tmp_path: Path) -> None:
    args = parser().parse_args(["--dataset", "kuairand", "--configs", "mtl", "--seeds", "1", "--device", "cpu",
                                "--out", str(tmp_path)])
    with pytest.raises(ValueError, match=r"data set 'kuairand' needs --source PATH"):
        evaluate.run_grid(args)

"""``crossdistil evaluate``: every finished run is on disk as it finishes (OUT/runs.partial.jsonl), and ``--resume``
runs only the rest of an interrupted grid, which then ends as the uninterrupted grid would."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from consumers.tools import evaluate

pytestmark = pytest.mark.unit

ONE_RUN = evaluate._one_run


def grid(out: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(["--dataset", "synthetic", "--source", "-", "--option", "n_events=600",
                              "--configs", "mtl,aux", "--seeds", "2", "--mode", "both", "--curve-points", "2",
                              "--threads", "1", "--device", "cpu", "--out", str(out), *extra])


def runs_of(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"}
            for r in json.loads((out / "results.json").read_text())["runs"]]


class Stopped(RuntimeError):
    """The process stopping mid-grid (a crash, a kill; KeyboardInterrupt would stop pytest's worker too)."""


def interrupt_after(monkeypatch: pytest.MonkeyPatch, n: int) -> list:
    """``evaluate._one_run`` counting its calls and stopping the grid at call ``n + 1``."""
    calls, real = [], ONE_RUN

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(calls) == n:
            raise Stopped
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_one_run", counted)
    return calls


def test_an_interrupted_grid_resumes_where_it_stopped_and_ends_as_if_never_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert evaluate.run(grid(tmp_path / "whole")) == 0
    assert not (tmp_path / "whole" / evaluate.RUN_LOG).exists()  # removed once results.json holds every run

    out = tmp_path / "stopped"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Stopped):
        evaluate.run(grid(out))
    log = (out / evaluate.RUN_LOG).read_text().splitlines()
    assert len(log) == 1 + 3  # the header and the three finished runs
    (out / evaluate.RUN_LOG).write_text("\n".join(log) + '\n{"tasks": ["cli')  # a fourth line cut by the crash

    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(grid(out, "--resume")) == 0
    assert len(calls) == 8 - 3  # only the runs not finished
    assert runs_of(out) == runs_of(tmp_path / "whole")  # in the grid's order, the same numbers
    # the report's time counts the earlier command's runs too, not only the last command's
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert (f"3 of the 8 runs finished by earlier commands; the runs took {sum(r['seconds'] for r in runs):.0f} s "
            "in all") in (out / "report.md").read_text()
    assert "; total " in (tmp_path / "whole" / "report.md").read_text()


def test_resume_refuses_the_log_of_another_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Stopped):
        evaluate.run(grid(tmp_path))
    with pytest.raises(ValueError, match=r"was written by another grid \(it differs in \['protocol'\]\)"):
        evaluate.run_grid(grid(tmp_path, "--resume", "--batch-size", "64"))


def test_a_resumed_grid_may_have_more_seeds_and_reuses_the_finished_runs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    first = interrupt_after(monkeypatch, 5)
    with pytest.raises(Stopped):
        evaluate.run(grid(tmp_path))  # 2 seeds: split mtl 0, 1, split aux 0, 1, prequential mtl 0 finished
    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(grid(tmp_path, "--seeds", "3", "--resume")) == 0
    assert len(calls) == 12 - 5 and not set(calls) & set(first)
    assert len(runs_of(tmp_path)) == 12


def test_resume_adds_seeds_to_a_finished_grid_from_its_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert evaluate.run(grid(tmp_path / "two")) == 0
    assert evaluate.run(grid(tmp_path / "three", "--seeds", "3")) == 0
    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(grid(tmp_path / "two", "--seeds", "3", "--resume")) == 0
    assert [combo[3] for combo in calls] == [2, 2, 2, 2]  # only seed 2, of each mode and configuration
    assert runs_of(tmp_path / "two") == runs_of(tmp_path / "three")


def test_an_unfinished_grids_runs_are_not_replaced_without_resume(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Stopped):
        evaluate.run(grid(tmp_path))
    kept = (tmp_path / evaluate.RUN_LOG).read_text()
    with pytest.raises(ValueError, match=r"holds 2 finished run\(s\) of a grid that did not finish .*--resume"):
        evaluate.run_grid(grid(tmp_path))
    assert (tmp_path / evaluate.RUN_LOG).read_text() == kept  # untouched
    (tmp_path / evaluate.RUN_LOG).write_text(kept.splitlines()[0] + "\n")  # a header alone: nothing to lose
    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(grid(tmp_path)) == 0 and len(calls) == 8


def test_resume_with_a_smaller_grid_keeps_every_finished_run_and_the_report_says_which(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert evaluate.run(grid(tmp_path)) == 0  # 8 runs: mtl,aux x seeds 0,1 x split,prequential
    finished = runs_of(tmp_path)
    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(grid(tmp_path, "--configs", "mtl", "--seeds", "1", "--resume")) == 0
    assert calls == []  # both runs of the smaller grid were finished
    runs = runs_of(tmp_path)
    key = evaluate._record_key
    assert sorted(map(key, runs)) == sorted(map(key, finished))  # nothing dropped
    assert [(r["config"], r["seed"]) for r in runs[:2]] == [("mtl", 0), ("mtl", 0)]  # the grid's own runs first
    report = (tmp_path / "report.md").read_text()
    assert ("**8 runs: the 2 of the last command's grid and 6 finished earlier in this folder, outside that grid, "
            "kept by `--resume`**") in report
    assert "`task0,task1 split shared_bottom aux` seeds 0,1" in report  # the kept runs listed
    assert "6 of them kept from earlier in --out" in capsys.readouterr().out


def test_an_interrupted_resume_still_keeps_the_earlier_runs_and_their_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert evaluate.run(grid(tmp_path)) == 0  # 8 runs: mtl,aux x seeds 0,1 x split,prequential
    smaller = grid(tmp_path, "--configs", "mtl", "--seeds", "3", "--resume")  # 4 of its 6 runs finished
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Stopped):
        evaluate.run(smaller)
    calls = interrupt_after(monkeypatch, 100)
    assert evaluate.run(smaller) == 0  # from OUT/runs.partial.jsonl this time
    assert len(calls) == 1
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["runs"]) == 10 and doc["kept_runs"] == 4  # aux's four runs, outside the grid
    assert len(doc["commands"]) == 2  # the first grid's command, then the resume's

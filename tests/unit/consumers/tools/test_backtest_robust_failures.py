"""A configuration that fails part-way is dropped from a backtest there; the others finish with exactly the numbers
they get replayed without it (inline, in the intake process's replay, from the replay cache, in learner processes),
the failure is in summary.json (``failed``), the report and on stderr, and the command exits 4 (5 when every
configuration failed). What the configurations share (the log, the intake) still stops everything."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from consumers.core.pipeline import Answer
from consumers.runtime.processes import can_fork
from consumers.tools import backtest
from consumers.tools.failures import (
    FAILURE_REASONS,
    Dropped,
    Failures,
    FiniteLoss,
    NonFiniteLoss,
    failure_reason,
    short_message,
)
from streamer.eventlog import EventLogError
from tests.unit.consumers.tools.test_backtest_batching import predictions_digest
from tests.unit.consumers.tools.test_backtest_intake import messy_log  # noqa: F401 (a fixture)

pytestmark = pytest.mark.unit

WINDOWS = ("join.attribution_window_s={click = 60, like = 120}",)  # the messy log's windows (test_backtest_intake)
NAN = ("model.options.lr", 1e30)  # the first step overflows the weights: the loss is NaN from the second step on


@pytest.fixture(autouse=True)
def one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """No learner processes unless a test asks (``_intake_ports`` moves configurations to the cores it finds): a
    failure in one is noticed when its answer comes back, which depends on timing."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)


def configs(config_file: Path, rungs: str = "mtl,crossdistil", failing: tuple[str, ...] = (),
            overrides: tuple[str, ...] = ()) -> dict:
    """Configurations per rung on the test's base file; each of ``failing`` with a learning rate that makes its loss
    NaN (a real failure, in any process)."""
    out = backtest.build_configs([str(config_file)], rungs, list(overrides))
    for name in failing:
        out[name].model.options = {**out[name].model.options, "lr": NAN[1]}
    return out


def replay(log: Path, cfgs: dict, **kwargs) -> backtest.BacktestResult:
    records, _ = backtest.log_records(f"file://{log}")
    return backtest.run_backtest(records, cfgs, sample_every=250, **kwargs)


def numbers(run_: backtest.ConfigRun) -> tuple:
    """Everything of a configuration's replay a result is made of: its predictions, series and batches."""
    return predictions_digest(run_), run_.series, run_.batch_sizes, run_.pipeline.join.counters


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


# ------------------------------------------------------------------------------------------------ pure parts


def test_a_failure_is_classified_by_what_raised() -> None:
    from consumers.runtime.learner_process import LearnerProcessError

    assert failure_reason(NonFiniteLoss("nan")) == "non_finite_loss"
    assert failure_reason(MemoryError()) == "out_of_memory"
    assert failure_reason(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                                "allocate memory: you tried to allocate 9 GB")) == "out_of_memory"
    assert failure_reason(LearnerProcessError("the learner process died (killed by signal 9)")) == \
        "learner_process"
    assert failure_reason(LearnerProcessError("the learner process failed:\nTraceback\nRuntimeError: "
                                                       "CUDA out of memory")) == "out_of_memory"
    assert failure_reason(ValueError("a model's own error")) == "error"
    assert set(FAILURE_REASONS) == {"non_finite_loss", "out_of_memory", "learner_process", "error", "build"}


def test_a_learner_process_traceback_is_shortened_to_its_first_and_last_lines() -> None:
    assert short_message("the learner process failed:\nTraceback (most recent call last):\n  File x\n"
                           "ValueError: boom\n") == "the learner process failed: ValueError: boom"
    assert short_message("one line") == "one line"
    assert len(short_message("x" * 5000)) == 1000


class _Port:
    """A learner port whose answers carry the given total losses."""

    def __init__(self, totals: list[float]) -> None:
        self.totals, self.steps, self.in_flight, self.closed = totals, 0, 0, False

    def answers(self, wait: bool = False):
        import numpy as np

        for n, total in enumerate(self.totals):
            yield n, Answer(np.zeros((1, 1), np.int8), np.zeros((1, 1), np.float32), 0.0,
                            {"total": total, "teacher_auc/click": math.nan}, n + 1)

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("total", [math.nan, math.inf, -math.inf])
def test_a_loss_that_is_not_finite_raises_where_the_answer_is_collected(total: float) -> None:
    port = FiniteLoss(_Port([0.7, 0.6, total, 0.5]))
    answers = port.answers()
    assert [context for context, _ in zip(range(2), answers)] == [0, 1]  # a NaN gate AUC is no failure
    with pytest.raises(NonFiniteLoss, match=f"the training loss is {total} at step 3"):
        next(answers)
    port.close()
    assert port.port.closed


def test_a_guard_drops_its_configuration_says_so_once_and_lets_an_interrupt_through(config_file: Path) -> None:
    runs, _ = backtest._grouped_runs(configs(config_file), "dense", 100)
    said = []
    failures = Failures(lambda name, failure: said.append((name, failure["reason"], failure["batch"])))
    failures.runs += runs.values()
    with failures.guard(runs["crossdistil"], batch=7):
        raise MemoryError("no room")
    with failures.guard(runs["crossdistil"], batch=8):  # a second error of a dropped one is not said again
        raise ValueError("later")
    assert said == [("crossdistil", "out_of_memory", 7)]
    failure = runs["crossdistil"].failure
    assert failure["error"] == "MemoryError" and failure["detail"] == "no room" and failure["steps"] == 0
    assert failure["where"].startswith("tests/unit/consumers/tools/test_backtest_robust_failures.py:")
    assert isinstance(runs["crossdistil"].pipeline.learner, Dropped)  # its model let go
    assert "MemoryError: no room" in runs["crossdistil"].failure_traceback
    assert not failures.all_failed and runs["mtl"].failure is None
    with pytest.raises(KeyboardInterrupt), failures.guard(runs["mtl"]):
        raise KeyboardInterrupt
    assert runs["mtl"].failure is None
    for run_ in runs.values():
        run_.pipeline.close()


# ------------------------------------------------------------------------------------------- whole replays


@pytest.fixture(scope="module")
def alone(drift_log: Path, config_file: Path) -> dict:
    """Each rung replayed alone, in both batching modes: what it must get beside a configuration that fails."""
    out = {}
    for batching in ("event-time", "dense"):
        for rung in ("mtl", "crossdistil"):
            out[batching, rung] = numbers(replay(drift_log, configs(config_file, rung), batching=batching,
                                                 intake="inline").runs[rung])
    return out


@pytest.mark.parametrize("batching,intake", [("event-time", "inline"), ("dense", "inline"), ("dense", "process")])
@pytest.mark.parametrize("failing", ["crossdistil", "mtl"])
def test_a_configuration_whose_loss_turns_nan_is_dropped_and_the_other_gets_its_own_numbers(
        drift_log: Path, config_file: Path, alone: dict, batching: str, intake: str, failing: str) -> None:
    # mtl is the group's first configuration (its join and batcher cut the batches) and the comparison's baseline
    said = []
    result = replay(drift_log, configs(config_file, failing=(failing,)), batching=batching, intake=intake,
                    on_failure=lambda name, failure: said.append(name))
    other = "mtl" if failing == "crossdistil" else "crossdistil"
    assert said == [failing] and list(result.runs) == [other] and list(result.failed) == [failing]
    assert result.names == ["mtl", "crossdistil"] and result.intake == intake
    assert numbers(result.runs[other]) == alone[batching, other]
    failure = result.failed[failing].failure
    assert failure["reason"] == "non_finite_loss" and failure["error"] == "NonFiniteLoss"
    # the second step's loss is the first NaN: one step recorded, the second batch's time and first impression
    assert (failure["batch"], failure["steps"]) == (2, 1)
    assert failure["trained_samples"] == result.failed[failing].batch_sizes[0]
    assert failure["impression_id"] == result.runs[other].impression_ids[failure["trained_samples"]]
    assert failure["event_time_ms"] >= result.runs[other].event_ts_ms[failure["trained_samples"]]
    records, desc = backtest.log_records(f"file://{drift_log}")
    data = backtest.summary(result, desc)
    assert set(data["failed"]) == {failing} and set(data["configurations"]) == {other}
    assert data["failed"][failing]["traceback"] == f"traceback_{failing}.txt"
    entry = data["comparison"]["configurations"]["crossdistil"]
    assert data["comparison"]["baseline"] == "mtl" and entry["verdict"] == "not comparable"
    assert ("the baseline `mtl` failed" if failing == "mtl" else "`crossdistil` failed") in entry["summary"]
    assert data["replayed"]["groups"] == [["mtl", "crossdistil"]]
    assert json.loads(json.dumps(data, default=backtest._json_default, allow_nan=False)) is not None


def test_a_failing_configuration_does_not_disturb_another_group_or_the_dead_letters(
        messy_log: Path, config_file: Path) -> None:  # noqa: F811
    # "small" cuts other batches (a group of its own); the first group's only configuration fails, so the first
    # group's stream (which describes the dead letters) must go on joining for the summary's counters
    alone = replay(messy_log, configs(config_file, "mtl", overrides=(*WINDOWS, "batching.batch_size=64")),
                   batching="dense", intake="inline")
    both = configs(config_file, "mtl", failing=("mtl",), overrides=WINDOWS)
    both["small"] = configs(config_file, "mtl", overrides=(*WINDOWS, "batching.batch_size=64"))["mtl"]
    result = replay(messy_log, both, batching="dense", intake="inline")
    assert list(result.failed) == ["mtl"] and list(result.runs) == ["small"]
    assert numbers(result.runs["small"]) == numbers(alone.runs["mtl"])
    assert result.dead_letter_examples == alone.dead_letter_examples and len(result.dead_letter_examples) > 0
    records, desc = backtest.log_records(f"file://{messy_log}")
    data, before = backtest.summary(result, desc), backtest.summary(alone, desc)
    assert data["configurations"]["small"]["dead_letters_by_reason"] == \
        before["configurations"]["mtl"]["dead_letters_by_reason"]
    assert data["replayed"]["groups"] == [["mtl"], ["small"]]


def test_a_step_that_raises_is_an_error_and_memory_is_out_of_memory(drift_log: Path, config_file: Path,
                                                                    alone: dict, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    from models.learner import Learner

    step = Learner.step

    def failing_step(self, batch):
        if self.config.rung == "crossdistil" and self.steps == 4:
            raise failing_step.error
        return step(self, batch)

    monkeypatch.setattr(Learner, "step", failing_step)
    for error, reason in ((ValueError("a model's own error"), "error"), (MemoryError(), "out_of_memory")):
        failing_step.error = error
        result = replay(drift_log, configs(config_file), batching="dense", intake="process")
        failure = result.failed["crossdistil"].failure
        assert (failure["reason"], failure["error"], failure["batch"], failure["steps"]) == \
            (reason, type(error).__name__, 5, 4)
        assert failure["where"].endswith("in failing_step")
        assert numbers(result.runs["mtl"]) == alone["dense", "mtl"]


def test_every_configuration_failing_stops_the_replay_and_says_so(
        messy_log: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    # the messy log's impressions leave the join a window (2 minutes) after they came: batch 2 is trained early
    whole = sum(1 for _ in backtest.log_records(f"file://{messy_log}")[0])
    for intake in ("inline", "process"):
        result = replay(messy_log, configs(config_file, failing=("mtl", "crossdistil"), overrides=WINDOWS),
                        batching="dense", intake=intake)
        assert not result.runs and list(result.failed) == ["mtl", "crossdistil"]
        assert 0 < result.records < whole / 2, intake  # stopped once the last one failed
    status = cli("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
                 "--set", WINDOWS[0], "--set", f"{NAN[0]}={NAN[1]}", "--out", str(tmp_path), "--quiet",
                 "--batching", "dense")
    assert status == backtest.EXIT_ALL_FAILED == 5
    err = capsys.readouterr().err
    assert "every configuration failed (mtl, crossdistil): there is no result" in err
    assert err.count("failed: at batch 2") == 2
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["configurations"] == {} and set(data["failed"]) == {"mtl", "crossdistil"}
    assert data["comparison"]["configurations"]["crossdistil"]["verdict"] == "not comparable"
    report = (tmp_path / "report.md").read_text()
    assert "**Every configuration failed: there is no result.**" in report
    assert (tmp_path / "traceback_mtl.txt").read_text().startswith("configuration 'mtl' failed at batch 2")


def test_the_command_writes_the_others_results_and_exits_4(drift_log: Path, config_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.toml"  # a second file: --set would reach both
    bad.write_text(config_file.read_text().replace("[model.options]\n", f"[model.options]\nlr = {NAN[1]}\n"))
    status = cli("--log", f"file://{drift_log}", "--config", str(config_file), "--config", str(bad),
                 "--out", str(tmp_path / "out"), "--quiet", "--no-plots", "--sample-every", "500")
    assert status == backtest.EXIT_FAILED == 4
    captured = capsys.readouterr()
    assert "configuration 'bad' failed: at batch 2" in captured.err and "dropped from the replay" in captured.err
    assert "1 of 2 configurations failed and were dropped (bad)" in captured.err
    assert "bad: FAILED: at batch 2" in captured.out
    assert "bad vs base (paired, 95% interval, Holm-adjusted): not comparable" in captured.out
    out = tmp_path / "out"
    data = json.loads((out / "summary.json").read_text())
    assert list(data["configurations"]) == ["base"] and data["configurations"]["base"]["trained_samples"] == 3000
    assert data["failed"]["bad"]["reason"] == "non_finite_loss"
    assert {"reason", "error", "detail", "where", "batch", "event_time_ms", "impression_id", "steps",
            "trained_samples", "traceback"} == set(data["failed"]["bad"])
    assert data["replayed"]["config_differences"]["bad"] == {"model.options.lr": [None, NAN[1]]}
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "series_base.csv", "summary.json", "timing.json",
                                                     "traceback_bad.txt"]
    report = (out / "report.md").read_text()
    assert "## Failed configurations" in report and "- **`bad`** failed at batch 2" in report
    assert "| base | click |" in report and "| bad | click |" not in report
    assert "Settings of each configuration that differ from the first's (`base`)" in report
    assert json.loads((out / "timing.json").read_text())["configurations"]["bad"]["failed"] is True


def test_the_replay_cache_keeps_an_entry_when_a_configuration_fails_and_replays_the_failure(
        drift_log: Path, config_file: Path, alone: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = replay(drift_log, configs(config_file, failing=("crossdistil",)), batching="dense", replay_cache=cache)
    second = replay(drift_log, configs(config_file, failing=("crossdistil",)), batching="dense", replay_cache=cache)
    assert (first.intake, second.intake) == ("process", "cache")
    for result in (first, second):
        assert numbers(result.runs["mtl"]) == alone["dense", "mtl"]
        assert result.failed["crossdistil"].failure == first.failed["crossdistil"].failure
    # every configuration failing stops the intake part-way: no entry, which would be cut short
    empty = tmp_path / "empty"
    result = replay(drift_log, configs(config_file, failing=("mtl", "crossdistil")), batching="dense",
                    replay_cache=empty)
    assert not result.runs and not [p for p in empty.iterdir() if p.suffix == ".intake"]


@pytest.mark.slow
def test_a_configuration_in_a_learner_process_fails_alone(drift_log: Path, config_file: Path, alone: dict,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if not can_fork():
        pytest.skip("learner processes are forks of the replay on Linux only")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)  # a core for the group's second configuration
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked learner processes: the costlier step (crossdistil's) moves
    try:
        result = replay(drift_log, configs(config_file, failing=("crossdistil",)), batching="dense", intake="process")
    finally:
        torch.set_num_threads(threads)
    assert result.processes["learner_processes"] == 1
    assert numbers(result.runs["mtl"]) == alone["dense", "mtl"]
    dropped = result.failed["crossdistil"]
    assert dropped.failure["reason"] == "non_finite_loss"
    assert isinstance(dropped.pipeline.learner, Dropped)


def test_a_damaged_log_still_stops_everything(
        messy_log: Path, config_file: Path, tmp_path: Path) -> None:  # noqa: F811
    cut = tmp_path / "cut.evlog"
    cut.write_bytes(messy_log.read_bytes()[:-5])
    for intake in ("inline", "process"):
        said: list[str] = []
        with pytest.raises(EventLogError, match="truncated"):
            replay(cut, configs(config_file, failing=("crossdistil",), overrides=WINDOWS), batching="dense",
                   intake=intake, on_failure=lambda name, failure, said=said: said.append(name))
        assert said == ["crossdistil"]  # it failed first; the log's damage is no configuration's



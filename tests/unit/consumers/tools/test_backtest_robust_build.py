"""A configuration that cannot even be built (its model's constructor raises, it runs out of memory allocating its
tables) is dropped from a backtest before the replay, as one that fails part-way is: reason ``build``, the others
replay with exactly the numbers they get without it, the command exits 4 (5 when none could be built, with the
outputs saying why). What can be checked before anything is built (the configuration's values, the model's options,
the device) is still a usage error: exit 2, nothing replayed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from consumers.runtime import learner_process
from consumers.tools import backtest
from tests.unit.consumers.tools.test_backtest_robust_failures import cli, configs, numbers, replay

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def one_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configuration trains in this process (the failure under test is the build's, not a learner process's)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 1)


def unbuildable(monkeypatch: pytest.MonkeyPatch, rungs: tuple[str, ...], error: BaseException) -> None:
    """Building the learner of each of ``rungs`` raises ``error`` (as a model too large for memory, or an option its
    constructor alone rejects, would), in this process."""
    make = learner_process.make_learner

    def failing_make(config, device="auto"):
        if config.rung in rungs:
            raise error
        return make(config, device)

    monkeypatch.setattr(learner_process, "make_learner", failing_make)


def survivor_numbers(result: backtest.BacktestResult, name: str, log: Path) -> tuple:
    """A configuration's predictions, series and batches, and its whole summary.json entry."""
    _, desc = backtest.log_records(f"file://{log}")
    return numbers(result.runs[name]), backtest.summary(result, desc)["configurations"][name]


@pytest.mark.parametrize("batching,intake", [("event-time", "inline"), ("dense", "process")])
@pytest.mark.parametrize("failing", ["crossdistil", "mtl"])
def test_a_configuration_that_cannot_be_built_is_dropped_and_the_other_gets_its_own_numbers(
        drift_log: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch, batching: str, intake: str,
        failing: str) -> None:
    other = "mtl" if failing == "crossdistil" else "crossdistil"
    alone = survivor_numbers(replay(drift_log, configs(config_file, other), batching=batching, intake=intake), other,
                             drift_log)
    unbuildable(monkeypatch, (failing,), MemoryError("cannot allocate the embedding tables"))
    said = []
    result = replay(drift_log, configs(config_file), batching=batching, intake=intake,
                    on_failure=lambda name, failure: said.append(name))
    assert said == [failing] and list(result.runs) == [other] and list(result.failed) == [failing]
    assert result.intake == intake and result.records > 0
    # mtl is the group's first: when it cannot be built, crossdistil's join and batcher cut the batches
    assert survivor_numbers(result, other, drift_log) == alone
    failure = result.failed[failing].failure
    assert (failure["reason"], failure["cause"], failure["error"]) == ("build", "out_of_memory", "MemoryError")
    assert (failure["batch"], failure["steps"], failure["trained_samples"], failure["impression_id"]) == \
        (None, 0, 0, None)
    assert failure["where"].endswith("in failing_make")
    _, desc = backtest.log_records(f"file://{drift_log}")
    data = backtest.summary(result, desc)
    assert set(data["failed"]) == {failing} and set(data["configurations"]) == {other}
    assert data["replayed"]["groups"] == [["mtl", "crossdistil"]]  # the group it would have trained in
    entry = data["comparison"]["configurations"]["crossdistil"]
    assert entry["verdict"] == "not comparable" and "build (out_of_memory) before the replay" in entry["summary"]


def test_the_command_drops_an_unbuildable_configuration_and_exits_4(
        drift_log: Path, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    unbuildable(monkeypatch, ("crossdistil",), ValueError("embedding_dim 4 is not a multiple of the heads"))
    status = cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
                 "--out", str(tmp_path), "--quiet", "--no-plots", "--sample-every", "500")
    assert status == backtest.EXIT_FAILED == 4
    err = capsys.readouterr().err
    assert ("configuration 'crossdistil' failed: when it was built, before the replay: build (error): ValueError: "
            "embedding_dim 4 is not a multiple of the heads") in err
    data = json.loads((tmp_path / "summary.json").read_text())
    assert list(data["configurations"]) == ["mtl"] and data["configurations"]["mtl"]["trained_samples"] == 3000
    assert data["failed"]["crossdistil"]["reason"] == "build"
    report = (tmp_path / "report.md").read_text()
    assert "- **`crossdistil`** failed when it was built, before the replay" in report
    assert (tmp_path / "traceback_crossdistil.txt").read_text().startswith(
        "configuration 'crossdistil' failed when it was built")


def test_no_configuration_built_is_exit_5_with_outputs_and_reads_nothing(
        drift_log: Path, config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    unbuildable(monkeypatch, ("mtl", "crossdistil"), MemoryError())
    result = replay(drift_log, configs(config_file), batching="dense")
    assert not result.runs and list(result.failed) == ["mtl", "crossdistil"] and result.records == 0
    status = cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
                 "--out", str(tmp_path), "--quiet", "--no-plots")
    assert status == backtest.EXIT_ALL_FAILED == 5
    assert "no configuration could be built, so nothing was replayed" in capsys.readouterr().err
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["configurations"] == {} and {f["reason"] for f in data["failed"].values()} == {"build"}
    assert "No configuration could be built, so nothing was replayed." in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("setting,said", [
    ("model.options.kd_temperature=0", "configuration 'mtl': kd_temperature must be > 0"),
    ("model.device='gpu'", "configuration 'mtl': device 'gpu'"),
])
def test_what_can_be_checked_before_building_is_still_a_usage_error(
        drift_log: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, setting: str,
        said: str) -> None:
    status = cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
                 "--set", setting, "--out", str(tmp_path / "out"), "--quiet")
    assert status == 2
    assert said in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_a_learner_process_the_replay_cannot_start_leaves_its_configuration_training_here(
        drift_log: Path, config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import torch

    from consumers.runtime.processes import can_fork

    if not can_fork():
        pytest.skip("learner processes are forks of the replay on Linux only")
    alone = {rung: numbers(replay(drift_log, configs(config_file, rung), batching="dense", intake="inline").runs[rung])
             for rung in ("mtl", "crossdistil")}

    class Unstartable(learner_process.RemoteLearner):
        def __init__(self, cfg, *args, fork: bool = False, **kwargs) -> None:
            raise OSError(12, "Cannot allocate memory")  # fork(2) refused

    monkeypatch.setattr(learner_process, "RemoteLearner", Unstartable)
    monkeypatch.setattr(os, "cpu_count", lambda: 3)  # a core for the group's second configuration
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forked learner processes: the costlier step (crossdistil's) would move
    try:
        result = replay(drift_log, configs(config_file), batching="dense", intake="process")
    finally:
        torch.set_num_threads(threads)
    assert not result.failed and result.processes["learner_processes"] == 0
    assert {rung: numbers(run_) for rung, run_ in result.runs.items()} == alone
    assert "could not start a learner process for 'crossdistil' (OSError" in capsys.readouterr().err

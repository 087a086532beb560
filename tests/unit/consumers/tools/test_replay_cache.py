"""A replay cache (``crossdistil backtest --replay-cache DIR``, ``consumers.tools.intake.ReplayCache``) keeps what a
dense replay's intake process sent; a later replay of the same log, range, groups and code reads it instead: the same
numbers bit for bit, a new entry for anything the batches depend on, no entry from a failed replay, and a clear error
for a damaged file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from consumers.runtime.processes import can_fork
from consumers.tools import backtest, intake
from streamer.eventlog import EventLogError
from tests.unit.consumers.tools.test_backtest_batching import predictions_digest
from tests.unit.consumers.tools.test_backtest_intake import WINDOWS, messy_log  # noqa: F401 - a fixture

pytestmark = pytest.mark.unit


def replay(log: Path, config_file: Path, cache: Path | None, rungs: str = "mtl,crossdistil",
           overrides: tuple = WINDOWS, intake_mode: str = "auto", **limits) -> tuple[backtest.BacktestResult, tuple]:
    """The result and what must not change: the summary (JSON text), each configuration's series and predictions."""
    configs = backtest.build_configs([str(config_file)], rungs, list(overrides))
    if "small" in rungs:  # a second group: other batches from the same records
        configs = {"mtl": configs["mtl"], "small": backtest.build_configs(
            [str(config_file)], "mtl", [*overrides, "batching.batch_size=64"])["mtl"]}
    records, desc = backtest.log_records(f"file://{log}", **limits)
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, intake=intake_mode,
                                   replay_cache=cache)
    summary = json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default)
    return result, (summary, {n: backtest.series_csv(r.series) for n, r in result.runs.items()},
                    {n: (predictions_digest(r), r.users().tobytes()) for n, r in result.runs.items()})


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_replay_from_the_cache_is_the_intake_replay_bit_for_bit(messy_log: Path, config_file: Path,  # noqa: F811
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    inline = {}
    for rungs in ("mtl,crossdistil", "mtl,small"):  # one group with two configurations; two groups
        inline[rungs] = replay(messy_log, config_file, None, rungs, intake_mode="inline")[1]
        first, written = replay(messy_log, config_file, cache, rungs)
        assert first.intake == "process" and first.processes["replay_cache"]["hit"] is False
        second, read = replay(messy_log, config_file, cache, rungs)
        assert second.intake == "cache" and second.processes["replay_cache"]["hit"] is True
        assert second.processes["intake_cpu_s"] == 0.0
        assert written == inline[rungs] and read == inline[rungs]
    names = entries(cache)
    assert len(names) == 2 and all(name.endswith(".intake") for name in names)  # nothing temporary left
    # with no intake process to feed, a two-core machine has a core for the group's second configuration
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    fresh, _ = backtest._grouped_runs(backtest.build_configs([str(config_file)], "mtl,crossdistil", list(WINDOWS)),
                                      "dense", None)
    assert 0 < backtest._step_cost(fresh["mtl"]) < backtest._step_cost(fresh["crossdistil"])
    threads = torch.get_num_threads()
    for torch_threads in (2, 1):
        torch.set_num_threads(torch_threads)
        try:
            third, read = replay(messy_log, config_file, cache)
        finally:
            torch.set_num_threads(threads)
        assert third.intake == "cache" and third.processes["learner_processes"] == 1
        assert read == inline["mtl,crossdistil"]
        # a forked learner process (one torch thread) takes the costlier step (crossdistil's teachers) and this
        # process the cheaper with every configuration's metrics; a learner process that imports torch first
        # takes the cheaper (mtl's, the group's first)
        moved = "crossdistil" if torch_threads == 1 and can_fork() else "mtl"
        for name, run_ in third.runs.items():
            port = run_.pipeline.learner
            assert isinstance(getattr(port, "port", port), backtest._PreparedRemote) == (name == moved), name


def test_what_the_batches_depend_on_makes_a_new_entry(messy_log: Path, config_file: Path,  # noqa: F811
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    log = tmp_path / "copy.evlog"
    log.write_bytes(messy_log.read_bytes())

    def key(**kwargs) -> Path:
        configs = backtest.build_configs([str(config_file)], "mtl", list(kwargs.pop("overrides", WINDOWS)))
        run_ = backtest._grouped_runs(configs, "dense", 100)[1]
        leader = next(iter(run_.values()))
        groups = [backtest._intake_group(leader)]
        records, _ = backtest.log_records(f"file://{kwargs.pop('log', log)}", **kwargs)
        leader.pipeline.close()
        return intake.ReplayCache(cache, records, groups, backtest.DENSE_TRAIN_EVERY).path

    base = key()
    assert key() == base  # the same replay: the same entry
    different = [key(limit=500), key(from_ms=1_200_000), key(overrides=(*WINDOWS, "batching.batch_size=64")),
                 key(overrides=("join.attribution_window_s={click = 60, like = 121}",)),
                 key(overrides=(*WINDOWS, "model.options.features={categorical = ['user_id'], hash_buckets = 64}")),
                 key(log=messy_log)]  # the same bytes elsewhere
    assert base not in different and len(set(different)) == len(different)
    os.utime(log, ns=(1, 1))  # rewritten in place: same size, another modification time
    assert key() != base
    before = key()
    data = bytearray(log.read_bytes())
    data[-3] ^= 0xFF
    log.write_bytes(bytes(data))
    os.utime(log, ns=(1, 1))  # the same size and time, other bytes at its end
    assert key() != before
    restored = key()
    monkeypatch.setattr(intake, "_INTAKE_CODE", (*intake._INTAKE_CODE, Path(backtest.__file__)))  # other code
    assert key() != restored


def test_a_failed_replay_leaves_no_entry(messy_log: Path, config_file: Path, tmp_path: Path) -> None:  # noqa: F811
    cut = tmp_path / "cut.evlog"
    cut.write_bytes(messy_log.read_bytes()[:-7])
    cache = tmp_path / "cache"
    with pytest.raises(EventLogError, match="truncated"):
        replay(cut, config_file, cache, "mtl")
    assert entries(cache) == []


def test_a_damaged_entry_is_an_error_naming_its_file(messy_log: Path, config_file: Path,  # noqa: F811
                                                     tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    replay(messy_log, config_file, cache, "mtl")
    (entry,) = cache.iterdir()
    whole = entry.read_bytes()
    entry.write_bytes(whole[: len(whole) // 2])  # cut in the middle of a batch
    with pytest.raises(intake.IntakeError, match=f"{entry}.*(ends before|damaged).*delete it"):
        replay(messy_log, config_file, cache, "mtl")
    replay(messy_log, config_file, cache, "mtl", limit=300)  # another entry, copied over this one's name
    other = next(p for p in cache.iterdir() if p != entry)
    entry.write_bytes(other.read_bytes())
    with pytest.raises(intake.IntakeError, match="not this replay's; delete it"):
        replay(messy_log, config_file, cache, "mtl")
    entry.unlink()  # deleted, as the message says: the replay reads the log again and writes the entry anew
    result, _ = replay(messy_log, config_file, cache, "mtl")
    assert result.intake == "process" and entry.is_file()
    assert replay(messy_log, config_file, cache, "mtl")[0].intake == "cache"


def test_the_cache_needs_an_intake_process(messy_log: Path, config_file: Path, tmp_path: Path) -> None:  # noqa: F811
    configs = backtest.build_configs([str(config_file)], "mtl", list(WINDOWS))
    records, _ = backtest.log_records(f"file://{messy_log}", limit=200)
    for batching, mode, why in (("event-time", "auto", "event-time batching"), ("dense", "inline", "--intake inline")):
        with pytest.raises(ValueError, match=f"--replay-cache .*{why}"):
            backtest.run_backtest(records, configs, batching=batching, intake=mode, replay_cache=tmp_path)


def test_the_cli_reads_the_cache_on_a_second_run(messy_log: Path, config_file: Path,  # noqa: F811
                                                 tmp_path: Path) -> None:
    from tests.unit.consumers.tools.test_backtest_batching import cli

    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--quiet",
              "--no-plots", "--batching", "dense", "--replay-cache", str(tmp_path / "cache"),
              *[a for o in WINDOWS for a in ("--set", o)])
    for out, intake_mode in (("first", "process"), ("second", "cache")):
        assert cli(*common, "--out", str(tmp_path / out)) == 0
        timing = json.loads((tmp_path / out / "timing.json").read_text())
        assert timing["intake"] == intake_mode and timing["replay_cache"]["hit"] is (intake_mode == "cache")
    assert "replay cache" in (tmp_path / "second" / "report.md").read_text()
    assert (tmp_path / "first" / "summary.json").read_text() == (tmp_path / "second" / "summary.json").read_text()
    assert cli(*common, "--out", str(tmp_path / "e"), "--intake", "inline") == 2


def test_a_cache_that_cannot_be_written_does_not_stop_the_replay(messy_log: Path, config_file: Path,  # noqa: F811
                                                                 tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, inline = replay(messy_log, config_file, None, "mtl", intake_mode="inline")
    blocked = tmp_path / "a file"
    blocked.write_text("not a folder")  # the cache folder cannot be made
    result, read = replay(messy_log, config_file, blocked / "cache", "mtl")
    assert read == inline and "not written" in result.processes["replay_cache"]["error"]
    writes = []
    original = intake._Spool.write

    def full_disk(self, frame: bytes, keep: bool = False) -> None:  # the disk fills up after a few batches
        writes.append(keep)
        if len(writes) == 5:
            self._fail(OSError(28, "No space left on device"))
        original(self, frame, keep)

    monkeypatch.setattr(intake._Spool, "write", full_disk)
    cache = tmp_path / "cache"
    result, read = replay(messy_log, config_file, cache, "mtl")
    assert read == inline and "No space left" in result.processes["replay_cache"]["error"]
    assert entries(cache) == []  # neither an entry nor its temporary file


def test_the_cli_says_a_damaged_entry_without_a_traceback(messy_log: Path, config_file: Path,  # noqa: F811
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.unit.consumers.tools.test_backtest_batching import cli

    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--quiet",
              "--no-plots", "--batching", "dense", "--replay-cache", str(tmp_path / "cache"),
              *[a for o in WINDOWS for a in ("--set", o)])
    assert cli(*common, "--out", str(tmp_path / "first")) == 0
    (entry,) = (tmp_path / "cache").iterdir()
    entry.write_bytes(entry.read_bytes()[:1000])
    capsys.readouterr()
    assert cli(*common, "--out", str(tmp_path / "second")) == 1
    err = capsys.readouterr().err
    assert f"replay cache file {entry}" in err and "delete it" in err and "Traceback" not in err

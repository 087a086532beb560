"""A replay cache (``crossdistil backtest --replay-cache DIR``, ``consumers.tools.intake.ReplayCache``) keeps what a
dense replay's intake process sent; a later replay of the same log, range, groups and code reads it instead: the same
numbers bit for bit, a new entry for anything the batches depend on, no entry from a failed replay, and a clear error
for a damaged file."""

from __future__ import annotations

import json
import os
import time
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
           overrides: tuple = WINDOWS, intake_mode: str = "auto", cache_limit: int = intake.DEFAULT_CACHE_LIMIT,
           **limits) -> tuple[backtest.BacktestResult, tuple]:
    """The result and what must not change: the summary (JSON text), each configuration's series and predictions."""
    configs = backtest.build_configs([str(config_file)], rungs.replace(",small", ""), list(overrides))
    if "small" in rungs:  # a second group: other batches from the same records
        configs = {"mtl": configs["mtl"], "small": backtest.build_configs(
            [str(config_file)], "mtl", [*overrides, "batching.batch_size=64"])["mtl"]}
    records, desc = backtest.log_records(f"file://{log}", **limits)
    result = backtest.run_backtest(records, configs, batching="dense", sample_every=100, intake=intake_mode,
                                   replay_cache=cache, replay_cache_limit=cache_limit)
    summary = json.dumps(backtest.summary(result, desc), sort_keys=True, default=backtest._json_default)
    return result, (summary, {n: backtest.series_csv(r.series) for n, r in result.runs.items()},
                    {n: (predictions_digest(r), r.users().tobytes()) for n, r in result.runs.items()})


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.mark.slow
def test_a_replay_from_the_cache_is_the_intake_replay_bit_for_bit(messy_log: Path, config_file: Path,  # noqa: F811
                                                                   tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    inline = {}
    for rungs in ("mtl,crossdistil", "mtl,small"):  # one group with two configurations; two groups
        inline[rungs] = replay(messy_log, config_file, None, rungs, intake_mode="inline")[1]
        first, written = replay(messy_log, config_file, cache, rungs)
        assert first.intake == "process" and first.processes["replay_cache"]["hit"] is False
        # this process waited at least for the intake's first batch (its start and first chunk), within the replay
        assert 0.0 < first.processes["intake_wait_s"] < first.seconds
        second, read = replay(messy_log, config_file, cache, rungs)
        assert second.intake == "cache" and second.processes["replay_cache"]["hit"] is True
        assert second.processes["intake_cpu_s"] == 0.0 and "intake_wait_s" not in second.processes
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


def test_sizes_read_with_units_and_refused_with_a_sentence() -> None:
    assert [intake.parse_size(t) for t in ("0", "4096", "1.5K", "500m", "20G", "20GiB", "2 TB", "1e3")] == [
        0, 4096, 1536, 500 << 20, 20 << 30, 20 << 30, 2 << 40, 1000]
    for bad in ("", "G", "lots", "-1G", "nan", "inf", "5X"):
        with pytest.raises(ValueError, match="size"):
            intake.parse_size(bad)


def test_the_folder_keeps_its_limit_least_recently_used_first(messy_log: Path, tmp_path: Path) -> None:  # noqa: F811
    cache = intake.ReplayCache(tmp_path, intake.LogRecords(f"file://{messy_log}"), [], 200, limit=2500)
    now = time.time()

    def file(name: str, size: int, age_s: float) -> Path:
        path = tmp_path / name
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age_s, now - age_s))
        return path

    oldest, old, recent = file("a.intake", 1000, 300), file("b.intake", 1000, 200), file("c.intake", 1000, 100)
    mine = file(cache.path.name, 1000, 400)  # this replay's entry: kept whatever its time
    abandoned, writing = file("d.intake.123.tmp", 5000, 7200), file("e.intake.456.tmp", 5000, 10)
    other = file("notes.txt", 9000, 9999)  # not an entry: never touched
    removed = cache.evict()
    assert removed == {"files": 3, "bytes": 7000, "this": False}
    assert entries(tmp_path) == sorted(p.name for p in (recent, mine, writing, other))
    assert not oldest.exists() and not old.exists() and not abandoned.exists()
    assert cache.evict() == {"files": 0, "bytes": 0, "this": False}  # within the limit now
    mine.write_bytes(b"x" * 2000)
    cache.limit = 1500  # this entry alone is more than the limit: it goes, and the others fit without it
    assert cache.evict() == {"files": 0, "bytes": 0, "this": True}
    assert entries(tmp_path) == sorted(p.name for p in (recent, writing, other))
    cache.limit = 999
    assert cache.evict() == {"files": 1, "bytes": 1000, "this": False}  # without this entry (gone)
    assert entries(tmp_path) == sorted(p.name for p in (writing, other))
    with pytest.raises(ValueError, match="at least 0 bytes"):
        intake.ReplayCache(tmp_path, intake.LogRecords(f"file://{messy_log}"), [], 200, limit=-1)


def test_a_replay_keeps_the_cache_within_its_limit(messy_log: Path, config_file: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, _ = replay(messy_log, config_file, cache, "mtl", limit=400)
    (entry_a,) = cache.iterdir()
    size = entry_a.stat().st_size
    assert first.processes["replay_cache"]["bytes"] == size and "evicted" not in first.processes["replay_cache"]
    replay(messy_log, config_file, cache, "mtl", limit=300)  # a second entry, smaller
    assert len(entries(cache)) == 2
    (entry_b,) = [p for p in cache.iterdir() if p != entry_a]
    size_b = entry_b.stat().st_size
    assert size / 2 < size_b < size
    os.utime(entry_a, (time.time() - 60, time.time() - 60))
    hit, _ = replay(messy_log, config_file, cache, "mtl", limit=400, cache_limit=3 * size)  # a hit: the newest now
    assert hit.intake == "cache" and entry_a.stat().st_mtime > time.time() - 30
    # a third entry, between the two in size: the three do not fit (> size + 2 size_b), the hit and it do (< 2 size)
    third, _ = replay(messy_log, config_file, cache, "mtl", limit=350, cache_limit=int(1.5 * size + size_b))
    info = third.processes["replay_cache"]
    assert info["evicted"] == {"files": 1, "bytes": size_b} and "error" not in info  # the least recently used
    assert entry_a.is_file() and not entry_b.exists() and Path(info["file"]).is_file() and len(entries(cache)) == 2
    _, inline = replay(messy_log, config_file, None, "mtl", intake_mode="inline")
    kept = entries(cache)
    big, read = replay(messy_log, config_file, cache, "mtl", cache_limit=int(2.5 * size))  # the whole log: larger
    assert big.processes["replay_cache"]["bytes"] > 2.5 * size  # than the limit by itself
    assert read == inline and "not kept" in big.processes["replay_cache"]["error"]
    assert "evicted" not in big.processes["replay_cache"] and entries(cache) == kept  # the others stay


def test_the_cli_takes_a_limit_and_says_what_it_removed(messy_log: Path, config_file: Path,  # noqa: F811
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.unit.consumers.tools.test_backtest_batching import cli

    cache = tmp_path / "cache"
    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--no-plots",
              "--batching", "dense", "--replay-cache", str(cache), *[a for o in WINDOWS for a in ("--set", o)])
    with pytest.raises(SystemExit) as exit_:
        cli(*common, "--out", str(tmp_path / "x"), "--replay-cache-limit", "lots")
    assert exit_.value.code == 2 and "'lots' is not a number of bytes" in capsys.readouterr().err
    assert cli(*common, "--out", str(tmp_path / "a"), "--limit", "300", "--quiet") == 0
    (first,) = cache.iterdir()
    os.utime(first, (time.time() - 60, time.time() - 60))
    limit = str(int(first.stat().st_size * 1.5))  # room for one entry of about this size, not two
    capsys.readouterr()
    assert cli(*common, "--out", str(tmp_path / "b"), "--limit", "310", "--replay-cache-limit", limit) == 0
    err = capsys.readouterr().err
    assert "replay cache: removed 1 least recently used file(s)" in err and "--replay-cache-limit" in err
    assert not first.exists() and len(entries(cache)) == 1
    timing = json.loads((tmp_path / "b" / "timing.json").read_text())
    assert timing["replay_cache"]["evicted"]["files"] == 1 and timing["replay_cache"]["limit_bytes"] == int(limit)


def test_the_hint_says_how_long_the_training_waited_for_the_intake_when_that_counted() -> None:
    from types import SimpleNamespace

    def hint(wait_s: float, seconds: float = 20.0) -> str | None:
        result = SimpleNamespace(intake="process", seconds=seconds,
                                 processes={"intake_cpu_s": 12.0, "intake_wait_s": wait_s})
        return backtest.replay_cache_hint(result, None)

    assert "spent 12.0 CPU seconds" in hint(3.0) and "waited 3.0 s of the 20.0 s replay" in hint(3.0)
    assert "waited" not in hint(0.4) and "waited" not in hint(0.9)  # under 0.5 s, or 5% of the replay: not said
    assert "waited 0.6 s" in hint(0.6, seconds=10.0)
    assert backtest.replay_cache_hint(SimpleNamespace(intake="cache", seconds=1.0, processes={}), None) is None


def test_the_cli_hints_at_the_cache_after_a_replay_that_could_have_used_one(
        messy_log: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from tests.unit.consumers.tools.test_backtest_batching import cli

    common = ("--log", f"file://{messy_log}", "--config", str(config_file), "--configs", "mtl", "--no-plots",
              "--batching", "dense", *[a for o in WINDOWS for a in ("--set", o)])
    assert cli(*common, "--out", str(tmp_path / "cold")) == 0
    err = capsys.readouterr().err
    assert "hint: the intake process spent" in err and "--replay-cache DIR" in err
    for extra in (("--replay-cache", str(tmp_path / "cache")), ("--intake", "inline"), ("--quiet",)):
        assert cli(*common, *extra, "--out", str(tmp_path / "x")) == 0
        assert "hint:" not in capsys.readouterr().err

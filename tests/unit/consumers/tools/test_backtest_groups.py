"""Configurations with the same join and batching settings are replayed as one group (one join, one batcher, one
encoding of each batch), and each gets exactly the numbers it gets when replayed alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.tools import backtest
from tests.unit.consumers.tools.test_backtest_batching import SMALL_BATCHES, predictions_digest

pytestmark = pytest.mark.unit


def replay(drift_log: Path, configs: dict, batching: str) -> backtest.BacktestResult:
    records, _ = backtest.log_records(f"file://{drift_log}")
    return backtest.run_backtest(records, configs, batching=batching, sample_every=250)


def alike(run_: backtest.ConfigRun) -> dict:
    """What a replay records of one configuration, and what its summary is made of."""
    pipeline = run_.pipeline
    return {"predictions": predictions_digest(run_), "series": run_.series, "detections": run_.detections,
            "batches": run_.batch_sizes, "steps": pipeline.learner.steps, "join": dict(pipeline.join.counters),
            "watermark": pipeline.join.watermark_ms, "dead_letters": pipeline.dead_letters,
            "samples": pipeline.trained_samples, "ranking": run_.ranking_metrics()}


@pytest.mark.slow
@pytest.mark.parametrize("batching", ["dense", "event-time"])
def test_a_group_gives_each_configuration_its_numbers_replayed_alone(drift_log: Path, config_file: Path,
                                                                     batching: str) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", list(SMALL_BATCHES))
    together = replay(drift_log, configs, batching)
    assert together.runs["crossdistil"].leader == "mtl" and together.runs["mtl"].leader is None
    for name, cfg in configs.items():
        alone = replay(drift_log, {name: cfg}, batching).runs[name]
        assert alike(together.runs[name]) == alike(alone), name


def test_configurations_that_cut_other_batches_are_not_grouped(drift_log: Path, config_file: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl", [])
    configs["small"] = backtest.build_configs([str(config_file)], "mtl", ["batching.batch_size=64"])["mtl"]
    result = replay(drift_log, configs, "dense")
    assert result.runs["small"].leader is None and result.runs["mtl"].leader is None
    assert set(result.runs["small"].batch_sizes[:-1]) == {64} and set(result.runs["mtl"].batch_sizes[:-1]) == {128}
    alone = replay(drift_log, {"small": configs["small"]}, "dense").runs["small"]
    assert alike(result.runs["small"]) == alike(alone)


def test_stream_keys_differ_with_the_windows_the_batch_size_and_the_delay_in_event_time() -> None:
    from consumers.runtime.config import load_config

    base = load_config(None, env={})
    key = backtest.stream_key(base, "event-time")
    for override in ("join.default_window_s=5", "batching.batch_size=7", "batching.max_batch_delay_s=0.5",
                     "join.allowed_lateness_s=3"):
        assert backtest.stream_key(load_config(None, env={}, overrides=[override]), "event-time") != key, override
    delayed = load_config(None, env={}, overrides=["batching.max_batch_delay_s=0.5"])
    assert backtest.stream_key(delayed, "dense") == backtest.stream_key(base, "dense")  # dense: no delay

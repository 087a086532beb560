"""Fixtures shared by the backtest tests: the synthetic drift stream and the base configuration."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def drift_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic stream with an abrupt drift of click at impression 1,500 (the golden outputs of
    test_backtest_batching.py were made on it)."""
    from streamer.stream import stream_dataset

    path = tmp_path_factory.mktemp("log") / "synthetic.evlog"
    stream_dataset("synthetic", None, f"file://{path}", options={
        "n_events": 3000, "tasks": "click,like", "drift": "abrupt", "drift_at": 1500, "drift_bias": -2.0,
        "n_users": 100, "n_items": 300, "seed": 3, "delay_median_s": "2,20", "max_delay_s": 100})
    return path


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_backtest.CONFIG as a file: batch_size 128, the default model (with its wide part)."""
    from tests.unit.consumers.tools.test_backtest import CONFIG

    path = tmp_path_factory.mktemp("cfg") / "base.toml"
    path.write_text(CONFIG)
    return path

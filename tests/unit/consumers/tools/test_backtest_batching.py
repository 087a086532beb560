"""``crossdistil backtest --batching event-time|dense``: the two modes, the batch statistics and the warning."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from consumers.tools import backtest

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "data" / "backtest_event_time"
# what the summary gained with the modes, the trust gate, the dead letters described, and what was replayed and the
# paired comparison of the configurations
NEW_KEYS = ("batching", "warnings", "kd_gate", "dead_letters_by_reason", "dead_letter_examples",
            "replayed", "comparison")
GOLDEN_PINS = {"wide": "none", "embedding_optimizer": "adam", "embedding_lr": 0.01,  # the model options of then
               "count_features": []}
# The stream has an impression every 10 ms: with 1 s windows samples leave the join as it goes (CONFIG's windows
# outlast the 30 s stream), and a 0.1 s delay on event time then cuts batches of about 10.
SMALL_BATCHES = ("join.attribution_window_s={click = 1, like = 1}", "batching.max_batch_delay_s=0.1")


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.unit.consumers.tools.test_backtest import CONFIG

    path = tmp_path_factory.mktemp("cfg") / "base.toml"
    # batch_size 128, max_batch_delay_s 30; the golden outputs were made by the deep model alone, with SparseAdam
    # embeddings at 0.01 (the defaults before the wide part and the per-row AdaGrad table)
    pins = "".join(f"{k} = {json.dumps(v)}\n" for k, v in GOLDEN_PINS.items())
    path.write_text(CONFIG.replace("[model.options]\n", "[model.options]\n" + pins))
    return path


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def without_new_keys(summary: dict) -> dict:
    """The summary without what the batching modes added, and without ``config_hash``: a hash of the model's
    configuration, not a result (it changed when it stopped covering the whole trainer configuration), nor the
    ``wide`` model option (added to keep the model the golden outputs were made with)."""
    out = {k: v for k, v in summary.items() if k not in NEW_KEYS}
    # the log's path differs; the topics a trainer reads were named later
    out["input"] = {k: v for k, v in summary["input"].items() if k not in ("log", "topics")}
    out["configurations"] = {name: {k: v for k, v in c.items() if k not in NEW_KEYS and k != "config_hash"}
                             for name, c in summary["configurations"].items()}
    for c in out["configurations"].values():  # config_file's pins keep the model the golden one had
        c["model_options"] = {k: v for k, v in c.get("model_options", {}).items() if k not in GOLDEN_PINS}
    return out


def predictions_digest(run_: backtest.ConfigRun, predictions: bool = True) -> str:
    """sha256 of a configuration's trained impression ids and each task's labels and (``predictions``) predictions;
    without the predictions it does not depend on the machine's float kernels."""
    digest = hashlib.sha256("\n".join(run_.impression_ids).encode())
    for task in run_.pipeline.tasks:
        labels, scores = run_.arrays(task)
        digest.update(labels.tobytes())
        if predictions:
            digest.update(scores.tobytes())
    return digest.hexdigest()


def replay(drift_log: Path, config_file: Path, batching: str, overrides: tuple[str, ...] = (),
           rungs: str = "mtl") -> backtest.BacktestResult:
    configs = backtest.build_configs([str(config_file)], rungs, list(overrides))
    records, _ = backtest.log_records(f"file://{drift_log}")
    return backtest.run_backtest(records, configs, batching=batching, sample_every=250)


# The golden outputs were made on one machine; torch's CPU kernels (MKL's, ATen's vectorised ones) differ in their
# last bits between instruction sets (AVX2, AVX-512), so on another machine a prediction differs in its last bits
# (within 1e-6 relative after the whole replay, with ATen's AVX-512, AVX2 and scalar kernels alike), and a metric
# made of many (log loss, NDCG) or of an order (an AUC over a few samples, where two near-equal predictions may swap:
# 6e-5 once with the scalar kernels; an AUC drift, a difference of two) a little more. Where the outputs are not
# the golden ones byte for byte, every value that is not a float must be equal, every prediction within REL_TOL and
# every metric within METRIC_TOL (absolute); on the machine that made them they are equal byte for byte.
REL_TOL = 1e-6
METRIC_TOL = 1e-4


def assert_close(got: object, want: object, where: str = "") -> None:
    """``got == want``, floats to ``METRIC_TOL`` (and numbers written as text, e.g. CSV cells)."""
    if isinstance(want, dict) and isinstance(got, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            assert_close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list) and isinstance(got, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert math.isclose(got, want, rel_tol=REL_TOL, abs_tol=METRIC_TOL), (where, got, want)
    elif isinstance(want, str) and isinstance(got, str) and got != want and _is_float_text(want):
        assert _is_float_text(got) and math.isclose(float(got), float(want), rel_tol=REL_TOL, abs_tol=METRIC_TOL), (
            where, got, want)
    else:
        assert got == want, (where, got, want)


def _is_float_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return "." in text or "e" in text


def test_event_time_is_the_default_and_gives_the_outputs_of_the_code_before_the_modes(
        drift_log: Path, config_file: Path, tmp_path: Path) -> None:
    common = ("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
              "--sample-every", "250", "--quiet", "--no-plots")
    assert cli(*common, "--out", str(tmp_path / "default")) == 0
    assert cli(*common, "--out", str(tmp_path / "event-time"), "--batching", "event-time") == 0
    golden = json.loads((GOLDEN / "summary.json").read_text())
    for out in ("default", "event-time"):
        for name in ("series_mtl.csv", "series_crossdistil.csv"):
            got, want = (tmp_path / out / name).read_text(), (GOLDEN / name).read_text()
            if got != want:  # another machine's last bits: the same table, floats to METRIC_TOL
                assert_close(list(csv.reader(io.StringIO(got))), list(csv.reader(io.StringIO(want))), f"{out}/{name}")
        summary = json.loads((tmp_path / out / "summary.json").read_text())
        assert summary["batching"] == "event-time"
        assert_close(without_new_keys(summary), without_new_keys(golden), out)
    for name in ("series_mtl.csv", "series_crossdistil.csv"):  # the default is event time, byte for byte
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "event-time" / name).read_bytes(), name


def test_event_time_predictions_are_those_of_the_code_before_the_modes(drift_log: Path, config_file: Path) -> None:
    """The same samples in the same order with the same labels, and the same predictions: byte for byte on the
    machine that made the golden digest, elsewhere each within ``REL_TOL`` (relative) of those
    ``predictions.npz`` holds (made by the same code on an AVX-512 machine; within 1e-6 of each other on every
    machine the test has run on)."""
    result = replay(drift_log, config_file, "event-time", rungs="mtl,crossdistil")
    golden = json.loads((GOLDEN / "predictions_sha256.json").read_text())
    digests = {name: predictions_digest(run_) for name, run_ in result.runs.items()}
    assert digests.keys() == golden.keys()
    if digests == golden:
        return
    samples = json.loads((GOLDEN / "samples_sha256.json").read_text())
    with np.load(GOLDEN / "predictions.npz", allow_pickle=False) as stored:
        for name, run_ in result.runs.items():
            assert predictions_digest(run_, predictions=False) == samples[name], name
            for task in run_.pipeline.tasks:
                _, predictions = run_.arrays(task)
                np.testing.assert_allclose(predictions, stored[f"{name}.{task}"], rtol=REL_TOL, atol=1e-9)


def test_dense_batches_are_cut_by_batch_size_only(drift_log: Path, config_file: Path) -> None:
    result = replay(drift_log, config_file, "dense", SMALL_BATCHES)
    sizes = result.runs["mtl"].batch_sizes
    assert sum(sizes) == 3000 and set(sizes[:-1]) == {128} and 0 < sizes[-1] <= 128
    assert result.runs["mtl"].pipeline.learner.steps == len(sizes) == 24


def test_dense_keeps_the_join_on_event_time(drift_log: Path, config_file: Path) -> None:
    # Same events, same windows: the same samples with the same labels, whatever cuts the batches.
    dense = replay(drift_log, config_file, "dense", SMALL_BATCHES).runs["mtl"]
    event = replay(drift_log, config_file, "event-time", SMALL_BATCHES).runs["mtl"]
    assert len(event.batch_sizes) > 4 * len(dense.batch_sizes)
    assert dense.impression_ids == event.impression_ids
    assert dense.pipeline.join.counters == event.pipeline.join.counters
    for task in ("click", "like"):
        assert (dense.arrays(task)[0] == event.arrays(task)[0]).all()


def test_batch_statistics_are_mean_median_and_p90_by_nearest_rank() -> None:
    assert backtest.batch_statistics([4, 1, 3, 2]) == {"batches": 4, "mean": 2.5, "p50": 2, "p90": 4}
    assert backtest.batch_statistics([256] * 9 + [10]) == {"batches": 10, "mean": 231.4, "p50": 256, "p90": 256}
    assert backtest.batch_statistics([]) == {"batches": 0, "mean": None, "p50": None, "p90": None}


def test_small_batches_warn_and_name_the_option_that_changes_them(drift_log: Path, config_file: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl",
               *[a for o in SMALL_BATCHES for a in ("--set", o)], "--out", str(tmp_path), "--quiet", "--no-plots") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    batching = summary["configurations"]["mtl"]["batching"]
    assert batching["mode"] == "event-time" and batching["max_batch_delay_s"] == 0.1
    assert batching["mean"] < 0.25 * 128 and batching["batches"] == summary["configurations"]["mtl"]["steps"]
    # first; then what the 1 s windows did to the feedback (stream_warnings)
    assert summary["warnings"][0] == batching["warning"]
    assert "--batching dense" in batching["warning"] and "batching.max_batch_delay_s" in batching["warning"]
    assert "--batching dense" in capsys.readouterr().err
    report = (tmp_path / "report.md").read_text()
    assert "> **Warning**: mtl: the mean batch is" in report


def test_full_batches_do_not_warn(drift_log: Path, config_file: Path, tmp_path: Path) -> None:
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl", "--batching",
               "dense", *[a for o in SMALL_BATCHES for a in ("--set", o)], "--out", str(tmp_path), "--quiet",
               "--no-plots") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["configurations"]["mtl"]["batching"]["warning"] is None
    assert not [w for w in summary["warnings"] if "mean batch" in w]  # only the 1 s windows' dropped feedback
    assert "the mean batch is" not in (tmp_path / "report.md").read_text()


def test_report_header_names_the_mode_and_the_batch_sizes(drift_log: Path, config_file: Path,
                                                         tmp_path: Path) -> None:
    for mode in backtest.BATCHING_MODES:
        out = tmp_path / mode
        assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl",
                   "--batching", mode, "--out", str(out), "--quiet", "--no-plots") == 0
        report = (out / "report.md").read_text()
        header = report.split("| configuration | task |")[0]
        assert f"Batching: **{mode}**" in header
        assert "| configuration | batch_size | max_batch_delay_s | steps | mean batch | p50 | p90 |" in header
        delay = "not used" if mode == "dense" else "30 s (event time)"
        assert f"| mtl | 128 | {delay} |" in header


def test_dense_is_refused_for_a_live_pipeline() -> None:
    import time

    from consumers.runtime.assembly import build_pipeline
    from consumers.runtime.config import load_config

    with pytest.raises(ValueError, match="replays"):
        build_pipeline(load_config(None, env={}), clock=time.monotonic, dense=True)


def test_dense_trains_the_same_batches_however_often_it_collects(drift_log: Path, config_file: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # Dense replays call train_ready every DENSE_TRAIN_EVERY records, not after each: the join closes windows as
    # records arrive and only batch_size cuts, so the batches, predictions and series are those of every record.
    every = replay(drift_log, config_file, "dense", SMALL_BATCHES, rungs="mtl,crossdistil")
    monkeypatch.setattr(backtest, "DENSE_TRAIN_EVERY", 1)
    each = replay(drift_log, config_file, "dense", SMALL_BATCHES, rungs="mtl,crossdistil")
    for name in ("mtl", "crossdistil"):
        assert every.runs[name].batch_sizes == each.runs[name].batch_sizes
        assert predictions_digest(every.runs[name]) == predictions_digest(each.runs[name])
        assert every.runs[name].series == each.runs[name].series
        assert every.runs[name].detections == each.runs[name].detections
        assert every.runs[name].pipeline.join.counters == each.runs[name].pipeline.join.counters

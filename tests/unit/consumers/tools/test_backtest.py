"""``crossdistil backtest`` on event logs: outputs, side-by-side configurations, bit-for-bit reproducibility."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from consumers.runtime.timeparse import parse_time
from consumers.tools import backtest
from streamer.eventlog import EventLogWriter, read_event_log

pytestmark = pytest.mark.unit

CONFIG = """
[join]
attribution_window_s = {click = 60, like = 120}

[batching]
batch_size = 128
max_batch_delay_s = 30.0

[model]
tasks = ["click", "like"]
device = "cpu"

[model.options]
embedding_dim = 4
hidden_dims = [16]
tower_dims = [8]
features = {categorical = ['user_id', 'item_id', 'item_category'], numeric = ['duration_s'], hash_buckets = 4096}

[metrics]
port = 0
windows = [500, 1000]
"""


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def test_two_runs_are_identical_bit_for_bit(drift_log: Path, config_file: Path, tmp_path: Path) -> None:
    for out in ("a", "b"):
        assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
                   "--out", str(tmp_path / out), "--sample-every", "250", "--quiet", "--no-plots") == 0
    for name in ("summary.json", "series_mtl.csv", "series_crossdistil.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert "seconds" not in (tmp_path / "a" / "summary.json").read_text()  # timing lives in timing.json


def test_output_folder_holds_summary_series_plots_and_report(drift_log: Path, config_file: Path,
                                                             tmp_path: Path) -> None:
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl,crossdistil",
               "--out", str(tmp_path), "--sample-every", "500", "--quiet") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["configurations"]) == {"mtl", "crossdistil"}
    for c in summary["configurations"].values():
        assert c["trained_samples"] == 3000 and c["dead_letters"] == 0
        assert 0.0 <= c["prequential_auc"]["click"] <= 1.0
    header = (tmp_path / "series_mtl.csv").read_text().splitlines()[0].split(",")
    assert {"samples", "event_time_ms", "task", "auc@500", "auc_drift@500/baseline", "log_loss@500"} <= set(header)
    for task in ("click", "like"):
        assert (tmp_path / f"auc_{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "| mtl | click |" in report and "![auc_click.png](auc_click.png)" in report


def test_configurations_see_the_same_events(drift_log: Path, config_file: Path) -> None:
    # The paper's rung: its teachers push the shared backbone, so it predicts differently from the first step
    # (the default's teachers stand on a stopped backbone and its gate may stay closed on a short replay).
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil@paper", [])
    records, _ = backtest.log_records(f"file://{drift_log}", limit=2000)
    result = backtest.run_backtest(records, configs, sample_every=500)
    mtl, cd = result.runs["mtl"], result.runs["crossdistil@paper"]
    assert mtl.impression_ids == cd.impression_ids
    assert mtl.pipeline.join.counters == cd.pipeline.join.counters
    assert (mtl.arrays("click")[0] == cd.arrays("click")[0]).all()
    assert not (mtl.arrays("click")[1] == cd.arrays("click")[1]).all(), "different rungs must predict differently"
    # the users go to the per-user NDCG, not to the trainer's metrics: their GAUC, which a backtest never shows,
    # is not computed at all
    quality = mtl.pipeline.metrics.snapshot()["click"]["student"]
    assert quality["auc"]["lifetime"] is not None and set(quality["gauc"].values()) == {None}


def test_summary_and_report_state_ndcg_and_the_combined_score_over_all_and_the_tail(drift_log: Path,
                                                                                   config_file: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl", [])
    records, desc = backtest.log_records(f"file://{drift_log}", limit=1000)
    result = backtest.run_backtest(records, configs, sample_every=500)
    mtl = result.runs["mtl"]
    assert len(mtl.users()) == len(mtl.impression_ids) == mtl.pipeline.trained_samples
    config = backtest.summary(result, desc)["configurations"]["mtl"]
    for key in ("ranking", "ranking_last_20pct"):
        assert set(config[key]["ndcg10"]) == {"click", "like"}
        assert 0.0 < config[key]["ndcg10"]["click"] <= 1.0 and 0.0 < config[key]["combined"]["ndcg10"] <= 1.0
    # No impression of the last 20% has both tasks positive here, so only the whole replay has a combined AUC.
    assert 0.0 <= config["ranking"]["combined"]["auc"] <= 1.0
    assert config["ranking_last_20pct"]["combined"]["auc"] is None
    report = backtest.render_report(backtest.summary(result, desc), {"seconds": 1.0, "records_per_s": 1}, [])
    assert "NDCG@10 (last 20%)" in report and "combined AUC (all)" in report


def test_times_parse_from_milliseconds_and_iso() -> None:
    assert parse_time("1700000000000") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20Z") == 1_700_000_000_000
    assert parse_time("2023-11-14T22:13:20") == 1_700_000_000_000
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_time_range_keeps_only_events_inside_it(drift_log: Path) -> None:
    from streamer.eventlog import read_event_log

    stamps = [r.event["ts_ms"] for r in read_event_log(drift_log)]
    lo, hi = stamps[len(stamps) // 4], stamps[len(stamps) // 2]
    records, _ = backtest.log_records(f"file://{drift_log}", from_ms=lo, to_ms=hi)
    kept = sum(1 for _ in records)
    assert kept == sum(1 for t in stamps if lo <= t < hi)


def test_missing_log_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("--log", f"file://{tmp_path}/nope.evlog", "--out", str(tmp_path / "o"), "--quiet") == 2
    assert "does not exist" in capsys.readouterr().err


def test_offsets_are_refused_for_an_event_log(drift_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli("--log", f"file://{drift_log}", "--from-offset", "5", "--out", str(tmp_path), "--quiet") == 2
    assert "--kafka" in capsys.readouterr().err


def test_an_empty_time_range_is_refused_before_reading(drift_log: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    assert cli("--log", f"file://{drift_log}", "--from-time", "1700000050000", "--to-time", "1700000050000",
               "--out", str(tmp_path / "o"), "--quiet") == 2
    assert "is not before --to-time" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_time_range_without_events_is_an_error_not_an_empty_report(drift_log: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from streamer.eventlog import read_event_log

    after_last = max(r.event["ts_ms"] for r in read_event_log(drift_log)) + 1
    assert cli("--log", f"file://{drift_log}", "--from-time", str(after_last), "--out", str(tmp_path / "o"),
               "--quiet") == 2
    assert "nothing to replay" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_summary_and_report_state_the_trust_gate_of_a_gated_configuration(drift_log: Path, config_file: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "mtl,crossdistil", [])
    records, desc = backtest.log_records(f"file://{drift_log}", limit=2000)
    result = backtest.run_backtest(records, configs, sample_every=500)
    data = backtest.summary(result, desc)
    assert "kd_gate" not in data["configurations"]["mtl"]  # no gate, nothing said
    gate = data["configurations"]["crossdistil"]["kd_gate"]
    assert set(gate) == {"click", "like"}
    steps = result.runs["crossdistil"].pipeline.learner.steps
    for task, g in gate.items():
        assert g["distilled_steps"] + g["skipped_steps"] == steps, task
    report = backtest.render_report(data, {"seconds": 1.0, "records_per_s": 1}, [])
    assert "Trust gate (distillation only while the teacher ranks better" in report
    assert f"| crossdistil | click | {gate['click']['distilled_steps']:,} of {steps:,} |" in report
    never = [t for t, g in gate.items() if not g["distilled_steps"]]
    assert ("The gate never opened for" in report) == bool(never)
    # a gate that never opened is named; one that opened is not
    closed = {**data, "configurations": {"crossdistil": {**data["configurations"]["crossdistil"], "kd_gate": {
        "click": {"open": 0.0, "teacher_auc": 0.61, "student_auc": 0.7, "distilled_steps": 0, "skipped_steps": 9}}}}}
    assert "The gate never opened for crossdistil/click" in backtest._gate_lines(closed)[-1]


def test_a_task_the_drift_detectors_do_not_watch_says_so_in_the_report(drift_log: Path, config_file: Path) -> None:
    configs = backtest.build_configs([str(config_file)], "", ['metrics.drift_tasks=["click"]'])
    records, desc = backtest.log_records(f"file://{drift_log}", limit=2000)
    data = backtest.summary(backtest.run_backtest(records, configs, sample_every=500), desc)
    (config,) = data["configurations"].values()
    assert config["final"]["like"]["detections"] is None and config["final"]["click"]["detections"] is not None
    report = backtest.render_report(data, {"seconds": 1.0, "records_per_s": 1}, [])
    like_row = next(line for line in report.splitlines() if "| like |" in line)
    click_row = next(line for line in report.splitlines() if "| click |" in line)
    assert like_row.endswith("| not watched |") and not click_row.endswith("| not watched |")


def test_a_counted_task_is_an_input_of_the_replay_not_a_prediction(drift_log: Path, config_file: Path) -> None:
    """model.options.counted_tasks: like's feedback is joined and counted (its rates are inputs of the model), but
    like is not predicted, measured or reported; in a learner process too (the answers' width)."""
    records, desc = backtest.log_records(f"file://{drift_log}", limit=2000)
    counted = ['model.options.aux_tasks=["like"]', 'model.options.counted_tasks=["like"]']
    runs, pipelines = {}, {}
    for name, overrides in {"counted": counted, "process": counted + ["model.separate_process=true"],
                            "alone": ['model.tasks=["click"]']}.items():
        configs = backtest.build_configs([str(config_file)], "", overrides)
        result = backtest.run_backtest(records, configs, sample_every=500)
        runs[name], (pipelines[name],) = backtest.summary(result, desc), [r.pipeline for r in result.runs.values()]
    # like's positives are exported (no quality metric shows a counted task), as many as the model counted
    pipeline = pipelines["counted"]
    positives = pipeline.metrics.registry.get_sample_value("crossdistil_counted_positives_total", {"task": "like"})
    assert positives > 0 and positives == pipeline.learner.port.learner.model.counts.totals[2].item()
    for name in ("counted", "process"):
        (config,) = runs[name]["configurations"].values()
        assert config["tasks"] == ["click"] and config["counted_tasks"] == ["like"], name
        assert set(config["prequential_auc"]) == {"click"} and set(config["final"]) == {"click"}
    (counted_run,), (alone,) = runs["counted"]["configurations"].values(), runs["alone"]["configurations"].values()
    assert counted_run["trained_samples"] == alone["trained_samples"]
    assert counted_run["prequential_auc"]["click"] != alone["prequential_auc"]["click"]  # like's rates were read
    report = backtest.render_report(runs["counted"], {"seconds": 1.0, "records_per_s": 1}, [])
    assert "| like" not in report and "Counted, not predicted" in report and ": like." in report
    assert "Counted, not predicted" not in backtest.render_report(runs["alone"], {"seconds": 1.0,
                                                                                 "records_per_s": 1}, [])


@pytest.mark.parametrize("intake", ["inline", "process"])
def test_what_a_log_did_to_the_replay_is_said_on_stderr_in_the_summary_and_the_report(
        drift_log: Path, config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture, intake: str) -> None:
    """Dead letters by reason with the first ones described, records on a topic no trainer reads, and a log out of
    event-time order (most impressions late, most feedback orphaned) are warnings, not silently worse figures."""
    records = list(read_event_log(drift_log))[:1_200]
    bad = {"v": 1, "impression_id": "bad-1", "ts_ms": 1_700_000_000_000_000, "user_id": "u", "item_id": "a",
           "features": {}}  # microseconds
    path = tmp_path / "reversed.evlog"
    with EventLogWriter(path) as log:
        log.write("impressions", "u", bad)
        log.write("impresions", "u", {**bad, "impression_id": "stray", "ts_ms": 1})
        for record in reversed(records):
            log.write(record.topic, record.key, record.event)
    out = tmp_path / "out"
    assert cli("--log", f"file://{path}", "--config", str(config_file), "--configs", "mtl", "--batching", "dense",
               "--intake", intake, "--set", "join.attribution_window_s={click = 1, like = 1}",  # within the 12 s
               "--out", str(out), "--quiet", "--no-plots") == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    mtl = summary["configurations"]["mtl"]
    assert mtl["dead_letters_by_reason"] == {"out_of_range": 1, "unknown_topic": 1} and mtl["dead_letters"] == 2
    first, second = summary["dead_letter_examples"]
    assert first.startswith("record 0 (impressions): impression.ts_ms") and "microseconds" in first
    assert first.endswith("(out_of_range, impression_id 'bad-1')")
    assert second.startswith("record 1 (impresions): record on topic 'impresions'") and "unknown_topic" in second
    assert "2 events were dead-lettered (out_of_range 1, unknown_topic 1)" in err and "dead letter: " in err
    late = [w for w in summary["warnings"] if "arrived after the event-time watermark" in w]
    orphans = [w for w in summary["warnings"] if "matched no impression" in w]
    assert len(late) == 1 and len(orphans) == 1 and mtl["join"]["late_impressions"] > 0.5 * mtl["join"]["impressions"]
    assert late[0] in err and orphans[0] in err
    report = (out / "report.md").read_text()
    assert "| late impressions |" in report and "2 (out_of_range 1, unknown_topic 1)" in report
    assert f"> **Warning**: {late[0]}." in report


def test_a_log_in_event_time_order_gives_no_stream_warning(drift_log: Path, config_file: Path, tmp_path: Path) -> None:
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl", "--batching", "dense",
               "--out", str(tmp_path), "--quiet", "--no-plots") == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["warnings"] == [] and summary["dead_letter_examples"] == []
    assert summary["configurations"]["mtl"]["dead_letters_by_reason"] == {}


def test_a_task_with_no_positive_label_in_the_whole_replay_is_a_warning(drift_log: Path, config_file: Path,
                                                                          tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """A task named otherwise than in the log's feedback trains on labels that are all 0: said, not just 'n/a'."""
    assert cli("--log", f"file://{drift_log}", "--config", str(config_file), "--configs", "mtl", "--set",
               'model.tasks=["clik", "like"]', "--set", "join.attribution_window_s={clik = 60, like = 120}",
               "--out", str(tmp_path), "--quiet", "--no-plots") == 0
    [warning] = [w for w in json.loads((tmp_path / "summary.json").read_text())["warnings"] if "positive" in w]
    assert warning.startswith("mtl: no positive label in 3,000 samples for 'clik':")
    # the log's name for it, with its count, from the join
    assert warning.endswith("(1,102 feedback events were for tasks it does not learn: 'click' 1,102 (did you mean "
                            "'clik'?))")
    assert warning in capsys.readouterr().err


def test_an_output_folder_that_cannot_be_made_is_refused_before_the_replay(drift_log: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert cli("--log", f"file://{drift_log}", "--configs", "mtl", "--out", str(out), "--quiet", "--no-plots") == 2
        assert f"--out {out}: {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err


def test_the_code_version_counts_modified_tracked_files_outside_the_runs_own_folder(tmp_path: Path) -> None:
    import subprocess

    from consumers.tools.backtest import code_version

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "report").mkdir()
    for name in ("code.py", "other.py", "report/summary.json", "report/timing.json"):
        (tmp_path / name).write_text("1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    assert code_version(tmp_path / "report", root=tmp_path)["modified_files"] == 0
    for name in ("code.py", "report/summary.json", "report/timing.json"):
        (tmp_path / name).write_text("2\n")
    git("mv", "other.py", "renamed.py")  # a rename is one entry of two paths
    (tmp_path / "untracked.py").write_text("3\n")  # not counted: untracked
    version = code_version(tmp_path / "report", root=tmp_path)
    assert len(version["commit"]) == 40 and version["modified_files"] == 2  # code.py and the rename
    assert code_version(root=tmp_path)["modified_files"] == 4

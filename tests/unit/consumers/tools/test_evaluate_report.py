"""``crossdistil evaluate``: NDCG@10 and the combined score in the report, --combined-weights, --validation rows."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from consumers.tools import evaluate

pytestmark = pytest.mark.unit

TASKS = ("finish", "like")


def _run(config: str, seed: int, auc: float, ndcg: float | None = None, combined: dict | None = None) -> dict:
    """A results.json run; without ``ndcg`` and ``combined`` it looks like results written before they existed."""
    metrics = {t: {"auc": auc, "gauc": auc, "multi_auc": None, "log_loss": 0.5, "calibration": 1.0, "n": 10,
                   "positive_rate": 0.5} for t in TASKS}
    if ndcg is not None:
        for m in metrics.values():
            m["ndcg10"] = ndcg
    run = {"tasks": list(TASKS), "config": config, "backbone": "mmoe", "seed": seed, "mode": "split",
           "metrics": {"test": metrics}, "curve": [], "losses": {}, "train_events": 8, "test_events": 2,
           "seconds": 0.1}
    if combined is not None:
        run["combined"] = {"test": {**combined, "weights": [1.0, 1.0]}}
    return run


def _row(report: str, start: str) -> list[str]:
    """The cells of the first table row of ``report`` that starts with ``start``."""
    line = next(line for line in report.splitlines() if line.startswith(start))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_the_task_table_has_an_ndcg_column() -> None:
    doc = {"dataset": "x", "runs": [_run("mtl", 0, 0.70, ndcg=0.60), _run("mtl", 1, 0.72, ndcg=0.62)]}
    report = evaluate.render_report(doc)
    assert "| backbone | config | AUC | GAUC | Multi-AUC | NDCG@10 | LogLoss | Calib |" in report
    assert _row(report, "| mmoe | mtl |")[5] == "0.6100 ± 0.0141"


def test_the_paired_table_has_ndcg_and_combined_differences_with_the_bold_rule() -> None:
    runs = [_run("mtl", s, 0.70, ndcg=0.60, combined={"auc": 0.65, "ndcg10": 0.5}) for s in (0, 1, 2)]
    runs += [_run("crossdistil", 0, 0.71, ndcg=0.61, combined={"auc": 0.66, "ndcg10": 0.51}),
             _run("crossdistil", 1, 0.71, ndcg=0.62, combined={"auc": 0.67, "ndcg10": 0.49}),
             _run("crossdistil", 2, 0.71, ndcg=0.63, combined={"auc": 0.68, "ndcg10": 0.50})]
    report = evaluate.render_report({"dataset": "x", "runs": runs})
    assert ("| backbone | config | ΔAUC finish | ΔAUC like | ΔMulti-AUC finish | ΔMulti-AUC like "
            "| ΔNDCG@10 finish | ΔNDCG@10 like | Δ combined AUC | Δ combined NDCG@10 |") in report
    cells = _row(report, "| mmoe | crossdistil | +")  # the paired row (the task tables' rows start with 0.)
    assert cells[6] == "+0.0200 ± 0.0100"  # NDCG: +0.01, +0.02, +0.03: t = 3.46 < 4.30, 3 seeds' t quantile
    assert cells[8] == "+0.0200 ± 0.0100"  # combined AUC, the same differences
    assert cells[9] == "+0.0000 ± 0.0100"  # combined NDCG: +0.01, -0.01, 0: not bold
    assert "t = 4.30 for 3 seeds" in report


@pytest.mark.parametrize(("differences", "bold"), [
    ((0.011, 0.009, 0.012, 0.008, 0.010), True),  # t = 12.6
    ((0.004, 0.001, 0.003, 0.000, 0.002), True),  # t = 2.83, just above 5 seeds' 2.78
    ((0.004, 0.001, 0.003, -0.001, 0.003), False),  # t = 2.24: past the normal's 1.96 and 2, short of 2.78
    ((0.02, -0.01, 0.01, 0.0, -0.02), False),
])
def test_a_paired_difference_is_bold_only_where_a_t_test_rejects_no_difference(differences: tuple, bold: bool) -> None:
    runs = [_run("mtl", s, 0.70) for s in range(5)] + [_run("kd", s, 0.70 + d) for s, d in enumerate(differences)]
    report = evaluate.render_report({"dataset": "x", "runs": runs})
    cell = [line for line in report.splitlines() if line.startswith("| mmoe | kd | ")][-1].split("|")[3].strip()
    assert cell.startswith("**") is bold, cell


def test_a_dagger_marks_the_differences_that_hold_after_holms_adjustment_over_the_table() -> None:
    strong, weak = (0.011, 0.009, 0.012, 0.008, 0.010), (0.004, 0.001, 0.003, 0.000, 0.002)  # t = 12.6 and 2.83
    runs = [_run("mtl", s, 0.70) for s in range(5)] + [_run("kd", s, 0.70 + d) for s, d in enumerate(strong)]
    runs += [_run("aux", s, 0.70 + d) for s, d in enumerate(weak)]
    report = evaluate.render_report({"dataset": "x", "runs": runs})
    table = report.split("Paired differences")[1].split("\n\n")[1]  # the first paired table
    paired = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[3:5]]
              for line in table.splitlines() if line.startswith("| mmoe | ")}
    # four tested cells: kd's p ~ 0.0002 (x 4 and x 3: still < 0.05), aux's 0.047 (x 2 = 0.094: not)
    assert paired["kd"] == ["**+0.0100 ± 0.0016**†"] * 2, paired
    assert paired["aux"] == ["**+0.0020 ± 0.0016**"] * 2, paired
    assert "† where it still does after Holm's adjustment" in report


def test_t_critical_is_students_quantile() -> None:
    assert evaluate.t_critical(5) == pytest.approx(2.7764, abs=1e-4)
    assert evaluate.t_critical(10, level=0.99) == pytest.approx(3.2498, abs=1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.t_critical(1)


def test_the_report_shows_the_combined_score_per_configuration() -> None:
    runs = [_run("mtl", 0, 0.7, ndcg=0.6, combined={"auc": 0.64, "ndcg10": 0.5}),
            _run("mtl", 1, 0.7, ndcg=0.6, combined={"auc": 0.66, "ndcg10": 0.5})]
    report = evaluate.render_report({"dataset": "x", "runs": runs})
    assert "### Combined score p_finish^1 · p_like^1" in report
    assert "| mmoe | mtl | 0.6500 ± 0.0141 | 0.5000 ± 0.0000 |" in report


def test_old_results_without_ndcg_or_combined_render_dashes() -> None:
    doc = {"dataset": "x", "runs": [_run("mtl", 0, 0.70), _run("crossdistil", 0, 0.72)]}
    report = evaluate.render_report(doc)
    assert _row(report, "| mmoe | mtl |")[5] == "–"
    assert "### Combined score" not in report
    cells = _row(report, "| mmoe | crossdistil | +")
    assert cells[2] == "+0.0200 ± 0.0000" and cells[6:] == ["–"] * 4


def test_combined_weights_flag_parses_numbers_and_defaults_to_none() -> None:
    assert evaluate.parse_weights("1,0.5") == [1.0, 0.5]
    assert evaluate.parse_weights("") is None
    with pytest.raises(ValueError, match="--combined-weights"):
        evaluate.parse_weights("1,heavy")
    with pytest.raises(ValueError, match="non-negative"):
        evaluate.parse_weights("1,-2")


def test_without_validation_every_event_is_used_with_the_given_fractions() -> None:
    rows = evaluate.evaluation_rows(1000, 0.8, 0.2, validation=False)
    assert (rows.limit, rows.train_fraction, rows.tail_fraction) == (1000, 0.8, 0.2)
    assert rows.ranges() == {"events": 1000, "used": [0, 1000], "split_train": [0, 800], "split_test": [800, 1000],
                             "prequential_tail": [800, 1000]}


def test_validation_uses_only_the_events_before_the_test_split_divided_90_10() -> None:
    rows = evaluate.evaluation_rows(1000, 0.8, 0.2, validation=True)
    assert rows.limit == 800 and rows.validation
    assert rows.ranges() == {"events": 1000, "used": [0, 800], "split_train": [0, 720], "split_test": [720, 800],
                             "prequential_tail": [720, 800]}
    # Uneven sizes round the same way as the evaluation loops: int() for the split, round() for the tail.
    odd = evaluate.evaluation_rows(1001, 0.7, 0.2, validation=True).ranges()
    assert odd["used"] == [0, 700] and odd["split_test"] == [630, 700] and odd["prequential_tail"] == [630, 700]


def test_validation_refuses_too_few_events() -> None:
    with pytest.raises(ValueError, match="too few"):
        evaluate.evaluation_rows(2, 0.8, 0.2, validation=True)


def test_the_report_header_says_when_results_come_from_the_validation_slice() -> None:
    ranges = evaluate.evaluation_rows(1000, 0.8, 0.2, validation=True).ranges()
    doc = {"dataset": "x", "protocol": {"train_fraction": 0.8, "validation": True, "validation_rows": ranges,
                                        "validation_test_fraction": 0.1},
           "runs": [_run("mtl", 0, 0.7)]}
    report = evaluate.render_report(doc)
    assert "Validation slice: rows 0..800 (end exclusive) of 1000; the test split was not used." in report
    assert "trains on rows 0..720 and tests on rows 720..800" in report
    assert "validation slice" not in evaluate.render_report({"dataset": "x", "runs": [_run("mtl", 0, 0.7)]}).lower()


def test_validation_run_records_its_rows_and_never_scores_the_test_split(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args([
        "--dataset", "synthetic", "--source", "-", "--option", "n_events=600", "--configs", "river_lr",
        "--seeds", "1", "--mode", "both", "--validation", "--combined-weights", "1,0.5", "--curve-points", "2",
        "--threads", "1", "--device", "cpu", "--out", str(tmp_path),
    ])
    assert evaluate.run(args) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    protocol = doc["protocol"]
    assert protocol["validation"] is True and protocol["combined_weights"] == [1.0, 0.5]
    assert protocol["validation_rows"] == {"events": 600, "used": [0, 480], "split_train": [0, 432],
                                           "split_test": [432, 480], "prequential_tail": [432, 480]}
    by_mode = {r["mode"]: r for r in doc["runs"]}
    task = by_mode["split"]["tasks"][0]
    assert by_mode["split"]["metrics"]["test"][task]["n"] == 48
    assert by_mode["prequential"]["metrics"]["all"][task]["n"] == 480
    assert by_mode["prequential"]["metrics"]["tail"][task]["n"] == 48
    assert by_mode["split"]["combined"]["test"]["weights"] == [1.0, 0.5]
    assert "the test split was not used" in (tmp_path / "report.md").read_text()
    # the tail as served (--publications, 4 by default): the same rows, a section and its legend in the report
    assert protocol["publications"] == 4 and "served" not in by_mode["split"]["metrics"]
    assert by_mode["prequential"]["metrics"]["served"][task]["n"] == 48
    assert "window `served`" in (tmp_path / "report.md").read_text()


def test_no_publications_no_served_window_and_a_negative_count_is_refused(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    common = ["--dataset", "synthetic", "--source", "-", "--option", "n_events=300", "--configs", "river_lr",
              "--seeds", "1", "--mode", "prequential", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert evaluate.run(parser.parse_args([*common, "--publications", "0"])) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "served" not in doc["runs"][0]["metrics"] and "served" not in doc["runs"][0]["combined"]
    assert "`served`" not in (tmp_path / "report.md").read_text()
    assert evaluate.run(parser.parse_args([*common, "--publications", "-1"])) == 2
    assert "--publications must be at least 0 (0: no `served` window), got -1" in capsys.readouterr().err


def test_the_cadence_serves_the_tail_at_each_publication_count_and_reports_it(tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    common = ["--dataset", "synthetic", "--source", "-", "--option", "n_events=400", "--configs", "river_lr",
              "--seeds", "1", "--threads", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert evaluate.run(parser.parse_args([*common, "--mode", "both", "--cadence", "4,1"])) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["protocol"]["cadence"] == [1, 4] and doc["protocol"]["publications"] == 4
    by_mode = {r["mode"]: r for r in doc["runs"]}
    assert by_mode["split"]["cadence"] == []
    cadence = {c["publications"]: c for c in by_mode["prequential"]["cadence"]}
    assert set(cadence) == {1, 4} and cadence[1]["events_per_publication"] == 80.0
    task = by_mode["prequential"]["tasks"][0]
    assert cadence[4]["metrics"][task]["auc"] == by_mode["prequential"]["metrics"]["served"][task]["auc"]
    report = (tmp_path / "report.md").read_text()
    assert "### Publication cadence — prequential tail" in report and "| backbone | config | N = 1 | N = 4 |" in report
    assert evaluate.run(parser.parse_args([*common, "--mode", "prequential"])) == 0  # none asked: none recorded
    doc = json.loads((tmp_path / "results.json").read_text())
    assert "cadence" not in doc["protocol"] and "Publication cadence" not in (tmp_path / "report.md").read_text()
    for bad in ("0,4", "four"):
        assert evaluate.run(parser.parse_args([*common, "--cadence", bad])) == 2
        assert "--cadence" in capsys.readouterr().err
    assert evaluate.run(parser.parse_args([*common, "--cadence", "4", "--mode", "split"])) == 2
    assert "use --mode prequential or both" in capsys.readouterr().err


def test_configs_accept_rungs_river_baselines_and_presets_and_name_unknown_ones() -> None:
    from consumers.tools.evaluate import parse_configs

    assert parse_configs("mtl,crossdistil@trust,river_lr") == ["mtl", "crossdistil@trust", "river_lr"]
    with pytest.raises(ValueError, match="unknown preset"):
        parse_configs("crossdistil@nope")
    with pytest.raises(ValueError, match="unknown 'bogus'"):
        parse_configs("mtl,bogus")


def test_a_variant_names_every_configuration_but_the_mtl_baseline() -> None:
    from consumers.tools.evaluate import variant_name

    assert variant_name("crossdistil@trust", "kd0.3", ["kd_weight"]) == "crossdistil@trust[kd0.3]"
    assert variant_name("mtl", "kd0.3", ["kd_weight", "river.lr"]) == "mtl"
    assert variant_name("aux", "") == "aux"


def test_a_variant_that_changes_mtl_names_it_too() -> None:
    from consumers.tools.evaluate import variant_name

    assert variant_name("mtl", "deep-only", ["wide"]) == "mtl[deep-only]"
    assert variant_name("mtl", "lr", ["kd_gate", "lr"]) == "mtl[lr]"


def test_the_report_states_the_trust_gate_of_gated_configurations_only() -> None:
    runs = [_run("mtl", s, 0.7) for s in (0, 1)]
    for seed, share in ((0, 0.0), (1, 0.5)):
        gated = _run("crossdistil", seed, 0.7)
        gated["losses"] = {"gate/finish": share, "gate/like": 0.0, "teacher_auc/finish": 0.66 + share / 10,
                           "student_auc/finish": 0.70, "teacher_auc/like": 0.6, "student_auc/like": 0.7}
        runs.append(gated)
    report = evaluate.render_report({"dataset": "x", "runs": runs})
    assert "### Trust gate — split" in report
    assert _row(report, "| mmoe | crossdistil | finish |") == [
        "mmoe", "crossdistil", "finish", "0.25 ± 0.35", "0.6850 ± 0.0354", "0.7000 ± 0.0000"]
    assert _row(report, "| mmoe | crossdistil | like |")[3] == "0.00 ± 0.00"
    assert "| mmoe | mtl | finish |" not in report  # no gate, no row
    assert "Trust gate" not in evaluate.render_report({"dataset": "x", "runs": runs[:2]})


def test_paired_differences_can_be_taken_to_another_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs = [_run("mtl[aux]", 0, 0.70), _run("mtl[aux]", 1, 0.72), _run("crossdistil[aux]", 0, 0.69),
            _run("crossdistil[aux]", 1, 0.70)]
    report = evaluate.render_report({"dataset": "x", "runs": runs}, baseline="mtl[aux]")
    assert "Paired differences to `mtl[aux]`" in report
    # -0.01 and -0.02: two seeds' t quantile is 12.7, so not bold (2 std/sqrt(n) made it bold before)
    assert "| mmoe | crossdistil[aux] | -0.0150 ± 0.0071 | -0.0150 ± 0.0071 |" in report
    assert "Paired differences" not in evaluate.render_report({"dataset": "x", "runs": runs})  # no mtl among them
    (tmp_path / "results.json").write_text(json.dumps({"dataset": "x", "runs": runs}))
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--from-results", str(tmp_path / "results.json"), "--out", str(tmp_path / "r"),
                              "--baseline", "mtl[typo]"])
    assert evaluate.run(args) == 0  # the report is written all the same, and the mistake is said
    assert "--baseline 'mtl[typo]' is not a configuration of these runs" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "said"), [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--epochs", "-1"], "--epochs must be at least 1, got -1"),
    (["--curve-points", "-3"], "--curve-points must be at least 0 (0: no curve), got -3"),
    (["--limit", "-5"], "--limit must be at least 0 (0: every event), got -5"),
    (["--threads", "-1"], "--threads must be at least 0 (0: torch's choice), got -1"),
    (["--seeds", "1,1"], "--seeds 1,1: a seed is listed twice"),
])
def test_counts_out_of_their_range_are_refused_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    flags: list[str], said: str) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--dataset", "synthetic", "--source", "-", "--option", "n_events=300", "--configs",
                              "mtl", "--device", "cpu", "--out", str(tmp_path / "out"), *flags])
    assert evaluate.run(args) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_output_or_results_file_that_cannot_be_used_is_one_line_naming_it(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "bad.json").write_text("{")
    for argv, said in (
            (["--from-results", str(tmp_path / "empty.json"), "--out", str(tmp_path / "afile")],
             f"--out {tmp_path / 'afile'}: {tmp_path / 'afile'} is a file, not a folder"),
            (["--from-results", str(tmp_path / "empty.json"), "--out", str(tmp_path / "o")],
             f"--from-results {tmp_path / 'empty.json'}: not the results.json of a 'crossdistil evaluate'"),
            (["--from-results", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o")],
             f"--from-results {tmp_path / 'bad.json'}: Expecting property name"),
            (["--from-results", str(tmp_path), "--out", str(tmp_path / "o")],
             f"--from-results {tmp_path}: [Errno 21] Is a directory")):
        assert evaluate.run(parser.parse_args(argv)) == 2
        assert said in capsys.readouterr().err


@pytest.mark.parametrize("option", ["embeding_dim=8", "embedding_dim=0", "lr=nan"])
def test_a_bad_model_option_is_refused_before_the_data_is_read(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the data was encoded before the model options were checked")

    monkeypatch.setattr(evaluate, "load_encoded", never)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    args = parser.parse_args(["--dataset", "synthetic", "--source", "-", "--option", "n_events=300", "--configs",
                              "mtl,crossdistil", "--backbone", "shared_bottom,mmoe", "--device", "cpu",
                              "--model-option", option, "--out", str(tmp_path / "out")])
    assert evaluate.run(args) == 2
    assert option.split("=")[0] in capsys.readouterr().err and not (tmp_path / "out").exists()

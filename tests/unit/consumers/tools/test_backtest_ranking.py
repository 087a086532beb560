"""``crossdistil backtest``: per-task NDCG@10 and the combined score from the predictions the replay keeps."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from consumers.runtime.config import Config
from consumers.tools import backtest

pytestmark = pytest.mark.unit

LOG2_3 = math.log2(3)


def make_run(tasks: tuple[str, ...] = ("click", "like"), aux_tasks: tuple[str, ...] = ()) -> backtest.ConfigRun:
    """A ConfigRun over a stand-in pipeline: on_batch only needs its tasks and trained-sample count."""
    pipeline = SimpleNamespace(tasks=tasks, scored_tasks=tasks, trained_samples=0)
    cfg = Config()
    cfg.model.tasks, cfg.model.options = list(tasks), {"aux_tasks": list(aux_tasks)} if aux_tasks else {}
    return backtest.ConfigRun("mtl", cfg=cfg, pipeline=pipeline, sample_every=10**9, _next_point=10**9)


def feed(run: backtest.ConfigRun, users: list[str], labels: dict[str, list[int]],
         scores: dict[str, list[float]]) -> None:
    samples = [SimpleNamespace(impression={"impression_id": f"i{run.pipeline.trained_samples + i}", "ts_ms": i,
                                           "user_id": user}) for i, user in enumerate(users)]
    run.pipeline.trained_samples += len(samples)
    run.on_batch(samples, {t: np.array(v, np.int8) for t, v in labels.items()},
                 {t: np.array(v, np.float32) for t, v in scores.items()}, [])


def test_users_are_kept_per_sample_as_compact_codes() -> None:
    run = make_run()
    feed(run, ["u1", "u2"], {"click": [1, 0], "like": [0, 0]}, {"click": [0.5, 0.5], "like": [0.5, 0.5]})
    feed(run, ["u2", "u3"], {"click": [1, 0], "like": [0, 0]}, {"click": [0.5, 0.5], "like": [0.5, 0.5]})
    assert run.users().tolist() == [0, 1, 1, 2] and run.users().dtype == np.int32
    assert run.coder.index == {"u1": 0, "u2": 1, "u3": 2}


def test_ndcg_uses_the_next_task_as_partner_across_batches() -> None:
    run = make_run()
    # One user over two batches. click relevances (2 y_click + y_like): 0, 3, 2 -> scored 0.9, 0.5, 0.1.
    feed(run, ["u", "u"], {"click": [0, 1], "like": [0, 1]}, {"click": [0.9, 0.5], "like": [0.1, 0.9]})
    feed(run, ["u"], {"click": [1], "like": [0]}, {"click": [0.1], "like": [0.5]})
    metrics = run.ranking_metrics()
    dcg = 0 + 7 / LOG2_3 + 3 / 2
    idcg = 7 + 3 / LOG2_3 + 0
    assert metrics["ndcg10"]["click"] == pytest.approx(dcg / idcg)
    # like relevances (2 y_like + y_click): 0, 3, 1 -> scored 0.1, 0.9, 0.5: the ideal order.
    assert metrics["ndcg10"]["like"] == pytest.approx(1.0)


def test_combined_metrics_cover_all_predictions_and_the_last_fraction() -> None:
    run = make_run()
    # Products: 0.81, 0.09, 0.25, 0.01, 0.64; both positive only in rows 0 and 4.
    feed(run, ["a", "a", "b", "b", "b"], {"click": [1, 1, 0, 0, 1], "like": [1, 0, 1, 0, 1]},
         {"click": [0.9, 0.9, 0.5, 0.1, 0.8], "like": [0.9, 0.1, 0.5, 0.1, 0.8]})
    every = run.ranking_metrics()["combined"]
    assert every["auc"] == pytest.approx(1.0) and every["weights"] == [1.0, 1.0]
    assert every["ndcg10"] == pytest.approx(1.0)
    last = run.ranking_metrics(last_fraction=0.4)["combined"]  # rows 3 and 4, both user b
    assert last["auc"] == pytest.approx(1.0) and last["ndcg10"] == pytest.approx(1.0)


def test_undefined_ranking_metrics_are_none_not_nan() -> None:
    run = make_run()
    assert run.ranking_metrics() == {"ndcg10": {"click": None, "like": None},
                                     "combined": {"auc": None, "ndcg10": None, "weights": [1.0, 1.0]}}
    feed(run, ["a", "b"], {"click": [1, 1], "like": [1, 1]}, {"click": [0.2, 0.3], "like": [0.2, 0.3]})
    metrics = run.ranking_metrics()
    assert metrics["ndcg10"]["click"] is None and metrics["combined"]["auc"] is None


def _summary(ranking: dict | None) -> dict:
    config = {"tasks": ["click"], "prequential_auc": {"click": 0.7}, "prequential_auc_last_20pct": {"click": 0.72},
              "final": {"click": {"auc@500": 0.71, "log_loss@500": 0.4}}, "drift_detections": [],
              "trained_samples": 1000, "steps": 1, "dead_letters": 0, "join": {}}
    if ranking is not None:
        config["ranking"] = ranking
        config["ranking_last_20pct"] = {"ndcg10": {"click": 0.66}, "combined": {"auc": 0.75, "ndcg10": None}}
    return {"input": {"log": "file:///x.evlog"}, "records": 10, "events": 20, "configurations": {"mtl": config}}


TIMING = {"seconds": 1.0, "records_per_s": 10}


def test_the_report_states_ndcg_and_the_combined_score_per_configuration() -> None:
    report = backtest.render_report(_summary({"ndcg10": {"click": 0.65}, "combined": {"auc": 0.74, "ndcg10": 0.6}}),
                                    TIMING, [])
    assert "| mtl | click | 0.7000 | 0.7200 | 0.6500 | 0.6600 | 0.7100 (auc@500) | 0.4000 | 0 |" in report
    assert "| mtl | 0.7400 | 0.7500 | 0.6000 | n/a |" in report


def test_a_summary_written_before_the_ranking_metrics_still_renders() -> None:
    report = backtest.render_report(_summary(None), TIMING, [])
    assert "| mtl | click | 0.7000 | 0.7200 | n/a | n/a |" in report
    assert "| mtl | n/a | n/a | n/a | n/a |" in report


def test_auxiliary_tasks_are_left_out_of_the_ranking() -> None:
    """model.options.aux_tasks are learnt, not ranked by: the served tasks' NDCG and combined score are those of a
    run without the auxiliary task (its labels would otherwise change both: it is the partner of like)."""
    users = ["a", "a", "b", "b", "b"]
    labels = {"click": [1, 1, 0, 0, 1], "like": [1, 0, 1, 0, 1]}
    scores = {"click": [0.9, 0.9, 0.5, 0.1, 0.8], "like": [0.9, 0.1, 0.5, 0.1, 0.8]}
    plain, with_aux = make_run(), make_run(("click", "like", "follow"), aux_tasks=("follow",))
    feed(plain, users, labels, scores)
    feed(with_aux, users, {**labels, "follow": [0, 1, 0, 1, 0]}, {**scores, "follow": [0.1, 0.2, 0.9, 0.3, 0.1]})
    assert with_aux.ranking_metrics() == plain.ranking_metrics()
    assert set(with_aux.prequential_auc()) == {"click", "like", "follow"}  # still learnt and measured


def test_the_report_marks_auxiliary_tasks() -> None:
    data = _summary({"ndcg10": {"click": 0.65}, "combined": {"auc": 0.74, "ndcg10": 0.6}})
    config = data["configurations"]["mtl"]
    config["tasks"], config["served_tasks"] = ["click", "follow"], ["click"]
    for key in ("prequential_auc", "prequential_auc_last_20pct"):
        config[key]["follow"] = 0.6
    report = backtest.render_report(data, TIMING, [])
    assert "| mtl | click | 0.7000 |" in report and "| mtl | follow (auxiliary) | 0.6000 |" in report

"""`crossdistil evaluate --aux-tasks`: the models also learn outcomes the report leaves out (auxiliary tasks); the
runs are named apart from plain `mtl`, the metrics and the combined score read the scored tasks only, and a name
that is not a task of the data set is refused before training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from consumers.tools import evaluate
from models.evaluation import EncodedData
from models.features import FeatureSpec

pytestmark = pytest.mark.unit

MAPPING = """\
name = "toy"
user = "user"
item = "item"
time = "ts"
time_unit = "s"
categorical = ["hour"]
numeric = ["duration"]
privileged = ["play"]

[tasks.click]
column = "click"

[tasks.like]
column = "like"

[tasks.follow]
column = "follow"
"""


def args_for(tmp_path: Path, *extra: str, n: int = 800) -> argparse.Namespace:
    rng = np.random.default_rng(5)
    lines = ["user,item,ts,hour,duration,play,click,like,follow"]
    for i in range(n):
        follow = int(rng.random() < 0.1)
        like = int(rng.random() < 0.05 + 0.4 * follow)  # a follow says much of a like
        lines.append(f"u{rng.integers(50)},i{rng.integers(80)},{i},{i % 24},{rng.integers(5, 60)},"
                     f"{rng.exponential(20.0):.1f},{int(rng.random() < 0.3)},{like},{follow}")
    (tmp_path / "toy.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "toy.toml").write_text(MAPPING)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(["--dataset", "csv", "--source", str(tmp_path / "toy.csv"), "--mapping",
                              str(tmp_path / "toy.toml"), "--tasks", "click,like", "--configs", "mtl", "--seeds", "1",
                              "--mode", "both", "--curve-points", "2", "--threads", "1", "--device", "cpu",
                              "--out", str(tmp_path / "out"), *extra])


def test_auxiliary_tasks_are_learnt_but_not_scored_and_named_apart(tmp_path: Path) -> None:
    assert evaluate.run(args_for(tmp_path, "--aux-tasks", "follow")) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["protocol"]["aux_tasks"] == ["follow"]
    assert {r["config"] for r in doc["runs"]} == {"mtl[aux]"}  # never the plain mtl baseline
    for run in doc["runs"]:
        assert run["tasks"] == ["click", "like"] and run["aux_tasks"] == ["follow"]
        assert "bce/follow" in run["losses"]  # the model learnt it
        for window, metrics in run["metrics"].items():
            assert set(metrics) == {"click", "like"}, window  # ... and the report does not score it
            assert len(run["combined"][window]["weights"]) == 2
        assert all(set(point["auc"]) == {"click", "like"} for point in run["curve"])
    report = (tmp_path / "out" / "report.md").read_text()
    assert "follow" not in report.split("## Tasks", 1)[1].split("\n")[0]
    assert "Auxiliary tasks (learnt beside the tasks of each section, never scored): `mtl[aux]`: follow." in report


def test_a_scored_task_given_as_auxiliary_is_scored_and_an_unknown_one_is_refused(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--aux-tasks", "like,follow")
    dataset = evaluate.open_dataset("csv", args.source, mapping=args.mapping)
    assert evaluate._task_sets(args, dataset, None) == [(["click", "like"], ["follow"])]
    args.aux_tasks = "follow,share"
    with pytest.raises(ValueError, match=r"--aux-tasks: \['share'\] are not tasks of 'toy'"):
        evaluate.run_grid(args)


def test_a_privileged_teacher_with_auxiliary_tasks_is_its_own_variant(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--aux-tasks", "follow", "--model-option", "privileged=play",
                    "--model-option", "privileged_weight=like:0.8", "--mode", "split")
    doc = evaluate.run_grid(args)
    assert {r["config"] for r in doc["runs"]} == {"mtl[privileged+aux]"}
    assert {"bce/follow", "privileged_bce/like"} <= set(doc["runs"][0]["losses"])


@pytest.mark.parametrize("auxiliary", [("click",), ("click", "like")])
def test_auxiliary_tasks_must_be_the_last_and_leave_one_scored(auxiliary: tuple[str, ...]) -> None:
    labels = np.zeros((3, 2))
    with pytest.raises(ValueError, match="must be the last of the tasks"):
        EncodedData(batch=None, tasks=("click", "like"), labels=labels, users=np.zeros(3), ts_ms=np.zeros(3),
                    auxiliary=auxiliary)
    data = EncodedData(batch=None, tasks=("click", "like"), labels=np.arange(6).reshape(3, 2), users=np.zeros(3),
                       ts_ms=np.zeros(3), auxiliary=("like",))
    assert data.scored_tasks == ("click",) and data.scored_labels.tolist() == [[0], [2], [4]]


def test_evaluate_passes_its_auxiliary_tasks_to_the_model() -> None:
    tasks = ("click", "follow", "like", "comment")
    learner = evaluate.seeded_learner(tasks, "shared_bottom", "crossdistil", 0, FeatureSpec(), {}, "cpu",
                                      ("follow", "comment"))
    assert learner.config.aux_tasks == ("follow", "comment") and learner.config.partner_of("like") == "click"
    peer = evaluate.seeded_learner(tasks, "shared_bottom", "river_lr", 0, FeatureSpec(), {}, "cpu", ("follow",))
    assert peer.config.tasks == tasks  # a peer learns every task alone: they are tasks like the rest


def test_counted_tasks_are_inputs_only_named_apart_and_never_scored(tmp_path: Path) -> None:
    assert evaluate.run(args_for(tmp_path, "--counted-tasks", "follow", "--mode", "prequential")) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    protocol = doc["protocol"]
    assert protocol["aux_tasks"] == ["follow"] and protocol["model_options"]["counted_tasks"] == ["follow"]
    (run,) = doc["runs"]
    assert run["config"] == "mtl[counted]" and run["aux_tasks"] == ["follow"]
    assert not [name for name in run["losses"] if name.endswith("/follow")]  # no tower, no loss
    assert set(run["metrics"]["tail"]) == {"click", "like"}
    args = args_for(tmp_path, "--counted-tasks", "like,follow")
    with pytest.raises(ValueError, match=r"--counted-tasks: \['like'\] are in --tasks"):
        evaluate.run_grid(args)
    with pytest.raises(ValueError, match="set it with its own flag"):
        evaluate.run_grid(args_for(tmp_path, "--model-option", "counted_tasks=follow"))


def test_a_peer_learns_counted_tasks_as_tasks() -> None:
    peer = evaluate.seeded_learner(("click", "follow"), "shared_bottom", "river_lr", 0, FeatureSpec(),
                                   {"counted_tasks": ["follow"]}, "cpu", ("follow",))
    assert peer.config.tasks == ("click", "follow")

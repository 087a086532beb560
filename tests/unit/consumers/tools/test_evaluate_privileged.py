"""`crossdistil evaluate` with a privileged teacher: the mapping's privileged columns reach the teacher only, the
runs are named apart from plain `mtl`, and a name that is not a privileged column is refused before training."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from consumers.tools import evaluate

pytestmark = pytest.mark.unit

MAPPING = """\
name = "toy"
user = "user"
item = "item"
time = "ts"
time_unit = "s"
categorical = ["hour"]
numeric = ["duration"]
privileged = ["play", "stay"]

[tasks.click]
column = "click"

[tasks.like]
column = "like"
"""


def toy(tmp_path: Path, n: int = 800) -> tuple[Path, Path]:
    rng = np.random.default_rng(3)
    play = rng.exponential(20.0, n)
    like = (rng.random(n) < 0.02 + 0.3 * (play > 40)).astype(int)  # the privileged play time says much of a like
    lines = ["user,item,ts,hour,duration,play,stay,click,like"]
    lines += [f"u{rng.integers(50)},i{rng.integers(80)},{i},{i % 24},{rng.integers(5, 60)},{play[i]:.1f},"
              f"{rng.integers(0, 3)},{int(play[i] > 5)},{like[i]}" for i in range(n)]
    (tmp_path / "toy.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "toy.toml").write_text(MAPPING)
    return tmp_path / "toy.csv", tmp_path / "toy.toml"


def args_for(tmp_path: Path, *extra: str) -> argparse.Namespace:
    source, mapping = toy(tmp_path)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(["--dataset", "csv", "--source", str(source), "--mapping", str(mapping),
                              "--tasks", "click,like", "--configs", "mtl", "--seeds", "1", "--mode", "both",
                              "--curve-points", "2", "--threads", "1", "--device", "cpu",
                              "--out", str(tmp_path / "out"), *extra])


def test_a_privileged_teacher_trains_beside_the_student_and_is_named_apart(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--model-option", "privileged=play,stay", "--model-option", "privileged_weight=like:0.8")
    assert evaluate.run(args) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["config"] for r in doc["runs"]} == {"mtl[privileged]"}  # never the plain mtl baseline
    assert doc["protocol"]["model_options"]["privileged"] == ["play", "stay"]
    assert doc["protocol"]["features"]["numeric"] == ["duration"]  # the student's features: no outcome among them
    for run in doc["runs"]:
        assert {"bce/like", "privileged_bce/like"} <= set(run["losses"])


def test_a_column_that_is_not_privileged_is_refused_before_training(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--model-option", "privileged=click")
    with pytest.raises(ValueError, match=r"\['click'\] are not privileged columns of 'toy'.*\['play', 'stay'\]"):
        evaluate.run_grid(args)


def test_a_peer_is_not_run_with_a_privileged_teacher(tmp_path: Path) -> None:
    args = args_for(tmp_path, "--model-option", "privileged=play")
    args.configs = "mtl,river_lr"
    with pytest.raises(ValueError, match=r"a privileged teacher is the deep model's; run \['river_lr'\]"):
        evaluate.run_grid(args)

"""KuaiRand-Pure through mappings/kuairand_pure.toml: a smoke test on the first rows of the real file.

The whole file (228,329 rows) is read by the evaluation report, not here: the mapping streams it lazily
(``assume_sorted``), so a slice costs milliseconds.
"""

from __future__ import annotations

import itertools
import tomllib
from pathlib import Path

import pytest

from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner
from streamer.datasets import open_dataset

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
PURE_FILE = "kuairand_pure/kuairand_pure_20220425_20220508.csv"
MAPPING = REPO / "mappings" / "kuairand_pure.toml"
SIDE_FEATURES = (
    ["user_active_degree", "is_lowactive_period", "is_live_streamer", "is_video_author", "follow_user_num_range",
     "fans_user_num_range", "friend_user_num_range", "register_days_range"]
    + [f"onehot_feat{i}" for i in range(18)]
    + ["author_id", "video_type", "upload_type", "visible_status", "music_type", "video_tag"]
)
OUTCOMES = {"is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate", "long_view", "finish",
            "play_time_ms", "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand"}


@pytest.fixture(scope="module")
def head():
    source = REPO.parent / "shared" / "data" / PURE_FILE
    if not source.is_file():
        pytest.skip(f"real data not available: {source} does not exist")
    dataset = open_dataset("csv", source, mapping=MAPPING)
    return dataset, list(itertools.islice(dataset.interactions(), 5000))


def test_every_side_feature_is_a_feature_and_no_outcome_is(head) -> None:
    dataset, _ = head
    assert set(SIDE_FEATURES) <= set(dataset.categorical_features)
    assert dataset.numeric_features == ("duration_ms",)
    assert not (set(dataset.categorical_features) | set(dataset.numeric_features)) & OUTCOMES
    assert "date" not in dataset.categorical_features  # a day id carries nothing to unseen test days


def test_the_first_rows_are_in_time_order_with_side_features_and_eight_tasks(head) -> None:
    dataset, rows = head
    assert dataset.tasks == ("click", "long_view", "finish", "like", "follow", "comment", "forward", "profile_enter")
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(rows, rows[1:]))
    first = rows[0]  # the README's first data row
    assert (first.user_id, first.item_id, first.ts_ms) == ("712", "5239", 1650812741436)
    assert first.features["user_active_degree"] == "full_active" and first.features["author_id"] == "8079479"
    assert first.labels == {"click": 1, "long_view": 1, "finish": 1, "like": 0, "follow": 0, "comment": 0,
                            "forward": 0, "profile_enter": 0}
    assert first.feedback_delay_ms["long_view"] == 61802  # play_time_ms: when the view ended
    assert "video_tag" not in rows[1].features  # an empty cell leaves the feature out
    rates = {t: sum(r.labels[t] for r in rows) / len(rows) for t in dataset.tasks}
    assert 0.3 < rates["click"] < 0.6 and 0.2 < rates["long_view"] < 0.45 and rates["like"] < 0.05
    assert all(rates[t] < 0.05 for t in ("follow", "comment", "forward", "profile_enter"))


def test_a_model_trains_on_every_feature_of_the_mapping(head) -> None:
    dataset, rows = head
    spec = FeatureSpec(categorical=("user_id", "item_id", *dataset.categorical_features),
                       numeric=dataset.numeric_features, hash_buckets=2**16)
    learner = Learner(ModelConfig(tasks=("finish", "like"), features=spec, hidden_dims=(16,), tower_dims=(8,)))
    batch = encode_rows(rows[:512], spec, ("finish", "like"))
    assert batch.categorical.shape == (512, 2 + len(dataset.categorical_features))
    losses, predictions = learner.step(batch)
    assert predictions["finish"].shape == (512,) and losses["total"] > 0


def test_the_mapping_documents_its_attribution() -> None:
    text = MAPPING.read_text()
    assert "CC BY-SA 4.0" in text and "KuaiRand" in text
    assert tomllib.loads(text)["assume_sorted"] is True

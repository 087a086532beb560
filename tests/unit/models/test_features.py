"""Feature hashing, row encoding and the running numeric normaliser."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.config import ModelConfig
from models.crossdistil import RunningNormalizer
from models.features import (
    FeatureSpec,
    collision_rate,
    encode_factorized,
    encode_for_scoring,
    encode_rows,
    hash_bucket,
    hash_column,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


def test_hash_is_pinned_so_checkpoints_stay_valid_across_versions_and_processes() -> None:
    assert hash_bucket("item_id", "42", 2**20) == 417413
    assert hash_bucket("user_id", "u1", 2**20) == 463853
    # A fresh interpreter (another PYTHONHASHSEED) agrees: not Python's hash().
    code = "from models.features import hash_bucket; print(hash_bucket('item_id', '42', 2**20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[3], env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == "417413"


def test_hash_column_gives_hash_bucket_rows_without_filling_its_collector_tracked_cache() -> None:
    values = [f"column-test-{i}" for i in range(500)] + [7, 7.0, True]
    before = hash_bucket.cache_info().currsize
    rows = hash_column("item_id", values, 2**20)
    assert hash_bucket.cache_info().currsize == before  # memoised in a plain str -> int dict instead
    assert rows == [hash_bucket("item_id", str(v), 2**20) for v in values]


def test_fields_are_salted_and_int_and_str_values_share_a_row() -> None:
    assert hash_bucket("user_id", "7", 2**20) != hash_bucket("item_id", "7", 2**20)
    assert hash_bucket("item_id", 7, 2**20) == hash_bucket("item_id", "7", 2**20)


def test_equal_but_differently_typed_values_are_keyed_by_their_text() -> None:
    # 5 == 5.0 == True as dict keys; the memo must not let one stand in for another.
    spec = FeatureSpec(categorical=("x",), hash_buckets=2**20)
    batch = encode_rows([{"features": {"x": v}} for v in (5, 5.0, True, "5")], spec, ())
    expected = [hash_bucket("x", text, 2**20) for text in ("5", "5.0", "True", "5")]
    assert batch.categorical[:, 0].tolist() == expected
    assert hash_bucket("x", 5.0, 2**20) == expected[1] and hash_bucket("x", True, 2**20) == expected[2]


def test_a_cached_string_does_not_stand_in_for_an_equal_number_in_a_later_batch() -> None:
    # The memo is looked up with the values themselves first; its keys are strings, so 5 must miss "5".
    spec = FeatureSpec(categorical=("y",), hash_buckets=2**20)
    encode_rows([{"features": {"y": "5"}}, {"features": {"y": "True"}}], spec, ())
    batch = encode_rows([{"features": {"y": v}} for v in ("5", 5, 5.0, True)], spec, ())
    assert batch.categorical[:, 0].tolist() == [hash_bucket("y", t, 2**20) for t in ("5", "5", "5.0", "True")]


def test_a_batch_encodes_its_fields_as_hash_bucket_whether_the_cache_holds_them_or_not() -> None:
    # every path of the categorical columns: all values cached (one pass into the array), a value not seen yet, a
    # number among strings, and the cache cleared when full
    import models.features as features

    spec = FeatureSpec(categorical=("user_id", "z1", "z2"), hash_buckets=2**20)
    rows = [{"user_id": f"u{i % 3}", "features": {"z1": f"a{i % 5}", "z2": f"b{i}"}} for i in range(12)]
    expected = [[hash_bucket(f, str(v), 2**20) for f, v in (("user_id", r["user_id"]), *r["features"].items())]
                for r in rows]
    assert encode_rows(rows, spec, ()).categorical.tolist() == expected  # misses first
    assert encode_rows(rows, spec, ()).categorical.tolist() == expected  # then every value from the cache
    rows[4]["features"]["z1"], rows[7]["features"]["z2"] = 5, "new"
    expected[4][1], expected[7][2] = hash_bucket("z1", "5", 2**20), hash_bucket("z2", "new", 2**20)
    batch = encode_rows(rows, spec, ())
    assert batch.categorical.tolist() == expected and batch.categorical.is_contiguous()
    original = features._ROW_CACHE_LIMIT
    features._ROW_CACHE_LIMIT = 2  # full: cleared, refilled
    try:
        assert encode_rows(rows, spec, ()).categorical.tolist() == expected
    finally:
        features._ROW_CACHE_LIMIT = original


def test_labels_beside_the_rows_encode_as_labels_in_them() -> None:
    from models.features import encode_columns

    spec = FeatureSpec(categorical=("user_id", "item_id"), hash_buckets=1000)
    labels = [{"like": 1}, None, {"like": 0, "finish": 1}]
    rows = [{"user_id": f"u{i}", "item_id": "i", "features": {}} for i in range(3)]
    beside = encode_columns(rows, spec, ("like", "finish"), labels)
    inside = encode_columns([{**r, "labels": m} for r, m in zip(rows, labels)], spec, ("like", "finish"))
    assert all(np.array_equal(beside[k], inside[k]) for k in inside)
    assert beside["labels"].tolist() == [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]
    with pytest.raises(ValueError, match="2 label maps for 3 rows"):
        encode_columns(rows, spec, ("like",), labels[:2])


def test_rows_missing_some_features_encode_as_row_by_row() -> None:
    spec = FeatureSpec(categorical=("a", "b"), numeric=("n", "m"), hash_buckets=1000)
    rows = [{"features": {"a": "x", "b": "y", "n": 1.0, "m": 2.0}}, {"features": {"b": "z", "m": 3.0}},
            {"features": None}]
    batch = encode_rows(rows, spec, ())
    one_by_one = [encode_rows([row], spec, ()) for row in rows]
    assert batch.categorical.tolist() == [b.categorical[0].tolist() for b in one_by_one]
    assert batch.numeric.tolist() == [b.numeric[0].tolist() for b in one_by_one]
    assert batch.categorical[1].tolist() == [hash_bucket("a", "", 1000), hash_bucket("b", "z", 1000)]


def test_encode_rows_reads_ids_from_the_row_and_context_from_features() -> None:
    spec = FeatureSpec(categorical=("user_id", "item_id", "city"), numeric=("watch",), hash_buckets=1000)
    rows = [{"user_id": "u", "item_id": "i", "features": {"city": "paris", "watch": math.e - 1},
             "labels": {"like": 1}}]
    batch = encode_rows(rows, spec, ("like", "finish"))
    assert batch.categorical.tolist() == [[hash_bucket("user_id", "u", 1000), hash_bucket("item_id", "i", 1000),
                                           hash_bucket("city", "paris", 1000)]]
    assert batch.numeric[0].tolist() == pytest.approx([1.0])  # signed log1p
    assert batch.labels.tolist() == [[1.0, 0.0]]
    assert batch.categorical.dtype == torch.int64 and batch.numeric.dtype == torch.float32


def test_missing_values_have_a_row_per_field_and_zero_numerics() -> None:
    spec = FeatureSpec(categorical=("user_id", "city"), numeric=("watch",), hash_buckets=1000)
    batch = encode_rows([{"user_id": "u"}], spec, ("like",))
    assert batch.categorical[0, 1] == hash_bucket("city", "", 1000)
    assert batch.numeric.tolist() == [[0.0]] and batch.labels.tolist() == [[0.0]]


def test_negative_numerics_keep_their_sign() -> None:
    spec = FeatureSpec(numeric=("delta",))
    batch = encode_rows([{"features": {"delta": -(math.e**2 - 1)}}], spec, ())
    assert batch.numeric[0].tolist() == pytest.approx([-2.0])


def test_a_non_numeric_value_in_a_numeric_field_names_the_field() -> None:
    with pytest.raises(ValueError, match="'watch'"):
        encode_rows([{"features": {"watch": "long"}}], FeatureSpec(numeric=("watch",)), ())


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_a_numeric_feature_that_is_not_finite_is_refused_naming_the_field_and_row(value: float) -> None:
    rows = [{"features": {"watch": 3}}, {"features": {"watch": value}}]
    with pytest.raises(ValueError, match="numeric feature 'watch'"):  # log1p would keep it: NaN predictions
        encode_rows(rows, FeatureSpec(numeric=("watch",)), ())
    if isinstance(value, float):
        with pytest.raises(ValueError, match="numeric feature 'watch' is .* in row 1: expected a finite number"):
            encode_for_scoring([{"user_id": "u", "item_id": "i", **row} for row in rows],
                               FeatureSpec(numeric=("watch",)), ())


def test_encode_factorized_refuses_a_numeric_column_that_is_not_finite() -> None:
    spec = FeatureSpec(categorical=("user_id",), numeric=("watch",))
    users = (["u"], np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="numeric feature 'watch' is inf in row 2: expected a finite number"):
        encode_factorized({}, {"watch": np.array([1.0, 0.0, np.inf])}, np.zeros((3, 0)), users, spec)
    arrays = encode_factorized({}, {"watch": np.array([1.0, 0.0, -2.0])}, np.zeros((3, 0)), users, spec)
    assert np.isfinite(arrays["numeric"]).all()


def test_encode_rows_accepts_objects_with_attributes() -> None:
    from streamer.datasets.base import Interaction

    item = Interaction(impression_id="1", user_id="u", item_id="i", ts_ms=0, labels={"like": 1})
    batch = encode_rows([item], FeatureSpec(), ("like",))
    assert batch.labels.tolist() == [[1.0]]
    assert batch.categorical[0, 0] == hash_bucket("user_id", "u", 2**20)


def test_encoding_for_scoring_gives_encode_rows_table_rows_and_numerics_bit_for_bit() -> None:
    from streamer.datasets.base import Interaction

    spec = FeatureSpec(categorical=("user_id", "item_id", "hour", "tab"), numeric=("watch", "count"), hash_buckets=1000)
    impressions = [{"user_id": "u1", "item_id": "i1",
                    "features": {"hour": "13", "tab": 2, "watch": 15000, "count": -3.5}},
                   {"user_id": "u2", "item_id": "i2", "features": {"hour": 5.0, "watch": 0.25}},  # no tab, no count
                   {"user_id": "u1", "item_id": "i3", "features": {}}]
    others = [impressions + [{"user_id": "u3", "item_id": "i4", "features": None}],  # not all feature dicts
              [{"user_id": "u"}, {"item_id": "i", "features": {"hour": 1}}],  # rows without some fields
              [Interaction(impression_id="1", user_id="u", item_id="i", ts_ms=0, labels={"like": 1})], []]
    for rows in [impressions, *others]:
        reference, scoring = encode_rows(rows, spec, ("like",)), encode_for_scoring(rows, spec, ("like",))
        assert torch.equal(scoring.categorical, reference.categorical)
        assert torch.equal(scoring.numeric, reference.numeric)
        assert scoring.labels.shape == reference.labels.shape and scoring.user.shape == reference.user.shape


def test_same_user_rows_share_a_user_key() -> None:
    batch = encode_rows([{"user_id": "a"}, {"user_id": "b"}, {"user_id": "a"}], FeatureSpec(), ())
    assert batch.user[0] == batch.user[2] != batch.user[1]


def test_running_normaliser_matches_the_statistics_of_everything_seen() -> None:
    rng = np.random.default_rng(0)
    chunks = [rng.normal(3.0, 2.0, size=(n, 2)) for n in (5, 17, 40)]
    norm = RunningNormalizer(2)
    for chunk in chunks:
        norm.update(torch.tensor(chunk, dtype=torch.float32))
    seen = np.concatenate(chunks).astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), seen.mean(axis=0), rtol=1e-9)
    np.testing.assert_allclose((norm.m2 / norm.count).numpy(), seen.var(axis=0), rtol=1e-9)
    assert set(norm.state_dict()) == {"count", "mean", "m2"}


def test_config_round_trips_through_plain_types() -> None:
    cfg = ModelConfig(tasks=("a", "b", "c"), partners={"a": "c"}, kd_weight={"b": 0.5}, backbone="ple")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.partner_of("a") == "c" and cfg.partner_of("b") == "c" and cfg.partner_of("c") == "a"
    assert cfg.task_weights("kd_weight") == [1.0, 0.5, 1.0]


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(backbone="transformer")
    with pytest.raises(ValueError, match="rung"):
        ModelConfig(rung="everything")
    with pytest.raises(ValueError, match="partner"):
        ModelConfig(tasks=("like",), rung="crossdistil")


def test_default_table_keeps_kuairand_id_collisions_under_two_percent() -> None:
    path = DATA / "kuairand" / "kuairand27k_like_hate_kcore15.tsv"
    if not path.exists():
        pytest.skip(f"KuaiRand data not found at {path} (../shared/data relative to the repository root)")
    with path.open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    rates = collision_rate({"user_id": [r["user_id"] for r in rows], "item_id": [r["video_id"] for r in rows]},
                           FeatureSpec().hash_buckets)
    assert rates["distinct_keys"] == 664 + 9359
    assert rates["colliding_key_share"] < 0.02


def test_batch_to_cpu_is_a_no_op_and_keeps_pageable_memory() -> None:
    batch = encode_rows([{"user_id": "u", "item_id": "i", "features": {}, "labels": {"click": 1}}],
                        FeatureSpec(), ("click",))
    moved = batch.to("cpu")
    assert moved.categorical is batch.categorical and moved.labels is batch.labels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")
def test_batch_to_cuda_goes_through_pinned_memory_and_keeps_values() -> None:
    rows = [{"user_id": f"u{i}", "item_id": f"i{i}", "features": {}, "labels": {"click": i % 2}} for i in range(64)]
    batch = encode_rows(rows, FeatureSpec(), ("click",))
    moved = batch.to("cuda")
    torch.cuda.synchronize()
    assert moved.categorical.device.type == "cuda"
    assert torch.equal(moved.categorical.cpu(), batch.categorical) and torch.equal(moved.labels.cpu(), batch.labels)
    assert not batch.categorical.is_pinned()  # the caller's tensors are left as they were

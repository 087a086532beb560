"""docs/features.md is exact: its hash test vectors and its numeric example are what the code computes."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import pytest
import torch

from models.crossdistil import RunningNormalizer
from models.features import FeatureSpec, encode_rows, hash_bucket

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[3] / "docs" / "features.md"
BUCKETS = (1024, 2**18, 2**20)


def vectors() -> list[list[str]]:
    """The rows of the test-vector table: field, value, key, hex digest, h, and the three rows."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in DOC.read_text().splitlines() if re.match(r"^\| (user_id|item_id|hour|tab) \|", line)]
    assert len(rows) >= 6, "docs/features.md lost its test vectors"
    return rows


@pytest.mark.parametrize("row", vectors(), ids=lambda r: f"{r[0]}={r[1]}")
def test_each_hash_vector_of_the_doc_is_what_the_code_computes(row: list[str]) -> None:
    field, value, key, digest, h, *table_rows = row
    value = "" if value == "missing" else value.split("`")[1]
    key = key.strip("`")
    assert key == f"{field}={value}"
    raw = hashlib.blake2b(key.encode(), digest_size=8).digest()
    assert raw.hex() == digest and int.from_bytes(raw, "little") == int(h)
    assert [hash_bucket(field, value, b) for b in BUCKETS] == [int(r) for r in table_rows]


def test_missing_fields_hash_as_the_empty_value_and_integers_as_their_text() -> None:
    spec = FeatureSpec(categorical=("user_id", "item_id", "hour", "tab"), hash_buckets=2**20)
    batch = encode_rows([{"user_id": "u1", "item_id": 42, "features": {"hour": "13"}}], spec, ("click",))
    assert batch.categorical.tolist() == [[463853, 417413, 373104, 670898]]


def test_the_numeric_example_of_the_doc() -> None:
    spec = FeatureSpec(numeric=("d",))
    batch = encode_rows([{"user_id": "u", "item_id": "i", "features": {"d": 1000.0}},
                         {"user_id": "u", "item_id": "i", "features": {"d": -1e30}},
                         {"user_id": "u", "item_id": "i", "features": {"d": None}}], spec, ("click",))
    assert batch.numeric[:, 0].tolist() == pytest.approx([math.log1p(1000.0), -math.log1p(1e30), 0.0], rel=1e-6)
    normalizer = RunningNormalizer(1)
    normalizer.count.fill_(4)
    normalizer.mean.fill_(2.0)
    normalizer.m2.fill_(8.0)
    z = normalizer(batch.numeric)[:, 0].tolist()
    assert z[0] == pytest.approx(3.4710131, abs=1e-6) and z[1] == -8.0
    assert z[2] == pytest.approx((0.0 - 2.0) / math.sqrt(2.000001), abs=1e-6)
    assert torch.isfinite(normalizer(batch.numeric)).all()

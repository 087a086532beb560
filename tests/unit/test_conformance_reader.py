"""The docs-only reader (tests/conformance/reader.py) stays docs-only, and reads the docs' own examples right."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import msgpack
import pytest

from tests.conformance import reader

pytestmark = pytest.mark.unit

READER = Path(reader.__file__)
ALLOWED = {"__future__", "hashlib", "json", "math", "re", "struct", "time", "dataclasses", "pathlib", "typing",
           "msgpack", "numpy", "safetensors", "kafka"}


def test_the_conformance_reader_imports_nothing_of_the_project() -> None:
    tree = ast.parse(READER.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and imported <= ALLOWED, imported - ALLOWED


def test_the_reader_hashes_every_test_vector_of_features_md_as_printed() -> None:
    text = (reader.DOCS / "features.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (?:`([^`]*)`[^|]*|missing) \| `[^`]*` \| [0-9a-f]{16} \| \d+ \| (\d+) \| (\d+) \| "
                      r"(\d+) \|$", text, flags=re.M)
    assert len(rows) >= 6, rows
    for field_name, value, *buckets in rows:
        got = [reader.feature_row(field_name, value if value else None, size) for size in (2**10, 2**18, 2**20)]
        assert got == [int(b) for b in buckets], (field_name, value)


def test_a_chunk_with_a_flipped_byte_is_corrupt_and_its_manifest_then_misses_it() -> None:
    import numpy as np
    from safetensors.numpy import save

    payload = save({"w": np.arange(20, dtype=np.float32)})
    good = reader.encode(payload, {"step": 1}, version=1, chunk_size=16)
    bad = reader.encode(payload, {"step": 2}, version=2, chunk_size=16)
    chunk = msgpack.unpackb(bad[1][1], raw=False)
    chunk["data"] = bytes([chunk["data"][0] ^ 1]) + chunk["data"][1:]
    bad[1] = (bad[1][0], msgpack.packb(chunk, use_bin_type=True))
    topic = reader.TopicReader().feed_all(good + bad + good)
    assert [c.version for c in topic.accepted] == [1]
    assert [(r.code, r.version) for r in topic.rejections] == [("corrupt_chunk", 2), ("missing_chunk", 2),
                                                               ("stale_version", 1)]

"""A CSV read as columns (``streamer.datasets.columnar``) is what its rows say, to the last bit once encoded; a file
its rows would reject is left to them (``read_columns`` gives None, the rows raise their own error)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.tools.evaluate import feature_spec_for, load_encoded
from streamer.datasets.base import DatasetError
from streamer.datasets.columnar import read_columns
from streamer.datasets.tabular import TabularDataset, mapping_from_dict

pytestmark = pytest.mark.unit

SHARED = Path(__file__).resolve().parents[4] / "shared" / "data"

MAPPING = {
    "name": "messy", "user": "user", "item": "item", "time": "ts", "time_unit": "s",
    "categorical": ["city", "tag"], "numeric": ["watch"],
    "tasks": {"click": {"column": "click"}, "finish": {"column": "finish", "positive_at_least": 0.5,
                                                        "delay_column": "delay", "delay_unit": "s"}},
}
# quoted delimiters and line breaks, doubled quotes, empty cells everywhere, unsorted times with ties, blank lines,
# numbers as the rows parse them ("-0", "1e3", " 5 ", "1_000"), labels above and below a threshold, non-ASCII ids
MESSY = textwrap.dedent('''\
    user,item,ts,city,tag,watch,click,finish,delay,unused
    u1,i1,30,"Paris, FR","a ""quoted"" tag",12,1,0.7,2,x
    u2,i2,10,,"two
    lines",-0,0,0.2,,y

    u1,i3,20,Lyon,,1e3,,0.1,oops,
    ü3,i1,10,Lyon,b, 5 ,2,,,
    u2,i4,20,"",c,1_000,0.5,0.5,3,z
    u2,i4,15,Nice,c,,1,0.49,,z
''')


def dataset(path: Path, text: str, **overrides) -> TabularDataset:
    path.write_text(text, encoding="utf-8")
    return TabularDataset(path, mapping_from_dict({**MAPPING, **overrides}, origin="test"))


def both_reads(data: TabularDataset, tasks: tuple[str, ...], limit: int = 0) -> tuple:
    spec = feature_spec_for(data, [])
    return load_encoded(data, tasks, spec, limit), load_encoded(data, tasks, spec, limit, columnar=False)


def assert_same(a, b) -> None:  # noqa: ANN001
    for name in ("categorical", "numeric", "labels", "user"):
        x, y = getattr(a.batch, name), getattr(b.batch, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        same = torch.equal(x.view(torch.int32), y.view(torch.int32)) if x.dtype == torch.float32 else torch.equal(x, y)
        assert same, name  # float32 compared bit for bit (-0.0 is not 0.0 here)
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.users, b.users)
    assert np.array_equal(a.ts_ms, b.ts_ms) and a.ts_ms.dtype == b.ts_ms.dtype == np.int64


@pytest.mark.parametrize("limit", [0, 4])
def test_a_messy_csv_as_columns_is_its_rows_bit_for_bit(tmp_path: Path, limit: int) -> None:
    data = dataset(tmp_path / "messy.csv", MESSY)
    assert read_columns(data) is not None  # the columnar read took it ("oops" is the delay of a negative label)
    columns, rows = both_reads(data, ("click", "finish"), limit)
    assert_same(columns, rows)
    assert len(rows) == (limit or 6) and rows.ts_ms.tolist()[:3] == [10_000, 10_000, 15_000]


def test_a_tsv_without_a_header_and_tasks_in_another_order(tmp_path: Path) -> None:
    text = MESSY.split("\n", 1)[1].replace(",", "\t")  # (the quoted commas become tabs inside quotes: still cells)
    columns = ["user", "item", "ts", "city", "tag", "watch", "click", "finish", "delay", "unused"]
    data = dataset(tmp_path / "messy.tsv", text, header=False, columns=columns)
    assert read_columns(data) is not None
    assert_same(*both_reads(data, ("finish", "like", "click")))  # "like" is not a task of the file: all 0


@pytest.mark.parametrize("case, line", [
    ("a ragged row", "u9,i9,40,Lyon,a,1,1,1\n"),
    ("a time that is not a number", "u9,i9,soon,Lyon,a,1,1,1,1,\n"),
    ("a label that is not a number", "u9,i9,40,Lyon,a,1,yes,1,1,\n"),
    ("the delay of a positive label that is not a number", "u9,i9,40,Lyon,a,1,1,0.9,later,\n"),
])
def test_what_the_rows_reject_is_left_to_them(tmp_path: Path, case: str, line: str) -> None:
    data = dataset(tmp_path / "bad.csv", MESSY + line)
    assert read_columns(data) is None, case
    with pytest.raises((DatasetError, ValueError)):
        list(data.interactions())


def test_an_out_of_order_file_said_to_be_sorted_is_left_to_the_rows(tmp_path: Path) -> None:
    data = dataset(tmp_path / "sorted.csv", MESSY, assume_sorted=True)
    assert read_columns(data) is None
    with pytest.raises(DatasetError, match="comes after one at"):
        list(data.interactions())
    in_order = MESSY.splitlines()[0] + "\nu1,i1,10,a,b,1,1,1,1,\nu2,i1,10,,,,,,,\nu1,i2,11,\"a,b\",c,2,0,0,,\n"
    data = dataset(tmp_path / "in_order.csv", in_order, assume_sorted=True)
    assert read_columns(data) is not None
    assert_same(*both_reads(data, ("click",)))


def test_parquet_is_read_by_rows(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"user": ["u1"], "item": ["i1"], "ts": [1], "city": ["x"], "tag": ["y"], "watch": [1.5],
                             "click": [1], "finish": [0.0], "delay": [None]}), path)
    assert read_columns(TabularDataset(path, mapping_from_dict(MAPPING, origin="test"))) is None


@pytest.mark.skipif(not (SHARED / "kuairand").is_dir(), reason="needs ../shared/data/kuairand")
def test_kuairand_as_columns_is_its_rows() -> None:
    from streamer.datasets.tabular import open_tabular

    root = Path(__file__).resolve().parents[3]
    data = open_tabular(SHARED / "kuairand" / "kuairand27k_like_hate_kcore15.tsv", root / "mappings" / "kuairand.toml")
    assert read_columns(data) is not None
    assert_same(*both_reads(data, data.tasks))


def test_the_load_bench_reads_both_ways_and_finds_them_equal(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import importlib.util
    import json

    path = tmp_path / "messy.csv"
    path.write_text(MESSY, encoding="utf-8")
    mapping = tmp_path / "messy.toml"
    mapping.write_text(textwrap.dedent('''\
        name = "messy"
        user = "user"
        item = "item"
        time = "ts"
        time_unit = "s"
        categorical = ["city", "tag"]
        numeric = ["watch"]
        [tasks.click]
        column = "click"
    '''), encoding="utf-8")
    script = Path(__file__).resolve().parents[3] / "bench" / "evaluate_load.py"
    spec = importlib.util.spec_from_file_location("bench_evaluate_load", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(path), str(mapping), "--rounds", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["events"] == 6 and result["same_arrays"] and len(result["seconds"]["rows"]) == 2


def test_privileged_columns_are_read_both_ways_apart_from_the_features(tmp_path: Path) -> None:
    from consumers.tools.evaluate import privileged_spec

    data = dataset(tmp_path / "messy.csv", MESSY.replace("oops", "4"), numeric=[], privileged=["watch", "delay"])
    assert data.privileged_features == ("watch", "delay")
    first = next(iter(data.interactions()))
    assert "watch" not in first.features and first.privileged == {"watch": 0}  # never an impression's feature
    spec = feature_spec_for(data, [])
    assert spec.numeric == ()  # the student's spec does not name them
    teacher = privileged_spec(data, spec, "delay")
    assert teacher.numeric == ("delay",)
    columns, rows = (load_encoded(data, ("click",), teacher), load_encoded(data, ("click",), teacher, columnar=False))
    assert_same(columns, rows)
    assert float(columns.batch.numeric.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"\['unused'\] are not privileged columns of 'messy'"):
        privileged_spec(data, spec, ["unused"])
    with pytest.raises(ValueError, match=r"\['city'\] are features too"):
        privileged_spec(data, spec, ["city"])
    bad = dataset(tmp_path / "bad.csv", MESSY, numeric=[], privileged=["delay"])
    with pytest.raises(DatasetError, match="data row 2: 'oops' in column 'delay' .mapping key 'privileged'. is not a"):
        list(bad.interactions())


def test_a_column_cannot_be_a_feature_and_privileged() -> None:
    from streamer.datasets.tabular import MappingError

    with pytest.raises(MappingError, match=r"\['watch'\] are listed as features and as privileged"):
        mapping_from_dict({**MAPPING, "privileged": ["watch"]}, origin="test")

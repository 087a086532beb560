"""A CSV read as columns (``streamer.datasets.columnar``) is what its rows say, to the last bit once encoded; a file
its rows would reject is left to them (``read_columns`` gives None, the rows raise their own error)."""

from __future__ import annotations

import re
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


def _cases() -> list:  # (what, a data row appended to MESSY (data row 6), what the error says after "data row 6: ")
    row = "u9,i9,40,Lyon,a,{watch},{click},{finish},{delay},\n"

    def line(**cells: str) -> str:
        return row.format(**{"watch": "1", "click": "1", "finish": "0.9", "delay": "1", **cells})

    numeric, click, finish = "in column 'watch' (mapping key 'numeric')", "in column 'click' (mapping key " \
        "'tasks.click.column')", "in column 'finish' (mapping key 'tasks.finish.column')"
    delay = "in column 'delay' (mapping key 'tasks.finish.delay_column')"
    return [
        ("a NaN numeric feature", line(watch="nan"), f"'nan' {numeric} is not a finite number"),
        ("an infinite numeric feature", line(watch="-inf"), f"'-inf' {numeric} is not a finite number"),
        ("a numeric feature past float64", line(watch="1e400"), f"'1e400' {numeric} is not a finite number"),
        ("an integer past 64 bits", line(watch=str(2**64)), f"'{2**64}' {numeric} is an integer that does not fit"),
        ("a NaN label", line(click="nan"), f"'nan' {click} is not a finite number"),
        ("an infinite label", line(finish="inf"), f"'inf' {finish} is not a finite number"),
        ("a text label", line(click="yes"), f"'yes' {click} is not a number"),
        ("a text delay of a positive label", line(delay="later"), f"'later' {delay} is not a number"),
        ("a NaN delay of a positive label", line(delay="nan"), f"'nan' {delay} is not a finite number"),
        ("a delay that overflows in its unit", line(delay="1e307"), f"delay '1e307' {delay} overflows in unit 's'"),
        ("an empty user id", line().replace("u9", ""), "column 'user' (mapping key 'user', the impression's user_id): "
                                                       "must not be empty"),
        ("an empty item id", line().replace("i9", ""), "column 'item' (mapping key 'item', the impression's item_id): "
                                                       "must not be empty"),
        ("an infinite time", line().replace(",40,", ",inf,"), "time 'inf' in column 'ts' is not a time in unit 's'"),
        ("a time past the year 9999", line().replace(",40,", ",1e30,"), "time '1e30' in column 'ts' is after the year "
                                                                        "9999 in unit 's'"),
        ("a time before 1970", line().replace(",40,", ",-5,"), "time '-5' in column 'ts' is before 1970"),
    ]


@pytest.mark.parametrize("case, line, message", _cases(), ids=[case[0] for case in _cases()])
def test_evaluate_and_stream_refuse_a_bad_cell_naming_the_file_the_row_and_the_column(
        tmp_path: Path, case: str, line: str, message: str) -> None:
    data = dataset(tmp_path / "bad.csv", MESSY + line)
    said = re.escape(f"{tmp_path / 'bad.csv'} data row 6: {message}")
    assert read_columns(data) is None, case  # the columns leave it to the rows, which say where
    with pytest.raises(DatasetError, match=said):
        load_encoded(data, ("click", "finish"), feature_spec_for(data, []))  # crossdistil evaluate
    with pytest.raises(DatasetError, match=said):
        list(data.interactions())  # crossdistil stream


def test_a_label_is_any_finite_number_read_against_its_threshold(tmp_path: Path) -> None:
    data = dataset(tmp_path / "labels.csv", MESSY.replace(",2,,,", ",-1,,,").replace("0.7,2,x", "70,2,x"))
    assert read_columns(data) is not None  # -1 and 70 are labels (play time against a threshold, say), not errors
    columns, rows = both_reads(data, ("click", "finish"))
    assert_same(columns, rows)
    by_user = {(r.user_id, r.ts_ms): r.labels for r in data.interactions()}
    assert by_user[("ü3", 10_000)]["click"] == 0 and by_user[("u1", 30_000)]["finish"] == 1


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + MESSY.encode("utf-8"))
    data = TabularDataset(path, mapping_from_dict(MAPPING, origin="test"))  # its column 'user' is found
    assert read_columns(data) is not None
    assert_same(*both_reads(data, ("click", "finish")))
    path.write_bytes(b"\xef\xbb\xbf" + MESSY.split("\n", 1)[1].encode("utf-8"))
    names = ["user", "item", "ts", "city", "tag", "watch", "click", "finish", "delay", "unused"]
    data = TabularDataset(path, mapping_from_dict({**MAPPING, "header": False, "columns": names}, origin="test"))
    assert read_columns(data) is not None
    columns, rows = both_reads(data, ("click",))
    assert_same(columns, rows)
    assert "u1" in set(rows.users)


def test_a_file_that_is_not_utf8_is_refused_naming_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    rows = MESSY + "u1,i1,30,Lyon,a,1,1,1,1,\n" * 2000 + "u1,i1,30,Nîmes,a,1,1,1,1,\n"  # past the header's first block
    path.write_bytes(rows.encode("utf-8").replace("Nîmes".encode("utf-8"), "Nîmes".encode("latin-1")))
    data = TabularDataset(path, mapping_from_dict(MAPPING, origin="test"))
    said = re.escape(f"{path} line 2010: byte 0xee is not UTF-8")
    with pytest.raises(DatasetError, match=said):
        load_encoded(data, ("click",), feature_spec_for(data, []))
    with pytest.raises(DatasetError, match=said):
        list(data.interactions())
    path.write_bytes("user,item,ts,city,tag,wätch\n".encode("latin-1"))
    with pytest.raises(DatasetError, match=re.escape(f"{path} line 1: byte 0xe4 is not UTF-8")):
        TabularDataset(path, mapping_from_dict(MAPPING, origin="test"))


def test_an_adapter_that_adds_to_each_row_is_read_by_its_rows(tmp_path: Path) -> None:
    class WithHour(TabularDataset):  # as kuairand adds hour and weekday to the mapping's columns
        def _interaction(self, row_index, row):  # noqa: ANN001, ANN202
            record = super()._interaction(row_index, row)
            record.features["hour"] = str(record.ts_ms // 3_600_000)
            return record

    path = tmp_path / "messy.csv"
    path.write_text(MESSY, encoding="utf-8")
    data = WithHour(path, mapping_from_dict(MAPPING, origin="test"))
    data.categorical_features = (*data.categorical_features, "hour")
    assert read_columns(data) is None
    assert_same(*both_reads(data, ("click",)))

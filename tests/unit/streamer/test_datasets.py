"""Data set adapters: the real KuaiRand and ICME files, the csv mapping adapter and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.datasets import DatasetError, open_dataset
from streamer.datasets.kuairand import local_hour_and_weekday
from streamer.datasets.tabular import MappingError, load_mapping, to_epoch_ms

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
KUAIRAND_FILE = "kuairand/kuairand27k_like_hate_kcore15.tsv"
ICME_FILE = "icme2019/icme2019_track2_sample_1000.tsv"
OUTCOME_COLUMNS = {"play_time_ms", "comment_stay_time", "is_click", "is_follow", "is_comment", "is_forward",
                   "long_view", "is_profile_enter", "label", "timestamp"}


@pytest.fixture(scope="module")
def kuairand():
    data = REPO.parent / "shared" / "data"
    if not (data / KUAIRAND_FILE).is_file():
        pytest.skip(f"real data not available: {data / KUAIRAND_FILE} does not exist")
    dataset = open_dataset("kuairand", data / "kuairand")
    return dataset, list(dataset.interactions())


def positives(records, task: str) -> int:
    return sum(r.labels[task] for r in records)


# -- kuairand ---------------------------------------------------------------------------------------------
def test_kuairand_yields_every_row_once_in_time_order(kuairand) -> None:
    _, records = kuairand
    assert len(records) == 41_828
    assert len({r.impression_id for r in records}) == 41_828
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(records, records[1:]))


def test_kuairand_breaks_time_ties_by_file_row(kuairand) -> None:
    _, records = kuairand
    tied = [(a, b) for a, b in zip(records, records[1:]) if a.ts_ms == b.ts_ms]
    assert tied, "the file has rows with equal time_ms"
    assert all(int(a.impression_id[3:]) < int(b.impression_id[3:]) for a, b in tied)


def test_kuairand_label_counts_match_the_readme(kuairand) -> None:
    dataset, records = kuairand
    assert dataset.tasks == ("click", "long_view", "like")
    assert {t: positives(records, t) for t in dataset.tasks} == {"click": 27_484, "long_view": 19_320, "like": 33_745}


def test_kuairand_features_are_known_at_impression_time_only(kuairand) -> None:
    dataset, records = kuairand
    names = set().union(*(r.features for r in records))
    assert names == {"hour", "weekday", "duration_ms"}
    assert not names & OUTCOME_COLUMNS
    assert set(dataset.categorical_features) | set(dataset.numeric_features) == names


def test_kuairand_feedback_delays_follow_the_watch_time(kuairand) -> None:
    _, records = kuairand
    first = next(r for r in records if r.impression_id == "kr-0")  # file row 0: play_time_ms 46186, all positive
    assert first.feedback_delay_ms == {"click": 1000, "long_view": 46_186, "like": 48_186}
    for record in records:
        assert set(record.feedback_delay_ms) == {t for t, y in record.labels.items() if y}
        assert all(delay >= 0 for delay in record.feedback_delay_ms.values())


def test_kuairand_hour_and_weekday_are_beijing_local_time() -> None:
    # 2022-04-10 08:59:09 UTC = 16:59 in Beijing, a Sunday (weekday 6)
    assert local_hour_and_weekday(1649581149287) == (16, 6)


def test_kuairand_mapping_file_gives_the_built_in_labels_delays_and_ids(kuairand, shared_data: Path) -> None:
    _, builtin = kuairand
    mapped = list(open_dataset("csv", shared_data / KUAIRAND_FILE, mapping=REPO / "mappings" / "kuairand.toml")
                  .interactions())
    assert [(r.impression_id, r.labels, r.feedback_delay_ms, r.ts_ms) for r in mapped] == \
           [(r.impression_id, r.labels, r.feedback_delay_ms, r.ts_ms) for r in builtin]


# -- icme2019 ---------------------------------------------------------------------------------------------
def test_icme2019_reads_the_sample_in_time_order_with_its_label_rates(shared_data: Path) -> None:
    dataset = open_dataset("icme2019", shared_data / "icme2019")
    records = list(dataset.interactions())
    assert len(records) == 1000
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(records, records[1:]))
    assert dataset.tasks == ("finish", "like")
    assert (positives(records, "finish"), positives(records, "like")) == (367, 12)
    assert not set().union(*(r.features for r in records)) & {"finish", "like", "time"}


def test_icme2019_time_is_seconds_and_finish_arrives_after_the_video(shared_data: Path) -> None:
    record = next(r for r in open_dataset("icme2019", shared_data / ICME_FILE).interactions()
                  if r.impression_id == "icme-0")  # time 53085993699, duration 39 s, not finished
    assert record.ts_ms == 53_085_993_699_000
    assert record.features["duration_time"] == 39
    finished = next(r for r in open_dataset("icme2019", shared_data / ICME_FILE).interactions() if r.labels["finish"])
    assert finished.feedback_delay_ms["finish"] == finished.features["duration_time"] * 1000


def test_icme2019_mapping_file_equals_the_built_in_adapter(shared_data: Path) -> None:
    builtin = list(open_dataset("icme2019", shared_data / ICME_FILE).interactions())
    mapped = list(open_dataset("csv", shared_data / ICME_FILE, mapping=REPO / "mappings" / "icme2019.toml")
                  .interactions())
    assert mapped == builtin


# -- csv adapter and its mapping --------------------------------------------------------------------------
MINIMAL = """
user = "u"
item = "i"
time = "t"
time_unit = "s"
categorical = ["city"]
numeric = ["price"]
[tasks.buy]
column = "bought"
delay_column = "wait"
delay_unit = "s"
delay_ms = 500
[tasks.watch]
column = "seconds"
positive_at_least = 30
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_adapter_reads_labels_thresholds_delays_and_features(tmp_path: Path) -> None:
    mapping = write(tmp_path / "m.toml", MINIMAL)
    source = write(tmp_path / "d.csv", "u,i,t,city,price,bought,wait,seconds\n"
                                       "a,x,20,paris,9.5,1,2,31\n"
                                       "b,y,10,,3,0,,29\n")
    records = list(open_dataset("csv", source, mapping=mapping).interactions())
    assert [r.impression_id for r in records] == ["m-1", "m-0"]  # sorted by time; ids are file rows
    later = records[1]
    assert (later.user_id, later.item_id, later.ts_ms) == ("a", "x", 20_000)
    assert later.features == {"city": "paris", "price": 9.5}
    assert later.labels == {"buy": 1, "watch": 1}
    assert later.feedback_delay_ms == {"buy": 2500, "watch": 0}
    assert records[0].features == {"price": 3}  # empty cell: feature left out
    assert records[0].labels == {"buy": 0, "watch": 0}  # 29 < positive_at_least 30


def test_csv_adapter_reads_parquet_and_iso_times(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "d.parquet"
    pq.write_table(pa.table({"u": ["a", "b"], "i": ["x", "y"],
                             "t": ["2024-01-01T00:00:01", "2024-01-01T00:00:00+00:00"], "y": [1, 0]}), source)
    mapping = {"name": "pq", "user": "u", "item": "i", "time": "t", "time_unit": "iso", "tasks": {"y": {"column": "y"}}}
    records = list(open_dataset("csv", source, mapping=mapping).interactions())
    assert [r.ts_ms for r in records] == [1_704_067_200_000, 1_704_067_201_000]
    assert [r.labels["y"] for r in records] == [0, 1]


def test_csv_adapter_with_assume_sorted_rejects_an_out_of_order_row(tmp_path: Path) -> None:
    mapping = write(tmp_path / "m.toml", "assume_sorted = true\n" + MINIMAL)
    source = write(tmp_path / "d.csv", "u,i,t,city,price,bought,wait,seconds\na,x,20,p,1,0,0,0\nb,y,10,p,1,0,0,0\n")
    with pytest.raises(DatasetError, match="not in time order"):
        list(open_dataset("csv", source, mapping=mapping).interactions())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.replace('user = "u"\n', ""), r"missing key 'user'"),
        (lambda m: m.replace('time_unit = "s"', 'time_unit = "fortnight"'), r"time_unit 'fortnight'"),
        (lambda m: m.replace('column = "bought"\n', ""), r"missing key 'tasks.buy.column'"),
        (lambda m: m.replace("[tasks.watch]", "[tasks.watch]\nthreshold = 3"), r"tasks.watch has unknown key"),
        (lambda m: "header = false\n" + m, r"header = false needs 'columns'"),
        (lambda m: "= broken\n" + m, r"not valid TOML"),
        (lambda m: m.split("[tasks.buy]")[0], r"missing key 'tasks'"),
        # a value of the wrong TOML type is refused, not coerced (bool("false") is True)
        (lambda m: m.replace("at_least = 30", 'at_least = "30"'), r"'tasks.watch.positive_at_least' must be a number"),
        (lambda m: 'assume_sorted = "false"\n' + m, r"'assume_sorted' must be true or false .*got 'false'"),
        (lambda m: 'header = "no"\n' + m, r"'header' must be true or false"),
        (lambda m: m.replace("delay_ms = 500", 'delay_ms = "1s"'), r"'tasks.buy.delay_ms' must be a number of millis"),
        (lambda m: m.replace("delay_ms = 500", "delay_ms = -500"), r"'tasks.buy.delay_ms' .* 0 or more; got -500"),
        (lambda m: m.replace('delay_unit = "s"', 'delay_unit = ["s"]'), r"delay_unit '\['s'\]' is not one of"),
        (lambda m: m.replace('user = "u"', "user = 5"), r"'user' must be a column name \(a string\), got 5"),
        (lambda m: 'columns = "uit"\n' + m, r"'columns' must be a list of column names"),
        (lambda m: 'delimiter = ";;"\n' + m, r"'delimiter' must be one character"),
    ],
)
def test_csv_mapping_errors_name_the_key(tmp_path: Path, edit, message: str) -> None:
    with pytest.raises(MappingError, match=message):
        load_mapping(write(tmp_path / "m.toml", edit(MINIMAL)))


def test_csv_mapping_error_names_a_missing_column_and_lists_the_present_ones(tmp_path: Path) -> None:
    mapping = write(tmp_path / "m.toml", MINIMAL)
    source = write(tmp_path / "d.csv", "u,i,t,city,price,bought,seconds\n")
    with pytest.raises(MappingError, match=r"column 'wait' \(mapping key 'tasks.buy.delay_column'\).*its columns are"):
        open_dataset("csv", source, mapping=mapping)


@pytest.mark.parametrize("cell", ["inf", "-inf", "nan", "1e400"])
def test_a_time_that_is_not_a_finite_number_is_a_value_error(cell: str) -> None:
    with pytest.raises(ValueError, match="is not a finite number"):  # not int(inf)'s OverflowError
        to_epoch_ms(cell, "ms")


def test_csv_header_with_a_repeated_column_is_refused_naming_it(tmp_path: Path) -> None:
    mapping = write(tmp_path / "m.toml", MINIMAL)
    source = write(tmp_path / "d.csv", "u,i,t,city,price,bought,wait,seconds,bought\na,x,20,p,1,0,0,0,1\n")
    with pytest.raises(DatasetError, match=r"column 'bought' appears twice in the header of .*d.csv"):
        open_dataset("csv", source, mapping=mapping)  # a row's dict would keep the second 'bought' as the label
    mapping = write(tmp_path / "m.toml", 'header = false\ncolumns = ["u", "i", "t", "u"]\n' + MINIMAL)
    with pytest.raises(DatasetError, match=r"column 'u' appears twice in the mapping's 'columns'"):
        open_dataset("csv", source, mapping=mapping)


def test_csv_mapping_takes_toml_booleans_and_a_float_delay(tmp_path: Path) -> None:
    text = "assume_sorted = false\nheader = true\n" + MINIMAL.replace("delay_ms = 500", "delay_ms = 500.0")
    mapping = load_mapping(write(tmp_path / "m.toml", text))
    assert (mapping.assume_sorted, mapping.header, mapping.tasks[0].delay_ms) == (False, True, 500)


def test_csv_dataset_without_a_mapping_says_to_pass_one(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="--mapping"):
        open_dataset("csv", write(tmp_path / "d.csv", "a\n"))


def test_open_dataset_rejects_unknown_names_and_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown data set 'nope'"):
        open_dataset("nope", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset("kuairand", tmp_path / "missing.tsv")


def test_a_mapping_is_refused_for_a_data_set_with_its_own_columns_and_a_folder_is_not_a_mapping(tmp_path: Path) -> None:
    for name in ("kuairand", "synthetic", "icme2019"):
        with pytest.raises(DatasetError, match=f"data set '{name}' has its own columns: a mapping is for --dataset"):
            open_dataset(name, tmp_path, mapping=REPO / "mappings" / "kuairand.toml")
    with pytest.raises(DatasetError, match=f"mapping file {tmp_path} is a folder, not a TOML file"):
        open_dataset("csv", tmp_path, mapping=tmp_path)
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(DatasetError, match="latin1.toml is not UTF-8 text"):
        open_dataset("csv", tmp_path, mapping=tmp_path / "latin1.toml")

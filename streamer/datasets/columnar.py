"""A CSV or TSV file of the ``csv`` adapter read whole, as columns: what ``interactions()`` yields, column by column.

``crossdistil evaluate`` encodes a whole data set at once. Building one ``Interaction`` per row (a dict of features
each) and then taking the features back out of every dict was most of its start on KuaiRand-Pure (228k rows x 36
features: ~9 of ~10 s). pyarrow's CSV reader hands over the cells column by column instead, each categorical column
as its distinct values and one code per row, and this module derives from them exactly what the row path yields:
the same strings, numbers, labels, times and order (``tests/unit/streamer/test_columnar.py`` holds the two equal on
messy files). Whatever the row path would reject (a ragged row, a time, label, delay or number that does not parse or
is not finite, a time before 1970 or past the year 9999, an empty user or item id, an out-of-order row of an
``assume_sorted`` file, bytes that are not UTF-8) makes ``read_columns`` return None: the caller then reads the rows,
which raise their own error, naming the row and the column. The checks here are the rows' own functions
(``_number``, ``_finite_float``, ``to_epoch_ms``) run once per distinct cell, or numpy over a whole column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamer.datasets.base import DatasetError
from streamer.datasets.tabular import TIME_UNITS_MS, TabularDataset, _finite_float, _is_empty, _number, to_epoch_ms
from streamer.events import TS_MAX_MS


@dataclass
class Factorized:
    """A column of strings as its distinct ``values`` and one index into them per row (``codes``, int64)."""

    values: list[str]
    codes: np.ndarray

    def strings(self) -> np.ndarray:
        """Every row's string (a numpy unicode array)."""
        return np.asarray(self.values, dtype=str)[self.codes] if self.values else np.full(len(self.codes), "")


@dataclass
class TabularColumns:
    """A data set's interactions in time order, by column.

    ``user_id`` and ``item_id``: the ids as the rows hold them (strings). ``categorical``: each categorical feature's
    cells, "" for an empty cell (the row path leaves that feature out, which encodes as ""). ``numeric``: float64,
    0.0 for an empty cell (the row path leaves it out, which encodes as 0). ``labels``: 0/1 per task (int64).
    ``privileged``: the mapping's privileged columns like ``numeric``.
    """

    user_id: Factorized
    item_id: Factorized
    ts_ms: np.ndarray
    categorical: dict[str, Factorized]
    numeric: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    privileged: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def head(self, n: int) -> TabularColumns:
        """The first ``n`` interactions (in time order)."""
        def cut(column: Factorized) -> Factorized:
            return Factorized(column.values, column.codes[:n])
        return TabularColumns(cut(self.user_id), cut(self.item_id), self.ts_ms[:n],
                              {k: cut(v) for k, v in self.categorical.items()},
                              {k: v[:n] for k, v in self.numeric.items()}, {k: v[:n] for k, v in self.labels.items()},
                              {k: v[:n] for k, v in self.privileged.items()})


def read_columns(dataset: Any) -> TabularColumns | None:
    """``dataset``'s interactions as columns, or None where only its rows can say what the file holds (another
    adapter than ``csv``, a Parquet file, anything the row path would reject: see the module docstring)."""
    if not isinstance(dataset, TabularDataset) or dataset.format not in ("csv", "tsv"):
        return None
    if type(dataset)._interaction is not TabularDataset._interaction:
        return None  # an adapter that adds to each row (kuairand's hour and weekday): only its rows have that
    try:
        return _columns(dataset, _read_table(dataset))
    except (DatasetError, KeyError, ValueError, TypeError, OverflowError, UnicodeDecodeError):
        return None  # (pyarrow's errors are ValueErrors: ArrowInvalid, ArrowTypeError)


def _read_table(dataset: TabularDataset) -> Any:
    """The cells the mapping uses, as strings: the row path's ``csv.reader`` (quotes doubled inside a quoted cell,
    quoted line breaks, empty lines skipped, empty cells as "")."""
    import pyarrow as pa  # lazy: only a columnar read needs pyarrow
    import pyarrow.csv as pcsv

    m = dataset.mapping
    names = list(dataset._column_names)  # no name twice: TabularDataset refuses a repeated one
    used = [m.user, m.item, m.time, *m.categorical, *m.numeric, *m.privileged, *(t.column for t in m.tasks),
            *(t.delay_column for t in m.tasks if t.delay_column is not None)]
    used = list(dict.fromkeys(used))
    return pcsv.read_csv(
        dataset.source,
        read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if m.header else 0),
        parse_options=pcsv.ParseOptions(delimiter=dataset._delimiter(), quote_char='"', double_quote=True,
                                        escape_char=False, newlines_in_values=True, ignore_empty_lines=True),
        convert_options=pcsv.ConvertOptions(column_types={name: pa.string() for name in used}, include_columns=used,
                                            strings_can_be_null=False, check_utf8=True))


def _factorized(table: Any, name: str) -> Factorized:
    encoded = table.column(name).combine_chunks().dictionary_encode()
    return Factorized(encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64))


def _cells_as(factorized: Factorized, convert: Any, dtype: Any) -> np.ndarray:
    """``convert`` of every distinct cell, spread over the rows."""
    return np.array([convert(value) for value in factorized.values], dtype=dtype)[factorized.codes] \
        if factorized.values else np.zeros(len(factorized.codes), dtype=dtype)


def _columns(dataset: TabularDataset, table: Any) -> TabularColumns:
    m = dataset.mapping
    ts = _cells_as(_factorized(table, m.time), lambda cell: to_epoch_ms(cell, m.time_unit), np.int64)
    if len(ts) and (ts.min() < 0 or ts.max() > TS_MAX_MS):
        raise DatasetError("a time before 1970 or after the year 9999")
    if m.assume_sorted:
        if len(ts) > 1 and bool((ts[1:] < ts[:-1]).any()):
            raise DatasetError("out of time order")  # the rows say where, in their own words
    else:
        order = np.argsort(ts, kind="stable")  # sorted(records, key=ts_ms) is stable too
        if bool((order != np.arange(len(order))).any()):
            table, ts = table.take(order), ts[order]
    labels = {}
    for task in m.tasks:
        value = _cells_as(_factorized(table, task.column),
                          lambda cell: 0.0 if _is_empty(cell) else _finite_float(cell), np.float64)
        at_least = task.positive_at_least
        positive = (value >= at_least) if at_least is not None else (value > 0)
        if task.delay_column is not None:  # the rows parse the delay of every positive label: so must this
            delay = _factorized(table, task.delay_column)
            for code in np.unique(delay.codes[positive]):
                cell = delay.values[code]
                if not _is_empty(cell) and not math.isfinite(task.delay_ms + _finite_float(cell)
                                                             * TIME_UNITS_MS[task.delay_unit]):
                    raise DatasetError("a delay that overflows")
        labels[task.name] = positive.astype(np.int64)

    def number(cell: str) -> float:  # an empty cell leaves the feature out: encoded as 0
        return 0.0 if _is_empty(cell) else float(_number(cell))

    def numbers(names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {name: _cells_as(_factorized(table, name), number, np.float64) for name in names}

    user_id, item_id = _factorized(table, m.user), _factorized(table, m.item)
    if "" in user_id.values or "" in item_id.values:
        raise DatasetError("an empty user or item id")
    return TabularColumns(
        user_id=user_id, item_id=item_id, ts_ms=ts,
        categorical={name: _factorized(table, name) for name in m.categorical},
        numeric=numbers(m.numeric), labels=labels, privileged=numbers(m.privileged))

"""The generic ``csv`` adapter: CSV, TSV or Parquet files described by a TOML column mapping.

A new data set needs a mapping file, not code. Every key, with an example (``mappings/*.toml`` ship more)::

    name = "mydata"                 # data set name (default: the mapping file's stem)
    format = "csv"                  # csv | tsv | parquet (default: from the source's extension)
    delimiter = ","                 # optional; default "," for csv and "\\t" for tsv
    header = true                   # does the first line name the columns? (csv/tsv; default true)
    columns = ["uid", "iid", ...]   # column names, required when header = false (they replace a header)
    user = "uid"                    # user id column            (required)
    item = "iid"                    # item id column            (required)
    time = "ts"                     # impression time column    (required)
    time_unit = "s"                 # s | ms | us | ns | iso    (required; iso = ISO 8601, naive means UTC)
    impression_id = "imp"           # optional column; default "<impression_id_prefix>-<data row index>"
    impression_id_prefix = "my"     # default: name
    categorical = ["city", "device"]  # categorical features (passed as str)
    numeric = ["duration"]          # numeric features (passed as int or float, raw)
    privileged = ["play_time"]      # optional: numeric outcomes known only after the impression, never features;
                                    # a privileged teacher reads them in `crossdistil evaluate` (models/privileged.py)
    assume_sorted = false           # true: the file is already in time order; stream it lazily (an
                                    # out-of-order row is an error). false (default): read all rows and
                                    # sort stably by time (ties keep file order).

    [tasks.finish]                  # one table per task, in task order
    column = "finish"               # label column (required)
    positive_at_least = 1           # optional: positive when value >= this; default: positive when value > 0
    delay_column = "duration"       # optional: feedback delay read from this column ...
    delay_unit = "s"                # ... in this unit (s | ms | us | ns; default ms) ...
    delay_ms = 1000                 # ... plus this fixed delay in ms (default 0; alone = a fixed delay)

Row conventions: an empty label cell is a 0; an empty feature cell leaves that feature out of the
impression; a negative or empty delay counts as 0 (feedback at impression time). Any finite number is a label
(positive above 0, or at ``positive_at_least``). Refused, naming the file, the data row and the column: a repeated
column name, an empty user or item id, a time outside 1970 to the year 9999 (what an event may carry), and a
label, delay or numeric cell that is not a finite number (``nan``, ``inf``, ``1e400``, text; a numeric integer
must also fit in 64 bits). Files are UTF-8; a byte-order mark at the start is skipped.
"""

from __future__ import annotations

import csv
import math
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from streamer.datasets.base import DatasetError, FeatureValue, Interaction
from streamer.events import TS_MAX_MS

TIME_UNITS_MS: dict[str, float] = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # the integers an event's msgpack carries (int64 .. uint64)
FORMATS = ("csv", "tsv", "parquet")

_TOP_LEVEL_KEYS = {
    "name", "format", "delimiter", "header", "columns", "user", "item", "time", "time_unit", "impression_id",
    "impression_id_prefix", "categorical", "numeric", "privileged", "assume_sorted", "tasks",
}
_TASK_KEYS = {"column", "positive_at_least", "delay_column", "delay_unit", "delay_ms"}


class MappingError(DatasetError):
    """A mapping file is invalid or does not fit its source (missing key, unknown unit, missing column)."""


@dataclass(frozen=True)
class TaskMapping:
    """How one task's label and feedback delay are read from a row."""

    name: str
    column: str
    positive_at_least: float | None = None
    delay_column: str | None = None
    delay_unit: str = "ms"
    delay_ms: int = 0


@dataclass(frozen=True)
class ColumnMapping:
    """A parsed mapping file: which columns are user, item, time, tasks and features."""

    name: str
    user: str
    item: str
    time: str
    time_unit: str
    tasks: tuple[TaskMapping, ...]
    format: str | None = None
    delimiter: str | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    impression_id: str | None = None
    impression_id_prefix: str | None = None
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    privileged: tuple[str, ...] = ()  # outcomes known after the impression: a privileged teacher's inputs only
    assume_sorted: bool = False


def load_mapping(path: str | Path) -> ColumnMapping:
    """Read a TOML mapping file; errors name the file and the missing or bad key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"mapping file {path} does not exist") from None
    except IsADirectoryError:
        raise MappingError(f"mapping file {path} is a folder, not a TOML file") from None
    except UnicodeDecodeError as exc:
        raise MappingError(f"mapping file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"mapping file {path} is not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    return mapping_from_dict(raw, origin=str(path))


def mapping_from_dict(raw: dict[str, Any], origin: str = "mapping") -> ColumnMapping:
    """Validate a mapping given as a dict (the parsed TOML); ``origin`` names it in error messages."""

    def str_list(key: str) -> tuple[str, ...]:
        value = raw.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise MappingError(f"{origin}: '{key}' must be a list of column names")
        return tuple(value)

    unknown = set(raw) - _TOP_LEVEL_KEYS
    if unknown:
        raise MappingError(f"{origin}: unknown key(s) {sorted(unknown)}; known keys: {sorted(_TOP_LEVEL_KEYS)}")
    time_unit = _need(raw, "time_unit", "unit of the time column: s, ms, us, ns or iso", origin)
    if not isinstance(time_unit, str) or time_unit not in (*TIME_UNITS_MS, "iso"):
        raise MappingError(f"{origin}: time_unit '{time_unit}' is not one of s, ms, us, ns, iso")
    fmt = raw.get("format")
    if fmt is not None and (not isinstance(fmt, str) or fmt not in FORMATS):
        raise MappingError(f"{origin}: format '{fmt}' is not one of {', '.join(FORMATS)}")
    tasks_raw = _need(raw, "tasks", "one [tasks.NAME] table per task, each with a label 'column'", origin)
    if not isinstance(tasks_raw, dict) or not tasks_raw:
        raise MappingError(f"{origin}: 'tasks' must hold at least one [tasks.NAME] table")
    tasks = tuple(_task_mapping(task_name, table, origin) for task_name, table in tasks_raw.items())
    columns = str_list("columns") if raw.get("columns") is not None else None
    delimiter = _optional_text(raw, "delimiter", origin)
    if delimiter is not None and len(delimiter) != 1:
        raise MappingError(f"{origin}: 'delimiter' must be one character (e.g. \",\" or \"\\t\"), got {delimiter!r}")
    header = _flag(raw, "header", True, origin)
    if not header and columns is None:
        raise MappingError(f"{origin}: header = false needs 'columns' (the column names, in file order)")
    return ColumnMapping(
        name=str(raw.get("name", "csv")),
        user=_column_key(raw, "user", "the user id column", origin),
        item=_column_key(raw, "item", "the item id column", origin),
        time=_column_key(raw, "time", "the impression time column", origin),
        time_unit=time_unit,
        tasks=tasks,
        format=fmt,
        delimiter=delimiter,
        header=header,
        columns=columns,
        impression_id=_optional_text(raw, "impression_id", origin),
        impression_id_prefix=_optional_text(raw, "impression_id_prefix", origin),
        categorical=str_list("categorical"),
        numeric=str_list("numeric"),
        privileged=_privileged(str_list("privileged"), str_list("categorical") + str_list("numeric"), origin),
        assume_sorted=_flag(raw, "assume_sorted", False, origin),
    )


def _task_mapping(task_name: str, table: Any, origin: str) -> TaskMapping:
    """One ``[tasks.NAME]`` table, its keys checked for type (a quoted number or boolean is not one)."""
    if not isinstance(table, dict):
        raise MappingError(f"{origin}: tasks.{task_name} must be a table with a 'column' key")
    unknown = set(table) - _TASK_KEYS
    if unknown:
        raise MappingError(f"{origin}: tasks.{task_name} has unknown key(s) {sorted(unknown)}")
    where = f"tasks.{task_name}."
    delay_unit = table.get("delay_unit", "ms")
    if not isinstance(delay_unit, str) or delay_unit not in TIME_UNITS_MS:
        raise MappingError(f"{origin}: {where}delay_unit '{delay_unit}' is not one of s, ms, us, ns")
    positive_at_least = table.get("positive_at_least")
    if positive_at_least is not None:
        positive_at_least = _number_key(positive_at_least, f"{where}positive_at_least", "a number", origin)
    delay_ms = _number_key(table.get("delay_ms", 0), f"{where}delay_ms", "a number of milliseconds, 0 or more",
                           origin)
    if delay_ms < 0:  # a negative fixed delay would put feedback before its impression
        raise MappingError(f"{origin}: '{where}delay_ms' must be a number of milliseconds, 0 or more; got {delay_ms}")
    return TaskMapping(
        name=task_name,
        column=_column_key(table, "column", "the task's label column", origin, where),
        positive_at_least=positive_at_least,
        delay_column=_optional_text(table, "delay_column", origin, where),
        delay_unit=delay_unit,
        delay_ms=int(delay_ms),
    )


def _need(table: dict[str, Any], key: str, what: str, origin: str, where: str = "") -> Any:
    if key not in table:
        raise MappingError(f"{origin}: missing key '{where}{key}' ({what})")
    return table[key]


def _column_key(table: dict[str, Any], key: str, what: str, origin: str, where: str = "") -> str:
    """A required key naming a column: a string."""
    value = _need(table, key, what, origin, where)
    if not isinstance(value, str):
        raise MappingError(f"{origin}: '{where}{key}' must be a column name (a string), got {value!r}")
    return value


def _optional_text(table: dict[str, Any], key: str, origin: str, where: str = "") -> str | None:
    value = table.get(key)
    if value is not None and not isinstance(value, str):
        raise MappingError(f"{origin}: '{where}{key}' must be a string, got {value!r}")
    return value


def _flag(table: dict[str, Any], key: str, default: bool, origin: str) -> bool:
    """A boolean key: TOML's true or false, unquoted (``bool("false")`` is True, so a string is refused)."""
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise MappingError(f"{origin}: '{key}' must be true or false (a TOML boolean, without quotes), got {value!r}")
    return value


def _number_key(value: Any, key: str, what: str, origin: str) -> int | float:
    """A numeric key: a TOML integer or float, finite (a quoted number or a boolean is refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MappingError(f"{origin}: '{key}' must be {what} (without quotes), got {value!r}")
    return value


def _privileged(privileged: tuple[str, ...], features: tuple[str, ...], origin: str) -> tuple[str, ...]:
    both = sorted(set(privileged) & set(features))
    if both:
        raise MappingError(f"{origin}: {both} are listed as features and as privileged; an outcome known only after "
                           "the impression cannot be a feature (the served model would not have it)")
    return privileged


def to_epoch_ms(value: Any, unit: str) -> int:
    """Convert one time cell to integer epoch milliseconds (``iso``: naive datetimes are UTC); ValueError for a
    cell that is not a time, ``nan`` and ``inf`` included."""
    if unit == "iso":
        if isinstance(value, datetime):
            moment = value
        else:
            moment = datetime.fromisoformat(str(value).strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(round(moment.timestamp() * 1000))
    scaled = float(value) * TIME_UNITS_MS[unit]
    if not math.isfinite(scaled):  # int(inf) would be an OverflowError, int(nan) a ValueError without the cell
        raise ValueError(f"{value!r} is not a finite number")
    return int(round(scaled))


class _NotANumber(ValueError):
    """A cell that reads as a number but not as one the data may hold; ``what`` says why, after the cell."""

    def __init__(self, text: Any, what: str) -> None:
        super().__init__(f"{text!r} {what}")
        self.what = what


def _number(text: Any) -> int | float:
    """A numeric feature cell as an impression carries it: an int where the cell reads as one, else a float.
    ValueError unless finite (``nan``, ``inf``, ``1e400``) and, for an int, within an event's 64 bits."""
    if isinstance(text, (int, float)):
        value = text
    else:
        try:
            value = int(text)
        except ValueError:
            value = float(text)
    if isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise _NotANumber(text, "is an integer that does not fit in 64 bits")
    elif not math.isfinite(value):
        raise _NotANumber(text, "is not a finite number")
    return value


def _finite_float(text: Any) -> float:
    """A label or delay cell as a float; ValueError unless it is a finite number."""
    try:
        value = float(text)
    except OverflowError:  # an int past float's range (a Parquet cell)
        value = math.inf
    if not math.isfinite(value):
        raise _NotANumber(text, "is not a finite number")
    return value


def _is_empty(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DatasetError:
    """The error for a file that is not UTF-8, naming the first bad line (found in a second, binary pass: a text
    reader decodes in blocks, so it cannot say which line; no UTF-8 character spans a line break)."""
    with path.open("rb") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DatasetError(f"{path} line {line_no}: byte 0x{line[bad.start]:02x} is not UTF-8 ({bad.reason}); "
                                    "save the file as UTF-8")
    return DatasetError(f"{path} is not UTF-8: {exc}")


class TabularDataset:
    """A CSV, TSV or Parquet file read through a ``ColumnMapping``.

    >>> from streamer.datasets import open_dataset
    >>> ds = open_dataset("csv", "../shared/data/kuairand/kuairand27k_like_hate_kcore15.tsv",
    ...                   mapping="mappings/kuairand.toml")   # doctest: +SKIP
    >>> next(iter(ds.interactions())).labels                  # doctest: +SKIP
    {'click': 0, 'long_view': 0, 'like': 1}
    """

    def __init__(self, source: str | Path, mapping: ColumnMapping) -> None:
        self.source = Path(source)
        if not self.source.is_file():
            raise DatasetError(f"source file {self.source} does not exist")
        self.mapping = mapping
        self.name = mapping.name
        self.tasks = tuple(t.name for t in mapping.tasks)
        self.categorical_features = mapping.categorical
        self.numeric_features = mapping.numeric
        self.privileged_features = mapping.privileged
        self.format = mapping.format or self._format_from_suffix()
        self._prefix = mapping.impression_id_prefix or mapping.name
        self._column_names = self._read_column_names()
        self._check_columns()
        self.n_interactions: int | None = None

    # -- reading -----------------------------------------------------------------------------------------
    def _format_from_suffix(self) -> str:
        suffix = self.source.suffix.lower().lstrip(".")
        if suffix in ("csv", "tsv", "parquet"):
            return suffix
        if suffix in ("pq", "txt"):
            return {"pq": "parquet", "txt": "csv"}[suffix]
        raise MappingError(f"cannot tell the format of {self.source} from its name; set format = csv|tsv|parquet")

    def _delimiter(self) -> str:
        return self.mapping.delimiter or ("\t" if self.format == "tsv" else ",")

    def _read_column_names(self) -> tuple[str, ...]:
        if self.format == "parquet":
            import pyarrow.parquet as pq

            names = tuple(pq.ParquetFile(self.source).schema_arrow.names)
            return self._unique(self.mapping.columns or names)
        if self.mapping.columns is not None:
            return self._unique(self.mapping.columns)
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8" writes one) is not part of the first column's name
        with self.source.open(newline="", encoding="utf-8-sig") as handle:
            try:
                first = next(csv.reader(handle, delimiter=self._delimiter()), None)
            except UnicodeDecodeError as exc:
                raise _not_utf8(self.source, exc) from None
        if first is None:
            raise DatasetError(f"source file {self.source} is empty")
        return self._unique(tuple(first))

    def _unique(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """``names``, refused if one repeats: a row's dict would keep the last such cell, whichever column it is."""
        seen: set[str] = set()
        for name in names:
            if name in seen:
                where = ("the mapping's 'columns'" if self.mapping.columns is not None
                         else f"the header of {self.source}")
                raise DatasetError(f"column '{name}' appears twice in {where}; give each column its own name")
            seen.add(name)
        return names

    def _check_columns(self) -> None:
        m = self.mapping
        wanted: list[tuple[str, str]] = [(m.user, "user"), (m.item, "item"), (m.time, "time")]
        if m.impression_id:
            wanted.append((m.impression_id, "impression_id"))
        wanted += [(c, "categorical") for c in m.categorical] + [(c, "numeric") for c in m.numeric]
        wanted += [(c, "privileged") for c in m.privileged]
        for task in m.tasks:
            wanted.append((task.column, f"tasks.{task.name}.column"))
            if task.delay_column:
                wanted.append((task.delay_column, f"tasks.{task.name}.delay_column"))
        present = set(self._column_names)
        for column, key in wanted:
            if column not in present:
                raise MappingError(
                    f"column '{column}' (mapping key '{key}') is not in {self.source}; "
                    f"its columns are: {', '.join(self._column_names)}"
                )

    def _rows(self) -> Iterator[dict[str, Any]]:
        """Rows as dicts (column -> cell), in file order."""
        if self.format == "parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.source).iter_batches(batch_size=8192):
                table = batch.to_pylist()
                if self.mapping.columns is not None:
                    rename = dict(zip(batch.schema.names, self.mapping.columns))
                    table = [{rename[k]: v for k, v in row.items()} for row in table]
                yield from table
            return
        with self.source.open(newline="", encoding="utf-8-sig") as handle:
            try:
                yield from self._csv_rows(csv.reader(handle, delimiter=self._delimiter()))
            except UnicodeDecodeError as exc:
                raise _not_utf8(self.source, exc) from None

    def _csv_rows(self, reader: Iterator[list[str]]) -> Iterator[dict[str, Any]]:
        if self.mapping.header:
            next(reader, None)
        names = self._column_names
        for line_no, cells in enumerate(reader, start=2 if self.mapping.header else 1):
            if not cells:
                continue
            if len(cells) != len(names):
                raise DatasetError(
                    f"{self.source} line {line_no}: {len(cells)} cells, expected {len(names)} ({', '.join(names)})"
                )
            yield dict(zip(names, cells))

    # -- one row -> one interaction ----------------------------------------------------------------------
    def _interaction(self, row_index: int, row: dict[str, Any]) -> Interaction:
        m = self.mapping
        labels: dict[str, int] = {}
        delays: dict[str, int] = {}
        for task in m.tasks:
            cell = row[task.column]
            try:
                value = 0.0 if _is_empty(cell) else _finite_float(cell)
            except (TypeError, ValueError) as exc:
                raise self._cell_error(row_index, row, task.column, f"tasks.{task.name}.column", exc) from None
            positive = value >= task.positive_at_least if task.positive_at_least is not None else value > 0
            labels[task.name] = int(positive)
            if positive:
                delays[task.name] = self._delay_ms(row_index, row, task)
        features: dict[str, FeatureValue] = {}
        for column in m.categorical:
            if not _is_empty(row[column]):
                features[column] = str(row[column])
        privileged: dict[str, int | float] = {}
        for numbers, columns, key in ((features, m.numeric, "numeric"), (privileged, m.privileged, "privileged")):
            for column in columns:
                cell = row[column]
                if not _is_empty(cell):
                    try:
                        numbers[column] = _number(cell)
                    except (TypeError, ValueError) as exc:
                        raise self._cell_error(row_index, row, column, key, exc) from None
        impression_id = str(row[m.impression_id]) if m.impression_id else f"{self._prefix}-{row_index}"
        return Interaction(
            impression_id=impression_id,
            user_id=self._id(row_index, row, m.user, "user"),
            item_id=self._id(row_index, row, m.item, "item"),
            ts_ms=self._ts_ms(row_index, row),
            features=features,
            labels=labels,
            feedback_delay_ms=delays,
            privileged=privileged,
        )

    def _cell_error(self, row_index: int, row: dict[str, Any], column: str, key: str, exc: Exception) -> DatasetError:
        """The error for a cell its parser refused, naming the file, the row and the column."""
        what = exc.what if isinstance(exc, _NotANumber) else "is not a number"
        return DatasetError(f"{self.source} data row {row_index}: '{row[column]}' in column '{column}' (mapping key "
                            f"'{key}') {what}")

    def _delay_ms(self, row_index: int, row: dict[str, Any], task: TaskMapping) -> int:
        """A positive label's feedback delay: the fixed ``delay_ms`` plus the delay column's cell, if any."""
        delay = float(task.delay_ms)
        if task.delay_column is not None and not _is_empty(row[task.delay_column]):
            key = f"tasks.{task.name}.delay_column"
            try:
                delay += _finite_float(row[task.delay_column]) * TIME_UNITS_MS[task.delay_unit]
            except (TypeError, ValueError) as exc:
                raise self._cell_error(row_index, row, task.delay_column, key, exc) from None
            if not math.isfinite(delay):
                raise DatasetError(f"{self.source} data row {row_index}: delay '{row[task.delay_column]}' in column "
                                   f"'{task.delay_column}' (mapping key '{key}') overflows in unit '{task.delay_unit}'")
        return max(0, int(round(delay)))

    def _id(self, row_index: int, row: dict[str, Any], column: str, key: str) -> str:
        """A user or item id: as ``crossdistil stream`` would refuse an empty one in the event, so is it here."""
        if _is_empty(row[column]):
            raise DatasetError(f"{self.source} data row {row_index}: column '{column}' (mapping key '{key}', the "
                               f"impression's {key}_id): must not be empty")
        return str(row[column])

    def _ts_ms(self, row_index: int, row: dict[str, Any]) -> int:
        """The time cell in epoch ms, within what an event may carry (1970 to the year 9999)."""
        m = self.mapping
        try:
            ts_ms = to_epoch_ms(row[m.time], m.time_unit)
        except (ValueError, TypeError, OverflowError):
            raise DatasetError(
                f"{self.source} data row {row_index}: time '{row[m.time]}' in column '{m.time}' "
                f"is not a time in unit '{m.time_unit}'"
            ) from None
        if not 0 <= ts_ms <= TS_MAX_MS:  # what an event may carry: crossdistil stream would refuse the event
            when = "before 1970" if ts_ms < 0 else f"after the year 9999 in unit '{m.time_unit}' (is time_unit right?)"
            raise DatasetError(
                f"{self.source} data row {row_index}: time '{row[m.time]}' in column '{m.time}' is {when}")
        return ts_ms

    def interactions(self) -> Iterator[Interaction]:
        """Yield interactions in non-decreasing time (sorted stably unless ``assume_sorted``)."""
        records = (self._interaction(i, row) for i, row in enumerate(self._rows()))
        if self.mapping.assume_sorted:
            yield from _checked_order(records, str(self.source))
            return
        # Sorting needs every row in memory; assume_sorted = true streams files too big for that.
        everything = sorted(records, key=lambda r: r.ts_ms)
        self.n_interactions = len(everything)
        yield from everything


def _checked_order(records: Iterable[Interaction], origin: str) -> Iterator[Interaction]:
    last = None
    for record in records:
        if last is not None and record.ts_ms < last:
            raise DatasetError(
                f"{origin}: impression {record.impression_id} at {record.ts_ms} ms comes after one at {last} ms; "
                "the file is not in time order, so set assume_sorted = false"
            )
        last = record.ts_ms
        yield record


def open_tabular(source: str | Path, mapping: str | Path | ColumnMapping | dict[str, Any] | None) -> TabularDataset:
    """Open a tabular source with a mapping given as a file path, a parsed dict or a ``ColumnMapping``."""
    if mapping is None:
        raise MappingError("the csv data set needs a mapping: pass --mapping FILE (see mappings/*.toml)")
    if isinstance(mapping, (str, Path)):
        mapping = load_mapping(mapping)
    elif isinstance(mapping, dict):
        mapping = mapping_from_dict(mapping)
    return TabularDataset(source, mapping)


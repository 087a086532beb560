"""A dense backtest of an event log, read in bulk: the same events, in the same order, for less work per record.

``consumers.tools.backtest.run_backtest(..., batching="dense")`` of an event log (``EventLogRecords``) reads it
here, a chunk of records at a time (``streamer.eventlog.read_event_log_chunks``), instead of record by record:

* each chunk is checked a column at a time (``streamer.events.check_bulk``); a chunk that test does not pass
  (a bad event, a batch envelope, impressions with different feature names, a record larger than one event may
  be) is checked record by record (``LoggedRecord.events``, the reference), so bad events are dead-lettered with
  the same reasons;
* the impressions of a chunk that passed are encoded once, as columns (``models.features.encode_columns``), by
  every encoding of the replay (``PreEncoded``), and a batch's tensors are their rows, gathered
  (``models.features.batch_from_columns``, the last step of ``encode_rows`` too);
* everything else is the trainer's: each record is its own message for the join (``Pipeline.ingest_each``), the
  batcher, the learner, the metrics.

The numbers are those of the record-by-record replay, bit for bit (``tests/unit/consumers/tools/
test_backtest_bulk.py`` compares the two on logs with bad events, late and early feedback); the event-time mode
always replays record by record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from consumers.core.pipeline import training_rows
from models.features import Batch, FeatureSpec, batch_from_columns, encode_columns, encode_row_arrays
from streamer.eventlog import LogChunk
from streamer.events import DEFAULT_LIMITS, BulkColumns, check_bulk

BULK_RECORDS = 8192  # records read, checked and encoded at a time


class PreEncoded:
    """Impressions encoded a chunk at a time (``add``), gathered into batches (``batch``).

    Impressions are known by identity (``id`` of the event dict the join emits); each is held (so no other
    object can take its identity) until a batch takes it. A chunk's arrays are dropped once every impression of
    it has been taken.
    """

    def __init__(self, spec: FeatureSpec) -> None:
        self.spec = spec
        self._rows: dict[int, tuple[dict, int]] = {}  # id(impression) -> (impression, row)
        self._parts: dict[int, list[Any]] = {}  # first row -> [categorical, numeric, user, rows not yet taken]
        self._starts: list[int] = []  # first rows of the parts held, increasing
        self._next = 0

    def add(self, columns: BulkColumns) -> None:
        """Encode the impressions of a checked chunk (none when a numeric feature is not a number: they are then
        encoded with their batch, which raises where the record-by-record replay would)."""
        n = len(columns.impressions)
        if n == 0:
            return
        try:
            arrays = _encoded(columns, self.spec)
        except ValueError:
            return
        start = self._next
        self._next += n
        impressions = columns.impressions
        self._rows.update(zip(map(id, impressions), zip(impressions, range(start, start + n))))
        self._parts[start] = [*arrays, n]
        self._starts.append(start)

    def batch(self, samples: Sequence[Any], tasks: Sequence[str]) -> Batch:
        """The batch of ``samples`` (``JoinedSample``): the encoded rows of those added, the others encoded now."""
        take = self._rows.pop
        rows = np.array([take(id(s.impression), _NOT_ADDED)[1] for s in samples], dtype=np.int64)
        n = len(rows)
        categorical = np.empty((n, len(self.spec.categorical)), dtype=np.int64)
        numeric = np.empty((n, len(self.spec.numeric)), dtype=np.float64)
        user = np.empty(n, dtype=np.int64)
        added = rows >= 0
        if not added.all():  # from a chunk checked one record at a time: encoded as encode_rows would
            late = np.flatnonzero(~added)
            arrays = encode_row_arrays(training_rows([samples[i] for i in late]), self.spec)
            categorical[late], numeric[late], user[late] = arrays
        starts = np.array(self._starts, dtype=np.int64)
        part = np.searchsorted(starts, rows, side="right") - 1
        for p in np.unique(part[added]):
            start = int(starts[p])
            held = self._parts[start]
            where = added & (part == p)
            local = rows[where] - start
            categorical[where], numeric[where], user[where] = held[0][local], held[1][local], held[2][local]
            held[3] -= len(local)
            if held[3] == 0:
                del self._parts[start]
        self._starts = [s for s in self._starts if s in self._parts]
        return batch_from_columns(categorical, numeric, user, [s.labels for s in samples], tasks)


_NOT_ADDED = (None, -1)


def _encoded(columns: BulkColumns, spec: FeatureSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``encode_columns`` of every impression of ``columns``, a group of feature names at a time."""
    if len(columns.feature_groups) == 1:
        return encode_columns(columns.user_id, columns.item_id, columns.feature_groups[0][1], spec)
    n = len(columns.impressions)
    categorical = np.empty((n, len(spec.categorical)), dtype=np.int64)
    numeric = np.empty((n, len(spec.numeric)), dtype=np.float64)
    user = np.empty(n, dtype=np.int64)
    for rows, features in columns.feature_groups:
        pick = [columns.user_id[row] for row in rows], [columns.item_id[row] for row in rows]
        categorical[rows], numeric[rows], user[rows] = encode_columns(*pick, features, spec)
    return categorical, numeric, user


OneByOne = Callable[[str, dict, int], list]  # (topic, event, record size) -> the record's events, checked


def bulk_messages(chunks: Iterator[LogChunk], encodings: Sequence[PreEncoded], every: int,
                  one_by_one: OneByOne) -> Iterator[tuple[list[tuple[list, tuple[str, int]]], int]]:
    """``(messages, bytes)`` of ``every`` records at a time (the last: what is left): each record's events as
    ``Pipeline.ingest_each`` takes them, with its source ``(topic, 0)``; ``bytes``: their size in the file.

    A chunk that passes the bulk check gives each record's event as it is (``check_bulk`` normalised it as the
    validator does), and its impressions are added to each of ``encodings``; any other chunk gives
    ``one_by_one(topic, event, size)`` of each record (the backtest's ``LoggedRecord.events``)."""
    messages: list[tuple[list, tuple[str, int]]] = []
    sizes: list[int] = []
    for chunk in chunks:
        messages += _checked(chunk, encodings, one_by_one)
        sizes += chunk.sizes
        whole = len(messages) - len(messages) % every
        for i in range(0, whole, every):
            yield messages[i:i + every], sum(sizes[i:i + every])
        del messages[:whole], sizes[:whole]
    if messages:
        yield messages, sum(sizes)


def _checked(chunk: LogChunk, encodings: Sequence[PreEncoded],
             one_by_one: OneByOne) -> list[tuple[list, tuple[str, int]]]:
    """The chunk's records as ``(events, (topic, 0))``, checked in bulk when they pass, else one by one."""
    if chunk.sizes and max(chunk.sizes) <= DEFAULT_LIMITS.max_event_bytes:  # each event packs into its record's size
        columns = check_bulk(chunk.events)
        if columns is not None:
            for encoding in encodings:
                encoding.add(columns)
            return [([event], (topic, 0)) for topic, event in zip(chunk.topics, chunk.events)]
    return [(one_by_one(topic, event, size), (topic, 0))
            for topic, event, size in zip(chunk.topics, chunk.events, chunk.sizes)]

"""Feature encoding: rows of events -> a ``Batch`` of tensors.

Categorical values (user id, item id, context fields) are hashed into ONE shared embedding table with
field-salted keys ``"field=value"`` (blake2b, stable across processes and machines), so unseen ids need no
table growth and every field shares the capacity it needs. Numeric values are squashed with a signed
``log1p`` here (stateless); the model standardises them further with running statistics that live in its
state_dict (``models.crossdistil.RunningNormalizer``).

Encoding needs numpy only (``encode_columns``); torch is imported where a ``Batch`` of tensors is made, so a
process that only encodes (a replay's intake, ``consumers.tools.intake``) starts without loading torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

TOP_LEVEL_FIELDS = ("user_id", "item_id")
_USER_ID_SPACE = 2**63  # user keys for same-user pairs: a 63-bit hash, not bucketed, so users almost never collide


@dataclass(frozen=True)
class FeatureSpec:
    """Which fields the model reads and how large the hashed embedding table is.

    ``categorical`` names fields hashed into the shared table; ``user_id`` and ``item_id`` are read from the
    row itself, any other name from ``row["features"]``. ``numeric`` names fields of ``row["features"]``.

    >>> spec = FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("duration_ms",))
    >>> FeatureSpec.from_dict(spec.to_dict()) == spec
    True
    """

    categorical: tuple[str, ...] = ("user_id", "item_id")
    numeric: tuple[str, ...] = ()
    hash_buckets: int = 2**20

    def __post_init__(self) -> None:
        object.__setattr__(self, "categorical", tuple(self.categorical))
        object.__setattr__(self, "numeric", tuple(self.numeric))
        if not self.categorical:
            raise ValueError("FeatureSpec.categorical needs at least one field (e.g. 'user_id', 'item_id')")
        if self.hash_buckets < 2:
            raise ValueError("FeatureSpec.hash_buckets must be >= 2")

    def to_dict(self) -> dict[str, Any]:
        return {"categorical": list(self.categorical), "numeric": list(self.numeric), "hash_buckets": self.hash_buckets}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSpec:
        return cls(**data)


@dataclass
class Batch:
    """A mini-batch as tensors (rows of the same order in every tensor).

    categorical: LongTensor [B, C], rows of the shared embedding table; numeric: FloatTensor [B, N] (signed
    log1p); labels: FloatTensor [B, K] in task order (0 where a row has no label); user: LongTensor [B], a
    63-bit hash of the user id (for same-user pairs).
    """

    categorical: torch.Tensor
    numeric: torch.Tensor
    labels: torch.Tensor
    user: torch.Tensor
    tasks: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.categorical.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device`` (a no-op when already there).

        Host-to-GPU copies go through pinned (page-locked) memory and are non-blocking, so they overlap with
        the work already queued on the device; a copy from pageable memory would make ``non_blocking`` a no-op.
        """
        import torch  # not at module level: encoding (``encode_columns``) runs without torch, see the module doc

        device = torch.device(device)

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=True)

        return Batch(categorical=move(self.categorical), numeric=move(self.numeric), labels=move(self.labels),
                     user=move(self.user), tasks=self.tasks)


def _blake2b_row(field_name: str, value: object, buckets: int) -> int:
    digest = hashlib.blake2b(f"{field_name}={value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


@lru_cache(maxsize=2**16, typed=True)  # typed: 5, 5.0 and True are equal dict keys but hash differently here
def hash_bucket(field_name: str, value: object, buckets: int) -> int:
    """Row of ``field_name=value`` in a table of ``buckets`` rows: blake2b, stable across processes.

    Values are keyed by ``str(value)``, so ``5`` and ``"5"`` share a row (producers may send either).

    >>> hash_bucket("item_id", "42", 2**20) == hash_bucket("item_id", 42, 2**20)
    True
    >>> hash_bucket("item_id", "42", 2**20) != hash_bucket("user_id", "42", 2**20)
    True
    """
    return _blake2b_row(field_name, value, buckets)


# Per (field, buckets): str(value) -> row. Ids repeat heavily in a stream, so most lookups skip blake2b.
# A dict of str -> int is not tracked by the garbage collector; hash_bucket's lru_cache is (a list per entry),
# so hash_column computes misses with _blake2b_row directly: with hash_bucket, 2**16 cache entries of ids
# made each full collection of the serving daemon scan ~140,000 more objects (~100 ms on a loaded machine,
# every request in flight waiting: /score's p99 at 16 clients).
_ROW_CACHES: dict[tuple[str, int], dict[str, int]] = {}
_ROW_CACHE_LIMIT = 2**20  # entries per field; cleared (not evicted one by one) when full


def hash_column(field_name: str, values: Iterable[Any], buckets: int) -> list[int]:
    """``hash_bucket`` over many values of one field, memoised."""
    cache = _ROW_CACHES.setdefault((field_name, buckets), {})
    if len(cache) > _ROW_CACHE_LIMIT:
        cache.clear()
    if not isinstance(values, (list, tuple)):
        values = list(values)
    try:  # the cache's keys are strings, so only strings it has seen hit (not 5, which must be keyed "5")
        return list(map(cache.__getitem__, values))
    except (KeyError, TypeError):
        keys = list(map(str, values))  # str of a str is itself
        for k in set(keys).difference(cache):
            cache[k] = _blake2b_row(field_name, k, buckets)
        return list(map(cache.__getitem__, keys))


def _hash_column_into(out: np.ndarray, field_name: str, values: Sequence[Any], buckets: int) -> None:
    """``hash_column`` written into the int64 row ``out`` (``len(values)`` long): when every value is a string the
    cache holds (a stream's common case), straight from the cache into an array, without a list in between."""
    cache = _ROW_CACHES.get((field_name, buckets))
    if cache is not None and len(cache) <= _ROW_CACHE_LIMIT:
        try:
            out[:] = np.fromiter(map(cache.__getitem__, values), dtype=np.int64, count=len(values))
            return
        except (KeyError, TypeError):  # a value not seen yet, or not a string: hash_column keys and fills the cache
            pass
    out[:] = hash_column(field_name, values, buckets)


def _column(rows: Sequence[Any], name: str, default: Any) -> list[Any]:
    # Rows are mappings (the trainer's join) or objects with attributes (streamer.datasets Interaction);
    # a batch is one or the other, so the type is checked once.
    if not rows or isinstance(rows[0], Mapping):
        return [r.get(name, default) for r in rows]
    return [getattr(r, name, default) for r in rows]


def _feature_columns(feature_maps: Sequence[Mapping[str, Any]], names: Sequence[str],
                     default: Any) -> dict[str, Sequence[Any]]:
    """``{name: [map.get(name, default) for map in feature_maps]}``: one C-level lookup of every name per row
    (``itemgetter``) when no row lacks one, else a ``get`` per name and row."""
    if not names:
        return {}
    if not feature_maps:
        return {name: [] for name in names}
    get = itemgetter(*names)
    try:
        rows = list(map(get, feature_maps))
    except KeyError:  # some row lacks a name: that row by names
        rows = []
        append = rows.append
        for m in feature_maps:
            try:
                append(get(m))
            except KeyError:
                append([m.get(name, default) for name in names] if len(names) > 1 else m.get(names[0], default))
    if len(names) == 1:
        return {names[0]: rows}
    return dict(zip(names, zip(*rows)))


def _categorical_columns(feature_maps: Sequence[Mapping[str, Any]], spec: FeatureSpec,
                         top_level: Callable[[str], Sequence[Any]]) -> np.ndarray:
    """The table rows [n, C] of every categorical field: ``top_level(name)`` gives the values of the fields read
    from the row itself (``TOP_LEVEL_FIELDS``), the others come from the feature maps ("" when absent)."""
    in_features = _feature_columns(feature_maps, [name for name in spec.categorical if name not in TOP_LEVEL_FIELDS],
                                   "")
    # field by field into the rows of a [C, n] array (each a contiguous write), then transposed once
    by_field = np.empty((len(spec.categorical), len(feature_maps)), dtype=np.int64)
    for c, name in enumerate(spec.categorical):
        values = top_level(name) if name in TOP_LEVEL_FIELDS else in_features[name]
        _hash_column_into(by_field[c], name, values, spec.hash_buckets)
    return np.ascontiguousarray(by_field.T)


def _numeric_columns(feature_maps: Sequence[Mapping[str, Any]], spec: FeatureSpec, n: int) -> np.ndarray:
    """The numeric features [n, N] as float32 signed log1p (heavy tails: watch time, counts -> O(10)); 0 = absent."""
    numeric = np.zeros((n, len(spec.numeric)), dtype=np.float64)
    numeric_values = _feature_columns(feature_maps, spec.numeric, 0.0)
    for c, name in enumerate(spec.numeric):
        try:
            numeric[:, c] = [float(v or 0.0) for v in numeric_values[name]]
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(f"numeric feature {name!r} has a value that is not a number: {exc}") from None
        _check_finite(name, numeric[:, c])
    return _signed_log1p(numeric)


def _check_finite(name: str, column: np.ndarray) -> None:
    """Refuse NaN and infinity: log1p keeps them, and one NaN input makes every prediction that reads it NaN."""
    if not np.isfinite(column).all():
        row = int(np.flatnonzero(~np.isfinite(column))[0])
        raise ValueError(f"numeric feature {name!r} is {column[row]} in row {row}: expected a finite number")


def _signed_log1p(numeric: np.ndarray) -> np.ndarray:
    return (np.sign(numeric) * np.log1p(np.abs(numeric))).astype(np.float32)


def encode_factorized(columns: Mapping[str, tuple[Sequence[str], np.ndarray]], numeric: Mapping[str, np.ndarray],
                      labels: np.ndarray, user_ids: tuple[Sequence[str], np.ndarray],
                      spec: FeatureSpec) -> dict[str, np.ndarray]:
    """``encode_columns``' arrays from a data set already in columns: each categorical field as (its distinct strings,
    one index into them per row), "" for a row without it; numeric fields as float64 rows (0 where absent; NaN or
    infinity is a ValueError, as in ``encode_columns``); labels [n, K] (0/1); the user ids factorized like the fields.
    A field the spec has and ``columns`` lacks reads "" (every row without it). Only the distinct strings are hashed:
    the same rows as ``encode_columns`` of the same rows, bit for bit (tests/unit/streamer/test_columnar.py), in a
    fraction of its time.
    """
    n = len(labels)
    by_field = np.empty((len(spec.categorical), n), dtype=np.int64)
    for c, name in enumerate(spec.categorical):
        values, codes = columns.get(name, ([""], np.zeros(n, dtype=np.int64)))
        by_field[c] = np.asarray(hash_column(name, list(values), spec.hash_buckets), dtype=np.int64)[codes] \
            if len(values) else np.zeros(0, dtype=np.int64)
    raw = np.zeros((n, len(spec.numeric)), dtype=np.float64)
    for c, name in enumerate(spec.numeric):
        if name in numeric:
            raw[:, c] = numeric[name]
            _check_finite(name, raw[:, c])
    values, codes = user_ids
    user = np.asarray(hash_column("user_id", list(values), _USER_ID_SPACE), dtype=np.int64)[codes] \
        if len(values) else np.zeros(0, dtype=np.int64)
    return {"categorical": np.ascontiguousarray(by_field.T), "numeric": _signed_log1p(raw),
            "labels": np.ascontiguousarray(labels, dtype=np.float32), "user": user}


_IMPRESSION_FIELDS = itemgetter("user_id", "item_id", "features")


def encode_for_scoring(rows: Sequence[Any], spec: FeatureSpec, tasks: Sequence[str]) -> Batch:
    """``encode_rows`` for scoring only: the same ``categorical`` and ``numeric`` (same functions, so the same
    values bit for bit), ``labels`` and ``user`` left zero (the students read neither; the trainer needs both).

    For serving's micro-batches of validated impressions (dicts that all have ``user_id``, ``item_id`` and a
    ``features`` dict): their three columns are taken in one pass, and no label or user key is computed (1.2
    instead of 1.7 ms for 16 requests of bench/serving_load.py's 100 impressions). Other rows go to
    ``encode_rows``.

    >>> rows = [{"user_id": "u1", "item_id": "i9", "features": {"hour": "13"}}]
    >>> spec = FeatureSpec(categorical=("user_id", "item_id", "hour"))
    >>> encode_for_scoring(rows, spec, ("like",)).categorical.equal(encode_rows(rows, spec, ("like",)).categorical)
    True
    """
    n = len(rows)
    try:
        users, items, feature_maps = zip(*map(_IMPRESSION_FIELDS, rows)) if n else ((), (), ())
    except (KeyError, TypeError):  # not dicts with the three fields (objects, rows without features)
        return encode_rows(rows, spec, tasks)
    if any(type(m) is not dict for m in feature_maps):
        return encode_rows(rows, spec, tasks)
    categorical = _categorical_columns(feature_maps, spec, {"user_id": users, "item_id": items}.__getitem__)
    numeric = _numeric_columns(feature_maps, spec, n)
    return batch_from_columns({"categorical": categorical, "numeric": numeric,
                               "labels": np.zeros((n, len(tasks)), dtype=np.float32),
                               "user": np.zeros(n, dtype=np.int64)}, tasks)


def encode_rows(rows: Sequence[Any], spec: FeatureSpec, tasks: Sequence[str]) -> Batch:
    """Encode rows ``{"user_id", "item_id", "features": {...}, "labels": {task: 0|1}}`` into a ``Batch``.

    Rows may also be objects with those attributes (``streamer.datasets.base.Interaction``). Missing
    categorical values hash as the empty string of their field (one "missing" row per field); missing
    numeric values and missing labels are 0; a NaN or infinite numeric value is a ValueError.

    >>> b = encode_rows([{"user_id": "u1", "item_id": "i9", "features": {}, "labels": {"like": 1}}],
    ...                 FeatureSpec(), ("like", "finish"))
    >>> b.categorical.shape, b.labels.tolist()
    (torch.Size([1, 2]), [[1.0, 0.0]])
    """
    return batch_from_columns(encode_columns(rows, spec, tasks), tasks)


COLUMN_DTYPES = {"categorical": np.int64, "numeric": np.float32, "labels": np.float32, "user": np.int64}


def encode_columns(rows: Sequence[Any], spec: FeatureSpec, tasks: Sequence[str],
                   labels: Sequence[Mapping[str, Any] | None] | None = None) -> dict[str, np.ndarray]:
    """``encode_rows`` as numpy arrays (``COLUMN_DTYPES``: categorical [n, C], numeric [n, N], labels [n, K], user
    [n]), without torch: a replay's intake process encodes batches with it and another process trains on them
    (``batch_from_columns``), bit for bit the same batch. ``labels``: the rows' label maps, when the rows (e.g.
    joined impressions) do not hold them under ``"labels"``.

    >>> columns = encode_columns([{"user_id": "u1", "item_id": "i9", "features": {}, "labels": {"like": 1}}],
    ...                          FeatureSpec(), ("like",))
    >>> {name: a.shape for name, a in columns.items()}
    {'categorical': (1, 2), 'numeric': (1, 0), 'labels': (1, 1), 'user': (1,)}
    """
    n = len(rows)
    feature_maps = [f or {} for f in _column(rows, "features", None)]
    user_ids = _column(rows, "user_id", "")
    categorical = _categorical_columns(
        feature_maps, spec, lambda name: user_ids if name == "user_id" else _column(rows, name, ""))
    numeric = _numeric_columns(feature_maps, spec, n)

    label_maps = [m or {} for m in (_column(rows, "labels", None) if labels is None else labels)]
    if len(label_maps) != n:
        raise ValueError(f"{len(label_maps)} label maps for {n} rows")
    label_array = np.zeros((n, len(tasks)), dtype=np.float32)
    for k, task in enumerate(tasks):
        label_array[:, k] = [1.0 if (m.get(task) or 0) > 0 else 0.0 for m in label_maps]

    user = np.array(hash_column("user_id", user_ids, _USER_ID_SPACE), dtype=np.int64)
    return {"categorical": categorical, "numeric": numeric, "labels": label_array, "user": user}


def columns_to_bytes(columns: Mapping[str, np.ndarray]) -> list[bytes]:
    """``encode_columns``' arrays as bytes, in ``COLUMN_DTYPES`` order (for a pipe between processes)."""
    return [np.ascontiguousarray(columns[name], dtype).tobytes() for name, dtype in COLUMN_DTYPES.items()]


def columns_from_bytes(data: Sequence[bytes], shapes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """Inverse of ``columns_to_bytes`` given each array's shape (writable arrays: ``torch.from_numpy`` wants them).

    >>> columns = encode_columns([{"user_id": "u", "item_id": "i", "labels": {"t": 1}}], FeatureSpec(), ("t",))
    >>> back = columns_from_bytes(columns_to_bytes(columns), [a.shape for a in columns.values()])
    >>> all((back[name] == columns[name]).all() for name in columns)
    True
    """
    return {name: np.frombuffer(bytearray(raw), dtype=dtype).reshape(shape)
            for (name, dtype), raw, shape in zip(COLUMN_DTYPES.items(), data, shapes)}


def batch_from_columns(columns: Mapping[str, np.ndarray], tasks: Sequence[str]) -> Batch:
    """The ``Batch`` of ``encode_columns``' arrays (tensors sharing their memory)."""
    import torch  # not at module level: encoding (``encode_columns``) runs without torch, see the module doc

    return Batch(categorical=torch.from_numpy(columns["categorical"]), numeric=torch.from_numpy(columns["numeric"]),
                 labels=torch.from_numpy(columns["labels"]), user=torch.from_numpy(columns["user"]),
                 tasks=tuple(tasks))


def collision_rate(keys_by_field: Mapping[str, Iterable[object]], buckets: int) -> dict[str, float]:
    """Share of distinct ``field=value`` keys that share their table row with another key.

    Used for docs/method.md: measures the shared, field-salted table on real id sets.
    """
    rows: dict[int, int] = {}
    total = 0
    for name, values in keys_by_field.items():
        for v in set(values):
            b = hash_bucket(name, v, buckets)
            rows[b] = rows.get(b, 0) + 1
            total += 1
    colliding = sum(c for c in rows.values() if c > 1)
    return {"distinct_keys": total, "rows_used": len(rows), "colliding_key_share": colliding / max(total, 1)}

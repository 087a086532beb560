"""Prequential quality of one prediction stream (one task, one role): windowed and lifetime metrics, pure.

A :class:`StreamQuality` receives, batch by batch, the labels and the probabilities that were predicted
*before* the model learned from those samples, and answers, over the last ``W`` samples for each configured
window and over the whole stream:

* ``auc`` — ROC AUC, ties count one half (``models.metrics.auc``'s value, bit for bit). Windowed values are
  **exact** (a ring buffer of the last ``max(windows)`` samples; each window kept in score order between reads,
  ``SortedWindow``, so a read sorts only what arrived since the last one and merges it in); the lifetime value
  is computed from score histograms with ``lifetime_bins`` equal-width bins over [0, 1], so pairs of samples whose
  scores share a bin count one half (the error is at most half the share of such pairs; with the default 65,536 bins
  it is below 1e-4 on model outputs).
* ``gauc`` — impression-weighted per-user AUC over a window (users with one class are skipped; ``models.metrics.gauc``);
  needs users.
* ``log_loss``, ``calibration_ratio`` (mean prediction / mean label), ``positive_rate``, ``samples``.

Updates are vectorised (a few numpy copies per batch); the sorting happens only when the values are read, so
the cost moves from the training loop to whoever reads (a Prometheus scrape every few seconds). Reads are
cached until the next update, or, for a window given in ``refresh_every``, until that many new samples
arrived (a slow baseline window may lag by 1 % of itself instead of sorting a million scores per scrape).
A reader on another thread computes on :meth:`StreamQuality.copy` and hands the values back with
:meth:`StreamQuality.adopt_cache`.

>>> import numpy as np
>>> q = StreamQuality(windows=(4,))
>>> q.update(np.array([0, 1, 0, 1, 0, 1]), np.array([0.3, 0.5, 0.5, 0.7, 0.1, 0.3]))
>>> q.auc(4), q.positive_rate(4), q.samples(4), q.samples(None)
(0.75, 0.5, 4, 6)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

from models.metrics import gauc

# Same clipping as models.metrics.log_loss, so the daemon and the offline evaluation agree.
LOG_LOSS_EPS = 1e-7

LIFETIME = None  # the "window" argument that means the whole stream

# What StreamQuality.summary reports, in its order.
METRICS = ("auc", "log_loss", "calibration_ratio", "positive_rate", "gauc", "samples")


def histogram_auc(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """AUC from per-bin counts of positives and negatives (bins in increasing score order; same bin = tie).

    Counted as an exact integer, twice the wins (a positive beats the negatives of the bins below its own twice
    and ties those of its own once): two dot products over the bins instead of a float pass per term, and the
    same value, the numerator being an integer or half-integer exact in float64 either way.

    >>> histogram_auc(np.array([0, 1, 1]), np.array([1, 1, 0]))
    0.875
    """
    n_pos, n_neg = int(pos_counts.sum()), int(neg_counts.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    wins2 = 2 * int(np.dot(pos_counts, np.cumsum(neg_counts))) - int(np.dot(pos_counts, neg_counts))
    return float(wins2 / 2 / (n_pos * n_neg))


class SortedWindow:
    """One window's exact AUC kept up to date between reads, in O(arrivals x log window) plus a few copies.

    The window's positives' and negatives' scores are kept sorted (``pos``, ``neg``), its samples in arrival
    order in a ring of its own (so a read writes only what arrived and reads only what left, instead of copying the
    window), and the AUC's numerator as an exact integer: ``wins2``, twice the number of (positive, negative) pairs
    ranked right, ties counting one each (so no halves). A read removes the samples that left the window and adds
    those that arrived; each changes ``wins2`` by its pairs with the others, counted with ``searchsorted`` in the
    sorted scores. The AUC ``wins2 / 2 / (P N)`` is ``models.metrics.auc``'s value bit for bit: both numerators are
    the same integer or half-integer, exact in float64.

    >>> w = SortedWindow()
    >>> w.auc(np.array([0, 1, 1, 0], bool), np.array([0.2, 0.8, 0.4, 0.4]), count=4)
    0.875
    >>> w.auc(np.array([0, 1, 0], bool), np.array([0.4, 0.3, 0.9]), count=6)  # the window: the last 3 samples
    0.0
    """

    def __init__(self) -> None:
        self.count = 0  # stream samples seen at the last read
        # the window's samples in arrival order: ring slots start, start + 1, ... (mod the ring's length), size of them
        self._ring_y, self._ring_p = np.zeros(0, dtype=bool), np.zeros(0)
        self._start = 0
        self.size = 0
        self.pos, self.neg = np.zeros(0), np.zeros(0)
        self.wins2 = 0

    def auc(self, y_new: np.ndarray, p_new: np.ndarray, count: int, n: int | None = None) -> float:
        """AUC of the last ``n`` samples (default ``len(y_new)``) of a stream that has seen ``count``; ``y_new``,
        ``p_new``: its samples since the last read, in arrival order (all of the window's after a reset)."""
        n = len(y_new) if n is None else n
        arrived = count - self.count
        y_new, p_new = np.asarray(y_new, dtype=bool), np.asarray(p_new, dtype=np.float64)
        if arrived >= n or arrived < 0 or arrived != len(y_new) or not self.size:
            y_new, p_new = y_new[-n:], p_new[-n:]
            self._ring_y, self._ring_p = y_new.copy(), p_new.copy()
            self._start, self.size = 0, len(y_new)
            self.pos, self.neg, self.wins2 = np.zeros(0), np.zeros(0), 0
            self._add(y_new, p_new)
        else:
            leave = max(0, self.size + arrived - n)
            if leave:
                self._remove(*self._oldest(leave))
            self._add(y_new, p_new)
            self._push(leave, y_new, p_new, n)
        self.count = count
        n_pos, n_neg = len(self.pos), len(self.neg)
        if n_pos == 0 or n_neg == 0:
            return math.nan
        return float(self.wins2 / 2 / (n_pos * n_neg))

    def _oldest(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's ``k`` oldest samples (labels, scores) in arrival order."""
        at = (self._start + np.arange(k)) % len(self._ring_p) if self._start + k > len(self._ring_p) else \
            slice(self._start, self._start + k)
        return self._ring_y[at], self._ring_p[at]

    def _push(self, leave: int, y: np.ndarray, p: np.ndarray, n: int) -> None:
        """Drop the ``leave`` oldest samples from the ring and append ``y``, ``p`` (growing the ring, up to the
        window's ``n`` samples, if needed)."""
        self._start = (self._start + leave) % max(1, len(self._ring_p))
        self.size -= leave
        if self.size + len(p) > len(self._ring_p):  # a window still filling: a ring twice as long, in order
            keep_y, keep_p = self._oldest(self.size)
            spare = min(n, 2 * (self.size + len(p))) - self.size - len(p)
            self._ring_y = np.concatenate((keep_y, y, np.zeros(max(0, spare), dtype=bool)))
            self._ring_p = np.concatenate((keep_p, p, np.zeros(max(0, spare))))
            self._start = 0
        else:
            at = (self._start + self.size + np.arange(len(p))) % len(self._ring_p)
            self._ring_y[at] = y
            self._ring_p[at] = p
        self.size += len(p)

    def _add(self, y: np.ndarray, p: np.ndarray) -> None:
        pos, neg = np.sort(p[y]), np.sort(p[~y])
        # wins of the arrivals among themselves, then against the window's samples before them
        self.wins2 += _pairs2(pos, neg) + _pairs2(pos, self.neg) + _pairs2(self.pos, neg)
        self.pos = _merge(self.pos, pos)
        self.neg = _merge(self.neg, neg)

    def _remove(self, y: np.ndarray, p: np.ndarray) -> None:
        if not len(p):
            return
        pos, neg = np.sort(p[y]), np.sort(p[~y])
        # the leavers' pairs with the whole window counted their pairs among themselves twice
        self.wins2 -= _pairs2(pos, self.neg) + _pairs2(self.pos, neg) - _pairs2(pos, neg)
        self.pos = _drop(self.pos, pos)
        self.neg = _drop(self.neg, neg)


def _pairs2(pos: np.ndarray, neg: np.ndarray) -> int:
    """Twice the (positive, negative) pairs with the positive's score above, ties once: an exact integer. Both
    sorted; the smaller is looked up in the larger."""
    if not len(pos) or not len(neg):
        return 0
    if len(pos) <= len(neg):  # each positive: 2 x negatives below + equal ones = left + right
        return _left_plus_right(neg, pos)
    # each negative: 2 x positives above + equal ones = 2 len(pos) - left - right
    return 2 * len(pos) * len(neg) - _left_plus_right(pos, neg)


def _left_plus_right(sorted_values: np.ndarray, keys: np.ndarray) -> int:
    """Sum over ``keys`` of the values below each plus the values at or below it (``searchsorted`` left + right);
    the second search only for the keys that equal a value (a few: float32 scores tie now and then)."""
    left = np.searchsorted(sorted_values, keys, "left")
    tied = sorted_values[np.minimum(left, len(sorted_values) - 1)] == keys
    if tied.any():
        return 2 * int(left.sum()) + int((np.searchsorted(sorted_values, keys[tied], "right") - left[tied]).sum())
    return 2 * int(left.sum())


def _merge(into: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted ``into`` with sorted ``values`` inserted: the two runs concatenated and sorted stably (timsort
    finds the two runs and merges them: one pass, 1.0-2.0x the searchsorted-and-scatter merge at 8,000-180,000
    scores)."""
    if not len(values):
        return into
    out = np.concatenate((into, values))
    out.sort(kind="stable")
    return out


def _drop(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Sorted ``sorted_values`` without one occurrence of each of the sorted ``values`` (all present)."""
    if not len(values):
        return sorted_values
    first = np.searchsorted(sorted_values, values, "left")
    # equal values among those dropped take consecutive places after their first
    if len(values) > 1 and (values[1:] == values[:-1]).any():
        first += np.arange(len(values)) - np.searchsorted(values, values, "left")
    keep = np.ones(len(sorted_values), dtype=bool)
    keep[first] = False
    return sorted_values[keep]


class StreamQuality:
    """Exact windowed and histogram-based lifetime quality metrics of one (task, role) prediction stream.

    ``windows`` are sample counts; a window that has not filled yet covers every sample so far (``samples(W)``
    says how many). ``update`` takes optional ``users`` (any hashable values, or integers) for GAUC.
    """

    def __init__(
        self,
        windows: Sequence[int] = (10_000, 100_000),
        lifetime_bins: int = 65_536,
        refresh_every: Mapping[int, int] | None = None,
    ) -> None:
        if not windows or any(int(w) < 1 for w in windows):
            raise ValueError(f"windows must be positive sample counts, got {list(windows)}")
        self.windows: tuple[int, ...] = tuple(sorted({int(w) for w in windows}))
        self.capacity = self.windows[-1]
        # A window's values are recomputed once this many new samples arrived (default 1: always exact). A slow
        # baseline window of a million samples can afford to lag by 1 % and saves a large sort per read.
        self.refresh_every = {w: max(1, int((refresh_every or {}).get(w, 1))) for w in self.windows}
        # np.full writes every element, so the rings' pages are committed now: a trainer's memory is all taken
        # at start instead of creeping up while the largest window fills (np.zeros pages arrive on first write).
        self._y = np.full(self.capacity, False)
        self._p = np.full(self.capacity, 0.0)
        self._loss = np.full(self.capacity, 0.0)  # each sample's log loss: a window's mean without a log per read
        self._user = np.full(self.capacity, 0, dtype=np.int64)
        self._has_users = np.full(self.capacity, False)
        self._next = 0  # ring position of the next write
        self._count = 0  # samples seen, lifetime
        self._bins = int(lifetime_bins)
        self._pos_hist = np.zeros(self._bins, dtype=np.int64)
        self._neg_hist = np.zeros(self._bins, dtype=np.int64)
        # Bin indices not yet folded into the histograms (negatives stored as -1 - bin): one bincount per read
        # instead of two 65,536-bin bincounts per batch.
        self._pending_bins: list[np.ndarray] = []
        self._pending_n = 0
        self._sum_p = 0.0
        self._sum_y = 0.0
        self._sum_loss = 0.0
        self._cache: dict[tuple[str, int | None], tuple[float, int]] = {}  # -> (value, count when computed)
        self._sorted = {w: SortedWindow() for w in self.windows}  # each window in score order as of its last AUC
        self.version = 0  # grows with every update: readers can cache on it

    def copy(self) -> "StreamQuality":
        """An independent copy (arrays copied): a reader computes on it while the writer goes on updating."""
        self._fold_pending()
        clone = copy.copy(self)
        for name in ("_y", "_p", "_loss", "_user", "_has_users", "_pos_hist", "_neg_hist"):
            setattr(clone, name, getattr(self, name).copy())
        clone._pending_bins = []
        clone._cache = dict(self._cache)
        clone._sorted = {w: copy.deepcopy(sorted_window) for w, sorted_window in self._sorted.items()}
        return clone

    # -- updates ---------------------------------------------------------------------------------------------

    def update(
        self,
        y: ArrayLike,
        p: ArrayLike,
        users: ArrayLike | Sequence | None = None,
        losses: np.ndarray | None = None,
    ) -> None:
        """Add one batch: labels ``y`` (> 0 = positive), predicted probabilities ``p``, optional ``users``, and
        optionally the per-sample log losses if the caller has them already (saves recomputing them)."""
        y = np.asarray(y).reshape(-1) > 0
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        if len(y) != len(p):
            raise ValueError(f"labels and predictions differ in length: {len(y)} != {len(p)}")
        n = len(y)
        if n == 0:
            return
        user_ids = None if users is None else user_ids_of(users, n)
        self.version += 1
        # Lifetime sums and histograms.
        if losses is None:
            clipped = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
            losses = -np.where(y, np.log(clipped), np.log1p(-clipped))
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        self._sum_loss += float(np.sum(losses))
        self._sum_p += float(p.sum())
        self._sum_y += float(y.sum())
        bins = np.clip((p * self._bins).astype(np.int64), 0, self._bins - 1)
        self._pending_bins.append(np.where(y, bins, -1 - bins))
        self._pending_n += n
        if self._pending_n >= 4 * self._bins:  # bound the memory when nobody reads
            self._fold_pending()
        self._count += n
        # Ring buffer: only the last `capacity` samples of the batch matter.
        if n > self.capacity:
            y, p, losses = y[-self.capacity :], p[-self.capacity :], losses[-self.capacity :]
            user_ids = None if user_ids is None else user_ids[-self.capacity :]
            n = self.capacity
        # a slice where the batch does not wrap around the ring's end (a view: no index array)
        positions: slice | np.ndarray = (slice(self._next, self._next + n) if self._next + n <= self.capacity
                                         else (self._next + np.arange(n)) % self.capacity)
        self._y[positions] = y
        self._p[positions] = p
        self._loss[positions] = losses
        if user_ids is None:
            self._has_users[positions] = False
        else:
            self._user[positions] = user_ids
            self._has_users[positions] = True
        self._next = (self._next + n) % self.capacity

    def _fold_pending(self) -> None:
        if not self._pending_bins:
            return
        signed = np.concatenate(self._pending_bins)
        self._pending_bins, self._pending_n = [], 0
        # one count of both classes: bins - 1 - bin for a negative (stored as -1 - bin), bins + bin for a positive
        counts = np.bincount(signed + self._bins, minlength=2 * self._bins)
        self._pos_hist += counts[self._bins:]
        self._neg_hist += counts[self._bins - 1::-1]

    # -- reads -----------------------------------------------------------------------------------------------

    def samples(self, window: int | None) -> int:
        """How many samples ``window`` covers now (``None``: the lifetime count)."""
        if window is None:
            return self._count
        return min(self._count, int(window), self.capacity)

    def _last(self, window: int, array: np.ndarray) -> np.ndarray:
        """The last ``samples(window)`` entries of a ring array in arrival order (a view when contiguous)."""
        if window not in self.windows:
            raise KeyError(f"window {window} is not tracked; tracked windows: {list(self.windows)}")
        return self._newest(self.samples(window), array)

    def _cached(self, name: str, window: int | None, compute) -> float:
        if window is not None and window not in self.windows:
            raise KeyError(f"window {window} is not tracked; tracked windows: {list(self.windows)}")
        key = (name, window)
        hit = self._cache.get(key)
        refresh = 1 if window is None else self.refresh_every[window]
        if hit is None or self._count - hit[1] >= refresh:
            hit = self._cache[key] = (compute(), self._count)
        return hit[0]

    def adopt_cache(self, other: "StreamQuality") -> None:
        """Keep the values a reader computed on a :meth:`copy` (each is tagged with the count it saw)."""
        for key, (value, count) in other._cache.items():
            if count <= self._count and (key not in self._cache or self._cache[key][1] < count):
                self._cache[key] = (value, count)

    def auc(self, window: int | None) -> float:
        """AUC over the last ``window`` samples (exact), or over the stream (``None``, histogram-based)."""
        if window is None:
            self._fold_pending()
            return self._cached("auc", None, lambda: histogram_auc(self._pos_hist, self._neg_hist))
        return self._cached("auc", window, lambda: self._window_auc(window))

    def _window_auc(self, window: int) -> float:
        """The exact AUC of ``window`` (``SortedWindow``: merging in what arrived since its last read)."""
        n = self.samples(window)
        sorted_window = self._sorted[window]
        arrived = self._count - sorted_window.count
        if 0 < arrived < n and arrived <= self.capacity:
            y, p = self._newest(arrived, self._y), self._newest(arrived, self._p)
        else:
            y, p = self._last(window, self._y), self._last(window, self._p)
        return sorted_window.auc(y, p, self._count, n)

    def _newest(self, k: int, array: np.ndarray) -> np.ndarray:
        """The last ``k`` (<= capacity) entries of a ring array in arrival order."""
        if k <= self._next:
            return array[self._next - k : self._next]
        return np.concatenate((array[self.capacity - (k - self._next) :], array[: self._next]))

    def gauc(self, window: int) -> float:
        """Per-user AUC weighted by impressions over the last ``window`` samples (samples without users skipped)."""

        def compute() -> float:
            with_user = self._last(window, self._has_users)
            y, p, user = (self._last(window, a) for a in (self._y, self._p, self._user))
            if not with_user.all():
                y, p, user = y[with_user], p[with_user], user[with_user]
            return gauc(y, p, user)

        return self._cached("gauc", window, compute)

    def log_loss(self, window: int | None) -> float:
        """Mean binary cross-entropy of the predictions (``nan`` before any sample)."""
        if window is None:
            return self._sum_loss / self._count if self._count else math.nan

        def compute() -> float:
            losses = self._last(window, self._loss)
            return float(np.mean(losses)) if len(losses) else math.nan

        return self._cached("log_loss", window, compute)

    def positive_rate(self, window: int | None) -> float:
        """Share of positive labels (``nan`` before any sample)."""
        if window is None:
            return self._sum_y / self._count if self._count else math.nan
        y = self._last(window, self._y)
        return float(np.count_nonzero(y) / len(y)) if len(y) else math.nan

    def calibration_ratio(self, window: int | None) -> float:
        """Mean prediction / mean label: 1 is calibrated on average, > 1 over-predicts; ``nan`` without positives."""
        if window is None:
            return self._sum_p / self._sum_y if self._sum_y else math.nan
        positives = np.count_nonzero(self._last(window, self._y))
        return float(self._last(window, self._p).sum() / positives) if positives else math.nan

    def summary(self, gauc_windows: Sequence[int] | None = None,
                metrics: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Every metric for every window: ``{metric: {window label: value}}``, window labels ``"10000"``, ...,
        and ``"lifetime"``. GAUC (no lifetime value) only for ``gauc_windows`` (default: every window).
        ``metrics``: only these of :data:`METRICS` (default all; a reader that shows two skips the others' sums)."""
        out: dict[str, dict[str, float]] = {}
        labels: list[tuple[str, int | None]] = [(str(w), w) for w in self.windows] + [("lifetime", None)]
        wanted = METRICS if metrics is None else tuple(metrics)
        unknown = set(wanted) - set(METRICS)
        if unknown:
            raise KeyError(f"unknown metrics {sorted(unknown)}; known: {list(METRICS)}")
        for name in ("auc", "log_loss", "calibration_ratio", "positive_rate"):
            if name in wanted:
                out[name] = {label: getattr(self, name)(w) for label, w in labels}
        if "gauc" in wanted:
            gauc_windows = self.windows if gauc_windows is None else gauc_windows
            out["gauc"] = {str(w): self.gauc(w) for w in gauc_windows}
        if "samples" in wanted:
            out["samples"] = {label: float(self.samples(w)) for label, w in labels}
        return out


def user_ids_of(users: ArrayLike | Sequence, n: int) -> np.ndarray:
    """Integer ids for grouping: integers pass through, anything else is hashed (stable within a process). A
    caller that updates several streams with one batch's users converts them once and passes the integers."""
    arr = np.asarray(users)
    if arr.shape != (n,):
        raise ValueError(f"users must have one entry per sample ({n}), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    return np.fromiter(map(hash, arr.tolist()), dtype=np.int64, count=n)

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


def histogram_auc(pos_counts: np.ndarray, neg_counts: np.ndarray) -> float:
    """AUC from per-bin counts of positives and negatives (bins in increasing score order; same bin = tie).

    >>> histogram_auc(np.array([0, 1, 1]), np.array([1, 1, 0]))
    0.875
    """
    n_pos = float(pos_counts.sum())
    n_neg = float(neg_counts.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg_counts) - neg_counts
    wins = np.sum(pos_counts * (neg_below + 0.5 * neg_counts))
    return float(wins / (n_pos * n_neg))


class SortedWindow:
    """One window's samples kept in score order between reads, for its exact AUC in O(window) instead of a sort.

    A read drops the samples that left the window since the last read and merges in the ones that arrived (sorted
    among themselves, then placed with one ``searchsorted`` and ``np.insert``), so consecutive reads of a window
    that moved by ``d`` samples cost a sort of ``d`` and a few linear passes. The AUC comes from the runs of equal
    scores (average ranks), the sum of the positives' ranks added up exactly as ``models.metrics.auc`` adds it
    (half-integers and their products with counts are exact in float64), so the value is that function's bit
    for bit.

    >>> w = SortedWindow()
    >>> w.auc(np.array([0, 1, 1, 0], bool), np.array([0.2, 0.8, 0.4, 0.4]), count=4)
    0.875
    >>> w.auc(np.array([0, 1, 0], bool), np.array([0.4, 0.3, 0.9]), count=6)  # the window: the last 3 samples
    0.0
    """

    def __init__(self) -> None:
        self.count = 0  # stream samples seen at the last read
        self.scores = np.zeros(0)
        self.labels = np.zeros(0, dtype=bool)
        self.seq = np.zeros(0, dtype=np.int64)  # each kept sample's number in the stream

    def auc(self, y_new: np.ndarray, p_new: np.ndarray, count: int, n: int | None = None) -> float:
        """AUC of the last ``n`` samples (default ``len(y_new)``) of a stream that has seen ``count``; ``y_new``,
        ``p_new``: its samples since the last read, in arrival order (all of the window's after a reset)."""
        n = len(y_new) if n is None else n
        arrived = count - self.count
        if arrived >= n or arrived < 0 or arrived != len(y_new) or not len(self.seq):
            y_new, p_new = y_new[-n:], p_new[-n:]  # start over from the window itself
            self.scores, self.labels, self.seq = np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
        keep = self.seq >= count - n
        scores, labels, seq = self.scores[keep], self.labels[keep], self.seq[keep]
        order = np.argsort(p_new, kind="stable")
        added = p_new[order]
        at = np.searchsorted(scores, added)
        self.scores = np.insert(scores, at, added)
        self.labels = np.insert(labels, at, y_new[order])
        self.seq = np.insert(seq, at, np.arange(count - len(p_new), count, dtype=np.int64)[order])
        self.count = count
        return _sorted_auc(self.scores, self.labels)


def _sorted_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUC of samples sorted by score (ties: average ranks), as ``models.metrics.auc`` computes it."""
    n_pos = int(np.count_nonzero(labels))
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    positives = np.add.reduceat(labels.astype(np.int64), starts)
    rank_sum = float(np.sum((starts + ends + 1) / 2.0 * positives))
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


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
        for name in ("_y", "_p", "_user", "_has_users", "_pos_hist", "_neg_hist"):
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
        user_ids = None if users is None else _user_ids(users, n)
        self.version += 1
        # Lifetime sums and histograms.
        if losses is None:
            clipped = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
            losses = -np.where(y, np.log(clipped), np.log1p(-clipped))
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
            y, p = y[-self.capacity :], p[-self.capacity :]
            user_ids = None if user_ids is None else user_ids[-self.capacity :]
            n = self.capacity
        positions = (self._next + np.arange(n)) % self.capacity
        self._y[positions] = y
        self._p[positions] = p
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
        self._pos_hist += np.bincount(signed[signed >= 0], minlength=self._bins)
        self._neg_hist += np.bincount(-1 - signed[signed < 0], minlength=self._bins)

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
            y, p = self._last(window, self._y), self._last(window, self._p)
            if len(y) == 0:
                return math.nan
            p = np.clip(p, LOG_LOSS_EPS, 1 - LOG_LOSS_EPS)
            return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))

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

    def summary(self, gauc_windows: Sequence[int] | None = None) -> dict[str, dict[str, float]]:
        """Every metric for every window: ``{metric: {window label: value}}``, window labels ``"10000"``, ...,
        and ``"lifetime"``. GAUC (no lifetime value) only for ``gauc_windows`` (default: every window)."""
        out: dict[str, dict[str, float]] = {}
        labels: list[tuple[str, int | None]] = [(str(w), w) for w in self.windows] + [("lifetime", None)]
        for name in ("auc", "log_loss", "calibration_ratio", "positive_rate"):
            out[name] = {label: getattr(self, name)(w) for label, w in labels}
        gauc_windows = self.windows if gauc_windows is None else gauc_windows
        out["gauc"] = {str(w): self.gauc(w) for w in gauc_windows}
        out["samples"] = {label: float(self.samples(w)) for label, w in labels}
        return out


def _user_ids(users: ArrayLike | Sequence, n: int) -> np.ndarray:
    """Integer ids for grouping: integers pass through, anything else is hashed (stable within a process)."""
    arr = np.asarray(users)
    if arr.shape != (n,):
        raise ValueError(f"users must have one entry per sample ({n}), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    return np.fromiter((hash(u) for u in arr.tolist()), dtype=np.int64, count=n)

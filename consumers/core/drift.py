"""Drift detection, pure: river's ADWIN and PageHinkley on a task's per-sample loss (:class:`LossDriftDetectors`),
and a detector on the windowed AUC itself, with its threshold in AUC points (:class:`AucDropDetector`).

The detectors see the prequential log loss of each sample (predicted before the update). A rise in loss is a
change in the data or a broken model; only *increases* count: PageHinkley runs with ``mode="up"``, and ADWIN
(two-sided) counts a change only when its mean after the cut is above its mean before it. A model that is
still learning lowers its loss all the time, and that is not a drift.

River's detectors are per-sample Python objects (about 2 µs per ADWIN update and 5 µs per PageHinkley update
on this machine). To keep their cost off the training step, losses can be averaged over ``chunk`` consecutive
samples before they reach the detectors: the detectors then see a less noisy stream ``chunk`` times shorter,
and a detection delay measured in chunks is multiplied by ``chunk`` to give samples. ``chunk=1`` feeds every
sample.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> detectors = LossDriftDetectors(chunk=8)
>>> fired = [detectors.update(rng.exponential(0.3, 256)) for _ in range(40)]  # stationary
>>> sum(len(f) for f in fired)
0
>>> fired = [detectors.update(rng.exponential(1.0, 256)) for _ in range(10)]  # loss triples
>>> sorted({name for f in fired for name in f})
['adwin', 'page_hinkley']
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import threading
import types
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from consumers.core.quality import histogram_auc

LOSS_DETECTORS: tuple[str, ...] = ("adwin", "page_hinkley")
AUC_DETECTOR = "auc_drop"
DETECTORS: tuple[str, ...] = (*LOSS_DETECTORS, AUC_DETECTOR)  # every detector a task has, as exported

_IMPORT_LOCK = threading.Lock()


@functools.cache
def river_loss_detectors() -> tuple[type, type]:
    """River's ``ADWIN`` and ``PageHinkley`` classes, without the import of ``river.drift`` as a whole.

    ``river.drift``'s package ``__init__`` imports every detector of the package: KSWIN brings scipy's statistics,
    the drift datasets bring ``river.datasets`` (with scipy's io and sparse modules), about 1.3 s of a trainer's
    start on this project's machine against 0.1 s for the two modules used here (``python -X importtime``). The two
    are loaded as submodules of a bare stand-in for the package, and the stand-in and everything loaded under it are
    taken out of ``sys.modules`` again, so nothing else ever sees them: a later ``from river import drift`` loads the
    real package as if this had not happened. Where river is laid out otherwise, or its ``drift`` package is loaded
    already, the plain import.
    """
    with _IMPORT_LOCK:
        spec = None if "river.drift" in sys.modules else importlib.util.find_spec("river")
        folders = list(spec.submodule_search_locations or ()) if spec else []
        if folders:
            bare = types.ModuleType("river.drift")  # the package without its __init__: a place for submodules
            bare.__path__, bare.__package__ = [os.path.join(folders[0], "drift")], "river.drift"
            sys.modules["river.drift"] = bare
            try:
                return (importlib.import_module("river.drift.adwin").ADWIN,
                        importlib.import_module("river.drift.page_hinkley").PageHinkley)
            except ImportError:
                pass
            finally:
                for name in [n for n in sys.modules if n == "river.drift" or n.startswith("river.drift.")]:
                    del sys.modules[name]
    from river import drift

    return drift.ADWIN, drift.PageHinkley


# Per-sample log loss is heavy-tailed (one confident mistake costs ~16 nats); clip so a single sample cannot
# look like a drift by itself.
LOSS_CLIP = 10.0


class LossDriftDetectors:
    """ADWIN and PageHinkley on one stream of per-sample losses.

    ``update(losses)`` returns the names (from :data:`LOSS_DETECTORS`) of the detectors that fired during this
    batch; ``detections`` counts them, and ``samples_seen`` is the number of losses fed so far. River resets
    a detector's statistics after it fires, so a lasting change fires once (or a few times while ADWIN's
    window shrinks), not on every later sample.
    """

    def __init__(
        self,
        chunk: int = 8,
        adwin_delta: float = 0.0002,
        ph_threshold: float = 400.0,
        ph_delta: float = 0.1,
        ph_min_instances: int = 30,
    ) -> None:
        adwin_class, page_hinkley_class = river_loss_detectors()  # here: importing this module stays cheap

        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        # adwin_delta 0.0002, not river's 0.002: at 0.002 ADWIN fired once on the drift-free KuaiRand-Pure log
        # (long_view, 913k task-samples); at 0.0002 never, and it still catches a drift of magnitude 0.2 within
        # ~1,500 samples (bench/drift_sensitivity.py, docs/monitoring.md "Choosing drift thresholds").
        self._adwin = adwin_class(delta=adwin_delta)
        # ph_threshold is the cumulative excess loss, in nats summed over samples, that counts as a drift; the
        # detector sums chunk means, hence the division. Tuned on a stationary stream of per-sample log loss
        # (mean 0.58, std 0.6): 400 gave 0 or 1 false alarm per million samples, 200 gave 1 to 3, 100 gave 4 to
        # 15; the delay on a 0.4-nat jump was about 1,100 samples (tests/unit/consumers/core/test_quality_drift.py).
        self._page_hinkley = page_hinkley_class(
            min_instances=ph_min_instances, delta=ph_delta, threshold=ph_threshold / self.chunk, mode="up"
        )
        self._pending: list[np.ndarray] = []  # losses not yet forming a full chunk
        self._pending_n = 0
        self.samples_seen = 0
        self.detections: dict[str, int] = dict.fromkeys(LOSS_DETECTORS, 0)

    def update(self, losses: ArrayLike) -> list[str]:
        """Feed a batch of per-sample losses; return the detectors that fired (each name at most once)."""
        losses = np.clip(np.asarray(losses, dtype=np.float64).reshape(-1), 0.0, LOSS_CLIP)
        self.samples_seen += len(losses)
        if self.chunk > 1:
            if self._pending_n:
                losses = np.concatenate([*self._pending, losses])
            full = (len(losses) // self.chunk) * self.chunk
            rest = losses[full:]
            self._pending, self._pending_n = ([rest], len(rest)) if len(rest) else ([], 0)
            values = losses[:full].reshape(-1, self.chunk).mean(axis=1)
        else:
            values = losses
        fired: list[str] = []
        adwin, page_hinkley = self._adwin, self._page_hinkley
        for value in values.tolist():
            mean_before = adwin.estimation
            adwin.update(value)
            # ADWIN drops the older part of its window on a change: a higher mean afterwards = the loss rose.
            if adwin.drift_detected and adwin.estimation > mean_before and "adwin" not in fired:
                fired.append("adwin")
            page_hinkley.update(value)
            if page_hinkley.drift_detected and "page_hinkley" not in fired:
                fired.append("page_hinkley")
        for name in fired:
            self.detections[name] += 1
        return fired


class AucDropDetector:
    """Fires when a task's AUC over its last ``window`` samples is ``min_drop`` or more below its AUC over the
    ``reference`` samples just before them, and the fall is beyond noise.

    The units are those of the dashboard's AUC panels: ``min_drop = 0.05`` fires when the recent AUC reads, say,
    0.67 where it read 0.72 over the samples before. Noise guard: the fall must also exceed ``z`` standard errors
    of the difference of the two AUCs (Hanley & McNeil's error from each window's positives and negatives), so a
    rare task, whose AUC over a few thousand samples moves by several points on its own, needs a larger fall.

    Cost: scores are binned on the logit scale (``bins`` bins over logits -8..8, ties within a bin count one half)
    into one histogram per ``block`` samples; every ``block`` samples the two windows' histograms are summed and
    compared: a few microseconds per batch, no sort. ``window`` and ``reference`` are rounded to whole blocks.
    After a detection both windows fill again with new samples before the next check, so a lasting change fires
    once, and the samples after it become the new reference.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> detector = AucDropDetector(window=2000, reference=8000)
    >>> def batch(informative):
    ...     score = rng.normal(size=500)
    ...     label = rng.random(500) < 1 / (1 + np.exp(-2 * (score if informative else rng.normal(size=500))))
    ...     return label, 1 / (1 + np.exp(-score))
    >>> [detector.update(*batch(True)) for _ in range(40)].count(True)  # AUC ~0.8 throughout
    0
    >>> fired = [detector.update(*batch(False)) for _ in range(8)]  # the scores stop ranking: AUC ~0.5
    >>> fired.index(True) * 500 + 500  # samples after the change until the detection
    1000
    >>> round(detector.last["reference_auc"] - detector.last["recent_auc"], 2)
    0.18
    """

    LOGIT_RANGE = 8.0

    def __init__(self, window: int = 5_000, reference: int = 20_000, min_drop: float = 0.05, z: float = 4.0,
                 block: int = 1_000, bins: int = 1_024) -> None:
        if block < 1 or window < block or reference < block:
            raise ValueError(f"window ({window}) and reference ({reference}) must hold at least one block ({block})")
        if not 0 < min_drop < 1 or z < 0:
            raise ValueError(f"min_drop must be in (0, 1) AUC points and z >= 0, got {min_drop}, {z}")
        self.block, self.bins = int(block), int(bins)
        self.window_blocks = max(1, round(window / block))
        self.reference_blocks = max(1, round(reference / block))
        self.min_drop, self.z = float(min_drop), float(z)
        self._ring = np.zeros((self.window_blocks + self.reference_blocks, 2, self.bins), dtype=np.int64)
        self._head = 0  # ring slot of the next closed block (= of the oldest one)
        # the two windows' histograms, kept as running sums of the ring's blocks (exact integers): the reference
        # window is the ring's oldest reference_blocks blocks, the recent one the rest
        self._reference = np.zeros((2, self.bins), dtype=np.int64)
        self._recent = np.zeros((2, self.bins), dtype=np.int64)
        self._open: list[np.ndarray] = []  # the open block's keys (bin, + bins if positive), counted at its close
        self._in_block = 0
        self._filled = 0  # blocks closed since the start or the last detection
        self.samples_seen = 0
        self.detections = 0
        self.last: dict[str, float] = {}  # the last comparison: recent_auc, reference_auc, drop, threshold

    def update(self, y: ArrayLike, p: ArrayLike) -> bool:
        """Feed a batch of labels (> 0 positive) and predicted probabilities; True if the detector fired."""
        y = np.asarray(y).reshape(-1) > 0
        p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
        logits = np.log(p) - np.log1p(-p)
        scaled = (logits + self.LOGIT_RANGE) * (self.bins / (2 * self.LOGIT_RANGE))
        keys = np.clip(scaled.astype(np.int64), 0, self.bins - 1) + self.bins * y
        self.samples_seen += len(keys)
        fired = False
        start = 0
        while start < len(keys):
            take = min(self.block - self._in_block, len(keys) - start)
            self._open.append(keys[start:start + take])
            self._in_block += take
            start += take
            if self._in_block == self.block:
                fired = self._close_block() or fired
        return fired

    def _close_block(self) -> bool:
        keys = np.concatenate(self._open)
        block = np.bincount(keys, minlength=2 * self.bins).reshape(2, self.bins)  # [neg | pos]
        # the oldest block leaves the reference window, the oldest recent one moves into it, the new one arrives
        moving = self._ring[(self._head + self.reference_blocks) % len(self._ring)]
        self._reference += moving - self._ring[self._head]
        self._recent += block - moving
        self._ring[self._head] = block
        self._head = (self._head + 1) % len(self._ring)
        self._open = []
        self._in_block = 0
        self._filled += 1
        if self._filled < len(self._ring):
            return False
        (ref_auc, ref_se), (recent_auc, recent_se) = _auc_and_error(self._reference), _auc_and_error(self._recent)
        drop = ref_auc - recent_auc
        threshold = max(self.min_drop, self.z * math.hypot(ref_se, recent_se))
        self.last = {"recent_auc": recent_auc, "reference_auc": ref_auc, "drop": drop, "threshold": threshold}
        if not drop >= threshold:  # NaN (one class in a window) never fires
            return False
        self.detections += 1
        self._filled = 0
        return True


def _auc_and_error(histograms: np.ndarray) -> tuple[float, float]:
    """AUC of [negatives, positives] bin counts and its standard error (Hanley & McNeil 1982)."""
    negatives, positives = histograms
    a = histogram_auc(positives, negatives)
    n_pos, n_neg = float(positives.sum()), float(negatives.sum())
    if math.isnan(a):
        return a, math.nan
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return a, math.sqrt(max(variance, 0.0))


def per_sample_log_loss(y: ArrayLike, p: ArrayLike, eps: float = 1e-7) -> np.ndarray:
    """Binary cross-entropy of each sample (labels > 0 are positive), clipped as in models.metrics.

    >>> per_sample_log_loss([1, 0], [0.5, 0.5]).round(4).tolist()
    [0.6931, 0.6931]
    """
    y = np.asarray(y).reshape(-1) > 0
    p = np.clip(np.asarray(p, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return np.where(y, -np.log(p), -np.log1p(-p))


def detection_delay(fired_at: Sequence[int], change_at: int) -> int | None:
    """Samples from ``change_at`` to the first detection at or after it (``None`` if none).

    >>> detection_delay([120, 5300, 5900], 5000)
    300
    """
    after = [i for i in fired_at if i >= change_at]
    return min(after) - change_at if after else None

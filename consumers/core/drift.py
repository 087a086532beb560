"""Drift detection on a task's per-sample loss: river's ADWIN and PageHinkley behind one small class, pure.

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

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

DETECTORS: tuple[str, ...] = ("adwin", "page_hinkley")

# Per-sample log loss is heavy-tailed (one confident mistake costs ~16 nats); clip so a single sample cannot
# look like a drift by itself.
LOSS_CLIP = 10.0


class LossDriftDetectors:
    """ADWIN and PageHinkley on one stream of per-sample losses.

    ``update(losses)`` returns the names (from :data:`DETECTORS`) of the detectors that fired during this
    batch; ``detections`` counts them, and ``samples_seen`` is the number of losses fed so far. River resets
    a detector's statistics after it fires, so a lasting change fires once (or a few times while ADWIN's
    window shrinks), not on every later sample.
    """

    def __init__(
        self,
        chunk: int = 8,
        adwin_delta: float = 0.002,
        ph_threshold: float = 400.0,
        ph_delta: float = 0.1,
        ph_min_instances: int = 30,
    ) -> None:
        from river import drift  # river is imported here so that importing this module stays cheap

        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.chunk = int(chunk)
        self._adwin = drift.ADWIN(delta=adwin_delta)
        # ph_threshold is the cumulative excess loss, in nats summed over samples, that counts as a drift; the
        # detector sums chunk means, hence the division. Tuned on a stationary stream of per-sample log loss
        # (mean 0.58, std 0.6): 400 gave 0 or 1 false alarm per million samples, 200 gave 1 to 3, 100 gave 4 to
        # 15; the delay on a 0.4-nat jump was about 1,100 samples (tests/unit/consumers/core/test_quality_drift.py).
        self._page_hinkley = drift.PageHinkley(
            min_instances=ph_min_instances, delta=ph_delta, threshold=ph_threshold / self.chunk, mode="up"
        )
        self._pending: list[np.ndarray] = []  # losses not yet forming a full chunk
        self._pending_n = 0
        self.samples_seen = 0
        self.detections: dict[str, int] = dict.fromkeys(DETECTORS, 0)

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

"""consumers.core.quality: windowed metrics are exact (against models.metrics and river), lifetime AUC is close."""

from __future__ import annotations

import math

import numpy as np
import pytest

from consumers.core.quality import StreamQuality
from models import metrics as offline

pytestmark = pytest.mark.unit


def batches(rng: np.random.Generator, n_batches: int, size: int, ties: bool = False):
    for _ in range(n_batches):
        logit = rng.normal(0, 1.5, size)
        y = (rng.random(size) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        p = 1 / (1 + np.exp(-(logit + rng.normal(0, 1, size))))
        if ties:
            p = np.round(p, 2)  # many tied scores
        users = rng.integers(0, 40, size)
        yield y, p, users


def test_windowed_metrics_equal_offline_metrics_of_the_last_w_samples_after_wraparound() -> None:
    rng = np.random.default_rng(3)
    quality = StreamQuality(windows=(300, 1000))
    seen_y, seen_p, seen_u = [], [], []
    for y, p, users in batches(rng, 23, 97, ties=True):  # 97 does not divide the windows: the ring wraps mid-batch
        quality.update(y, p, users)
        seen_y.append(y), seen_p.append(p), seen_u.append(users)
        all_y, all_p, all_u = np.concatenate(seen_y), np.concatenate(seen_p), np.concatenate(seen_u)
        for w in (300, 1000):
            y_w, p_w, u_w = all_y[-w:], all_p[-w:], all_u[-w:]
            assert quality.samples(w) == len(y_w)
            assert quality.auc(w) == pytest.approx(offline.auc(y_w, p_w), abs=1e-12)
            assert quality.gauc(w) == pytest.approx(offline.gauc(y_w, p_w, u_w), abs=1e-12)
            assert quality.log_loss(w) == pytest.approx(offline.log_loss(y_w, p_w), rel=1e-9)
            assert quality.calibration_ratio(w) == pytest.approx(offline.calibration_ratio(y_w, p_w), rel=1e-9)
            assert quality.positive_rate(w) == pytest.approx(y_w.mean())


def test_windowed_auc_equals_rivers_rolling_roc_auc_after_every_batch() -> None:
    from river.metrics import RollingROCAUC

    rng = np.random.default_rng(4)
    window = 500
    river_auc = RollingROCAUC(window_size=window)
    quality = StreamQuality(windows=(window,))
    compared = 0
    for y, p, _ in batches(rng, 30, 64):
        for yi, pi in zip(y.tolist(), p.tolist()):
            river_auc.update(yi, pi)
        quality.update(y, p)
        assert quality.auc(window) == pytest.approx(river_auc.get(), abs=1e-12)
        compared += 1
    assert compared == 30


def test_lifetime_metrics_cover_the_whole_stream() -> None:
    rng = np.random.default_rng(5)
    quality = StreamQuality(windows=(100,))
    parts = list(batches(rng, 20, 500))
    for y, p, users in parts:
        quality.update(y, p, users)
    all_y = np.concatenate([b[0] for b in parts])
    all_p = np.concatenate([b[1] for b in parts])
    assert quality.samples(None) == len(all_y)
    # Histogram AUC: only pairs sharing one of 65,536 bins count 1/2 instead of 0 or 1.
    assert quality.auc(None) == pytest.approx(offline.auc(all_y, all_p), abs=1e-4)
    assert quality.log_loss(None) == pytest.approx(offline.log_loss(all_y, all_p), rel=1e-9)
    assert quality.calibration_ratio(None) == pytest.approx(offline.calibration_ratio(all_y, all_p), rel=1e-9)
    assert quality.positive_rate(None) == pytest.approx(all_y.mean())


def test_a_batch_longer_than_the_largest_window_keeps_its_last_samples() -> None:
    rng = np.random.default_rng(6)
    y, p, _ = next(batches(rng, 1, 2500))
    quality = StreamQuality(windows=(1000,))
    quality.update(y, p)
    assert quality.samples(1000) == 1000 and quality.samples(None) == 2500
    assert quality.auc(1000) == pytest.approx(offline.auc(y[-1000:], p[-1000:]), abs=1e-12)


def test_gauc_is_nan_without_users_and_skips_samples_without_users() -> None:
    quality = StreamQuality(windows=(10,))
    quality.update(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]))
    assert math.isnan(quality.gauc(10))
    quality.update(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.3, 0.7]), users=["a", "a", "b", "b"])
    assert quality.gauc(10) == pytest.approx(0.5)  # user a: 1.0, user b: 0.0, equal weights


def test_undefined_values_are_nan_before_any_sample() -> None:
    quality = StreamQuality(windows=(10,))
    assert math.isnan(quality.auc(10)) and math.isnan(quality.log_loss(10)) and math.isnan(quality.auc(None))
    assert quality.samples(10) == 0


def test_an_untracked_window_is_a_key_error_naming_the_tracked_ones() -> None:
    quality = StreamQuality(windows=(10, 20))
    with pytest.raises(KeyError, match=r"\[10, 20\]"):
        quality.auc(15)


def test_refresh_every_lets_a_window_lag_by_at_most_that_many_samples() -> None:
    quality = StreamQuality(windows=(10, 1000), refresh_every={1000: 100})
    quality.update(np.array([0, 1] * 50), np.linspace(0, 1, 100))
    first = quality.auc(1000)
    quality.update(np.array([1, 0] * 25), np.linspace(0, 1, 50))  # 50 < 100 new samples: cached value
    assert quality.auc(1000) == first
    quality.update(np.array([1, 0] * 25), np.linspace(0, 1, 50))  # 100 new samples: recomputed
    assert quality.auc(1000) != first


def test_a_copy_is_independent_and_its_values_can_be_adopted() -> None:
    quality = StreamQuality(windows=(10,))
    quality.update(np.array([0, 1, 0, 1]), np.array([0.1, 0.9, 0.2, 0.8]))
    reader = quality.copy()
    quality.update(np.array([1, 0]), np.array([0.1, 0.9]))
    assert reader.samples(10) == 4 and quality.samples(10) == 6
    assert reader.auc(10) == 1.0
    quality.adopt_cache(reader)  # a value computed at count 4 must not stand for count 6
    assert quality.auc(10) == pytest.approx(offline.auc([0, 1, 0, 1, 1, 0], [0.1, 0.9, 0.2, 0.8, 0.1, 0.9]))


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        StreamQuality(windows=(10,)).update(np.array([0, 1]), np.array([0.5]))


@pytest.mark.parametrize("seed", range(6))
def test_windowed_auc_kept_in_score_order_is_the_offline_auc_bit_for_bit(seed: int) -> None:
    # SortedWindow merges the samples that arrived into the window's sorted scores instead of sorting the window
    # at every read: equal to models.metrics.auc (==, not approx) at every read, with ties (scores rounded to 2
    # decimals), reads after 1 to thousands of samples, windows not yet full, the ring wrapping, a refresh lag,
    # and a copy read on the side
    rng = np.random.default_rng(seed)
    windows = (50, 300, 2_000)
    q = StreamQuality(windows, refresh_every={2_000: 7})
    ys, ps = [], []
    for _ in range(120):
        n = int(rng.choice([1, 3, 17, 64, 256, 700]))
        y = rng.random(n) < rng.uniform(0.05, 0.6)
        p = np.round(rng.random(n), 2) if rng.random() < 0.5 else rng.random(n).astype(np.float32).astype(float)
        q.update(y, p)
        ys.append(y)
        ps.append(p)
        if rng.random() < 0.5:
            continue
        y_all, p_all = np.concatenate(ys), np.concatenate(ps)
        for w in windows:
            if w == 2_000 and q._cache.get(("auc", w)) and len(y_all) - q._cache[("auc", w)][1] < 7:
                continue  # the refresh lag keeps the value of a few samples ago
            got, want = q.auc(w), offline.auc(y_all[-w:], p_all[-w:])
            assert got == want or (math.isnan(got) and math.isnan(want)), (w, len(y_all))
        if rng.random() < 0.2:
            clone = q.copy()
            assert clone.auc(300) == offline.auc(y_all[-300:], p_all[-300:]) or len(set(y_all[-300:])) < 2


def test_users_converted_once_give_every_stream_the_same_gauc() -> None:
    from consumers.core.quality import user_ids_of

    rng = np.random.default_rng(8)
    y, p = rng.random(300) < 0.4, rng.random(300)
    users = np.array([f"u{k}" for k in rng.integers(0, 20, 300)], dtype=object)
    by_name, by_id = StreamQuality(windows=(300,)), StreamQuality(windows=(300,))
    by_name.update(y, p, users)
    by_id.update(y, p, user_ids_of(users, len(users)))
    assert by_name.gauc(300) == by_id.gauc(300) == pytest.approx(offline.gauc(y, p, users), abs=1e-12)


def test_lifetime_auc_is_the_exact_auc_of_the_binned_scores() -> None:
    # the histograms' AUC counts a shared bin as a tie, nothing else: models.metrics.auc of the bin indices, bit
    # for bit, however the reads fold the pending batches in (every batch, every few batches, once at the end)
    rng = np.random.default_rng(21)
    q = StreamQuality(windows=(100,), lifetime_bins=256)
    ys, ps = [], []
    for k in range(60):
        n = int(rng.choice([1, 5, 90, 400]))
        y = rng.random(n) < 0.3
        p = np.clip(rng.random(n) * 0.7 + 0.3 * y, 0, 1)
        p[rng.random(n) < 0.05] = 1.0  # the top bin takes 1.0
        q.update(y, p)
        ys.append(y)
        ps.append(p)
        if k % 7 == 0 or k == 59:
            bins = np.minimum((np.concatenate(ps) * 256).astype(np.int64), 255)
            assert q.auc(None) == offline.auc(np.concatenate(ys), bins.astype(float))

"""The synthetic generator: reproducible, lazy, correlated tasks, drift that moves label rates."""

from __future__ import annotations

import itertools
import resource
import types

import numpy as np
import pytest

from streamer.datasets import DatasetError, open_dataset

pytestmark = pytest.mark.unit


def rates(records, task: str) -> float:
    return float(np.mean([r.labels[task] for r in records]))


def test_same_seed_gives_the_identical_stream() -> None:
    a = list(open_dataset("synthetic", None, n_events="5000", seed="7").interactions())
    b = list(open_dataset("synthetic", None, n_events="5000", seed="7").interactions())
    assert a == b


def test_interactions_can_be_replayed_from_the_same_object() -> None:
    dataset = open_dataset("synthetic", None, n_events=3000, seed=3)
    assert list(dataset.interactions()) == list(dataset.interactions())


def test_another_seed_gives_another_stream() -> None:
    a = list(open_dataset("synthetic", None, n_events=500, seed=1).interactions())
    b = list(open_dataset("synthetic", None, n_events=500, seed=2).interactions())
    assert [r.labels for r in a] != [r.labels for r in b]


def test_events_are_in_time_order_with_delays_only_for_positive_tasks() -> None:
    records = list(open_dataset("synthetic", None, n_events=10_000, tasks="click,like,share",
                                max_delay_s="60").interactions())
    assert all(a.ts_ms <= b.ts_ms for a, b in zip(records, records[1:]))
    assert {tuple(r.labels) for r in records} == {("click", "like", "share")}
    for record in records:
        assert set(record.feedback_delay_ms) == {t for t, y in record.labels.items() if y}
        assert all(0 <= d <= 60_000 for d in record.feedback_delay_ms.values())


def test_task_labels_are_correlated_as_configured() -> None:
    def label_correlation(rho: str) -> float:
        records = list(open_dataset("synthetic", None, n_events=20_000, correlation=rho, seed=5).interactions())
        y = np.array([[r.labels["task0"], r.labels["task1"]] for r in records], dtype=float)
        return float(np.corrcoef(y.T)[0, 1])

    assert label_correlation("0.9") > label_correlation("0.0") + 0.3
    assert abs(label_correlation("0.0")) < 0.05


def test_abrupt_drift_changes_the_drifted_tasks_label_rate_only() -> None:
    records = list(open_dataset("synthetic", None, n_events=20_000, drift="abrupt", drift_at="10000",
                                drift_task="task1", drift_bias="-2").interactions())
    before, after = records[:10_000], records[10_000:]
    assert rates(after, "task1") < rates(before, "task1") - 0.15
    assert abs(rates(after, "task0") - rates(before, "task0")) < 0.03


def test_gradual_drift_moves_the_rate_progressively() -> None:
    records = list(open_dataset("synthetic", None, n_events=30_000, drift="gradual", drift_at="10000",
                                drift_width="10000", drift_bias="-3").interactions())
    before, during, after = records[:10_000], records[10_000:20_000], records[20_000:]
    assert rates(before, "task0") > rates(during, "task0") > rates(after, "task0")


def test_drift_can_be_placed_at_an_event_time() -> None:
    start = 1_700_000_000_000
    records = list(open_dataset("synthetic", None, n_events=20_000, drift="abrupt", start_ms=str(start),
                                rate_per_s="100", drift_at_ms=str(start + 100_000), drift_bias="-2").interactions())
    before = [r for r in records if r.ts_ms < start + 100_000]
    after = [r for r in records if r.ts_ms >= start + 100_000]
    assert len(before) > 1000 and len(after) > 1000
    assert rates(after, "task0") < rates(before, "task0") - 0.15


def logits_around(dataset, at: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits [n, K] of the same 20,000 random (user, item) pairs just before and just after the event index ``at``."""
    world = dataset._world()
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, dataset.n_users, 20_000), rng.integers(0, dataset.n_items, 20_000)
    return (dataset._drift_logits(world, users, items, np.full(20_000, at - 1.0)),
            dataset._drift_logits(world, users, items, np.full(20_000, float(at))))


@pytest.mark.parametrize("magnitude", [0.1, 0.25, 0.5, 1.0])
def test_drift_magnitude_sets_how_far_the_drifted_tasks_logits_move(magnitude: float) -> None:
    dataset = open_dataset("synthetic", None, tasks="click,like", drift="abrupt", drift_at="1000",
                           drift_magnitude=str(magnitude), drift_bias="0")
    before, after = logits_around(dataset, 1000)
    assert np.corrcoef(before[:, 0], after[:, 0])[0, 1] == pytest.approx(1 - 2 * magnitude, abs=0.03)
    assert np.std(after[:, 0]) == pytest.approx(np.std(before[:, 0]), rel=0.05)  # same spread: only the concept moves
    assert np.array_equal(before[:, 1], after[:, 1])  # like does not drift


def test_several_tasks_can_drift_and_a_recurring_drift_comes_back() -> None:
    dataset = open_dataset("synthetic", None, tasks="click,like,share", drift="recurring", drift_at="1000,2000",
                           drift_tasks="click,like", drift_magnitude="0.5", drift_bias="-1")
    first, drifted = logits_around(dataset, 1000)
    _, back = logits_around(dataset, 2000)
    for k in (0, 1):
        assert abs(np.corrcoef(first[:, k], drifted[:, k])[0, 1]) < 0.05
        assert np.allclose(back[:, k], first[:, k])  # A, B, A: the original concept returns
    assert np.array_equal(first[:, 2], drifted[:, 2])


def test_without_a_magnitude_the_original_drift_is_kept() -> None:
    """The generator before drift_magnitude existed: the task's own item factors redrawn (correlation ``rho``)."""
    dataset = open_dataset("synthetic", None, drift="abrupt", drift_at="1000", drift_bias="0", correlation="0.5")
    before, after = logits_around(dataset, 1000)
    assert np.corrcoef(before[:, 0], after[:, 0])[0, 1] == pytest.approx(0.5, abs=0.03)


def test_generation_is_lazy() -> None:
    stream = open_dataset("synthetic", None, n_events=10**12).interactions()
    assert isinstance(stream, types.GeneratorType)
    assert len(list(itertools.islice(stream, 10))) == 10  # a trillion events, first ten at once


@pytest.mark.slow
def test_a_million_events_stream_in_constant_memory() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    count = 0
    for _record in open_dataset("synthetic", None, n_events=1_000_000).interactions():
        count += 1
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert count == 1_000_000
    assert grown_mib < 100, f"peak memory grew {grown_mib:.0f} MiB; a list of 1M interactions would be ~1 GiB"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"correlation": "2"}, "correlation"),
        ({"drift": "sideways"}, "drift"),
        ({"drift": "abrupt"}, "exactly one of drift_at"),
        ({"drift_task": "nope"}, "drift_task"),
        ({"drift": "abrupt", "drift_at": "10", "drift_magnitude": "1.5"}, "drift_magnitude"),
        ({"n_events": "many"}, "n_events"),
        ({"colour": "red"}, "colour"),
        ({"tasks": "2", "biases": "1,2,3"}, "biases"),
    ],
)
def test_bad_options_are_named(options: dict[str, str], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        open_dataset("synthetic", None, **options)

"""What every data set adapter yields: time-ordered interactions with their labels and feedback delays.

An adapter turns a data set into ``Interaction`` records in non-decreasing ``ts_ms``. The streamer turns
each interaction into one impression event and, for every positive task label, one feedback event at
``ts_ms + feedback_delay_ms[task]``. Offline evaluation reads interactions directly (labels already joined).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

FeatureValue = str | int | float


@dataclass(frozen=True, slots=True)
class Interaction:
    """One impression of an item to a user, with the outcome of every task.

    ``labels`` maps each task to 0 or 1. ``feedback_delay_ms`` maps each task whose label is 1 to the delay,
    after ``ts_ms``, at which its feedback event happens (in event time). ``privileged``: outcomes known only after
    the impression (a mapping's ``privileged`` columns), read by ``crossdistil evaluate``'s privileged teacher and
    never streamed (an impression event carries its ``features`` only).
    """

    impression_id: str
    user_id: str
    item_id: str
    ts_ms: int
    features: dict[str, FeatureValue] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    feedback_delay_ms: dict[str, int] = field(default_factory=dict)
    privileged: dict[str, FeatureValue] = field(default_factory=dict)


class Dataset(Protocol):
    """A source of interactions. ``interactions()`` may be called more than once and yields the same records."""

    name: str
    tasks: tuple[str, ...]
    categorical_features: tuple[str, ...]
    numeric_features: tuple[str, ...]

    def interactions(self) -> Iterator[Interaction]:
        """Yield every interaction in non-decreasing ``ts_ms``; never holds more than a bounded window in memory
        unless the source itself must be sorted (KuaiRand is not sorted on disk)."""
        ...


class DatasetError(ValueError):
    """A data set cannot be read as asked: a missing file, column or mapping key, or a bad option.

    The message names what is wrong and where (file, column, key), so the CLI can print it as is.
    """

"""A publication whose weights are no longer numbers (a model that diverged in training) is refused by a replica as
``non_finite_weights``, naming the tensors, and the model it served goes on serving: scoring with NaN weights would
answer every request with NaN."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry

from consumers.runtime.telemetry import ServingMetrics
from consumers.serving.follower import CheckpointFollower, ModelHolder
from consumers.state.wire import encode_checkpoint
from tests.unit.consumers.serving.test_follower_damaged_topic import TopicConsumer
from tests.unit.consumers.serving.test_healthz_rejections import good, model  # noqa: F401 (model: a fixture)

pytestmark = pytest.mark.unit


def diverged(model: tuple, version: int, value: float) -> list:  # noqa: F811
    """``model``'s publication as ``version`` with one weight of its first floating-point tensor set to ``value``."""
    tensors, serving, chunk_size = model
    tensors = {name: t.clone() for name, t in tensors.items()}
    name = next(name for name, t in tensors.items() if t.is_floating_point() and t.numel() > 1)
    tensors[name].view(-1)[1] = value
    return encode_checkpoint(tensors, {"step": version, "serving": serving}, version=version, chunk_size=chunk_size)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_diverged_publication_is_refused_and_the_model_served_stays(model, value: float) -> None:  # noqa: F811
    holder, metrics = ModelHolder(), ServingMetrics(CollectorRegistry())
    topic = TopicConsumer(good(model, 1) + diverged(model, 2, value))
    follower = CheckpointFollower(topic, "model-updates", holder, metrics)
    follower.find_latest(threading.Event())
    assert holder.current is not None and holder.current.version == 1
    assert list(follower.stats.rejections) == [(2, "non_finite_weights")]
    last, since_load = holder.rejections
    assert since_load == 1 and last.reason == "non_finite_weights" and "(1 of " in last.detail, last


def test_a_diverged_first_publication_leaves_the_replica_without_a_model_rather_than_a_nan_one(model) -> None:  # noqa: F811
    holder, metrics = ModelHolder(), ServingMetrics(CollectorRegistry())
    follower = CheckpointFollower(TopicConsumer(diverged(model, 1, float("nan"))), "model-updates", holder, metrics)
    follower.find_latest(threading.Event())
    assert holder.current is None
    assert list(follower.stats.rejections) == [(1, "non_finite_weights")]

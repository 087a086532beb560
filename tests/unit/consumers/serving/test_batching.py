"""consumers.serving.batching: concurrent /score requests share one forward pass and get their own answers."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import torch

from consumers.serving.batching import Busy, ScoringBatcher
from consumers.serving.follower import ModelHolder, ServedModel
from consumers.serving.scoring import score_impressions
from models.config import ModelConfig
from models.features import FeatureSpec
from models.learner import Learner, ServingModel

pytestmark = pytest.mark.unit


def impression(i: int, **changes: object) -> dict:
    event = {"impression_id": f"imp{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 7}",
             "item_id": f"item{i % 11}", "features": {"hour": str(i % 24), "duration_ms": 100 * i}}
    event.update(changes)
    return event


def served_model(version: int = 1) -> ServedModel:
    config = ModelConfig(tasks=("click", "like"), hidden_dims=(8,), tower_dims=(4,),
                         features=FeatureSpec(categorical=("user_id", "item_id", "hour"), numeric=("duration_ms",),
                                              hash_buckets=1024))
    model = ServingModel.from_serving_state(*Learner(config).serving_state())
    return ServedModel(version, model, ("click", "like"), step=0, published_at_s=None, loaded_at_s=time.time())


class Gate:
    """Holds the scoring thread inside the model's forward until opened, so requests queue up behind it."""

    def __init__(self, served: ServedModel) -> None:
        self.entered, self.opened = threading.Event(), threading.Event()
        self.calls = 0
        original = served.model.model.forward

        def forward(*args, **kwargs):
            self.calls += 1
            self.entered.set()
            assert self.opened.wait(10)
            return original(*args, **kwargs)

        served.model.model.forward = forward  # type: ignore[method-assign]


def body(events: list) -> bytes:
    return json.dumps(events).encode()


def test_requests_queued_together_are_scored_in_one_forward_pass_and_answered_separately() -> None:
    holder = ModelHolder()
    served = served_model()
    holder.swap(served)
    gate = Gate(served)
    batcher = ScoringBatcher(holder, max_items=100)
    try:
        first = batcher.submit(body([impression(0)]))
        assert gate.entered.wait(10)
        requests = [[impression(10 * r + i) for i in range(r + 1)] for r in range(5)]
        futures = [batcher.submit(body(events)) for events in requests]
        gate.opened.set()
        answers = [future.result(timeout=10) for future in futures]
        assert first.result(timeout=10)[0] == 200
    finally:
        batcher.close()
    assert gate.calls == 2 and (batcher.batches, batcher.batched_requests) == (2, 6)
    for events, (status, payload, _, items) in zip(requests, answers):
        answer = json.loads(payload)
        alone = score_impressions(served, events)  # the same rows scored on their own
        assert status == 200 and items == len(events) and answer["impression_ids"] == alone["impression_ids"]
        for task in served.tasks:
            assert answer["probabilities"][task] == pytest.approx(alone["probabilities"][task], abs=1e-6)


def test_a_bad_request_in_a_batch_gets_its_own_400_and_the_others_are_scored() -> None:
    holder = ModelHolder()
    served = served_model()
    holder.swap(served)
    gate = Gate(served)
    batcher = ScoringBatcher(holder, max_items=100)
    try:
        batcher.submit(body([impression(0)]))
        assert gate.entered.wait(10)
        good = batcher.submit(body([impression(1)]))
        bad = batcher.submit(body([impression(2, features={"duration_ms": "12"})]))
        gate.opened.set()
        good_answer, bad_answer = good.result(timeout=10), bad.result(timeout=10)
    finally:
        batcher.close()
    assert good_answer[0] == 200 and json.loads(good_answer[1])["impression_ids"] == ["imp1"]
    assert bad_answer[0] == 400 and json.loads(bad_answer[1])["field"] == "features['duration_ms']"


def test_a_lone_request_does_not_wait_for_the_window() -> None:
    holder = ModelHolder()
    holder.swap(served_model())
    batcher = ScoringBatcher(holder, max_items=100, window_s=0.5)  # a window long enough to see
    try:
        batcher.submit(body([impression(0)])).result(timeout=10)  # warm
        started = time.monotonic()
        status = batcher.submit(body([impression(1)])).result(timeout=10)[0]
        elapsed = time.monotonic() - started
    finally:
        batcher.close()
    assert status == 200 and elapsed < 0.25


def test_a_request_still_being_read_is_waited_for_within_the_window() -> None:
    holder = ModelHolder()
    holder.swap(served_model())
    batcher = ScoringBatcher(holder, max_items=100, window_s=0.5)
    try:
        with batcher.arriving():  # a second request's body is on its way
            first = batcher.submit(body([impression(0)]))
            time.sleep(0.1)
            second = batcher.submit(body([impression(1)]))
        assert first.result(timeout=10)[0] == second.result(timeout=10)[0] == 200
    finally:
        batcher.close()
    assert batcher.batches == 1 and batcher.batched_requests == 2


def test_a_full_queue_refuses_new_requests() -> None:
    holder = ModelHolder()
    served = served_model()
    holder.swap(served)
    gate = Gate(served)
    batcher = ScoringBatcher(holder, max_items=100, max_queued=2)
    try:
        batcher.submit(body([impression(0)]))
        assert gate.entered.wait(10)
        queued = [batcher.submit(body([impression(i)])) for i in (1, 2)]
        assert batcher.full
        with pytest.raises(Busy):
            batcher.submit(body([impression(3)]))
        gate.opened.set()
        assert [future.result(timeout=10)[0] for future in queued] == [200, 200]
    finally:
        batcher.close()


def test_the_batch_scores_with_one_model_and_says_which() -> None:
    holder = ModelHolder()
    old, new = served_model(version=1), served_model(version=2)
    holder.swap(old)
    gate = Gate(old)
    batcher = ScoringBatcher(holder, max_items=100)
    try:
        in_flight = batcher.submit(body([impression(0)]))
        assert gate.entered.wait(10)
        holder.swap(new)
        queued = batcher.submit(body([impression(1)]))
        gate.opened.set()
        versions = [json.loads(f.result(timeout=10)[1])["model_version"] for f in (in_flight, queued)]
    finally:
        batcher.close()
    assert versions == [1, 2]


def test_scoring_in_a_batch_matches_the_learner_within_float32_rounding() -> None:
    served = served_model()
    rows = [impression(i) for i in range(64)]
    with torch.inference_mode():
        together = served.model.score_rows(rows)
        apart = [served.model.score_rows([row]) for row in rows]
    for task in served.tasks:
        assert torch.allclose(together[task], torch.cat([a[task] for a in apart]), atol=1e-6)


def test_the_answers_of_one_batch_reach_the_event_loop_in_one_wake_up() -> None:
    holder = ModelHolder()
    served = served_model()
    holder.swap(served)
    gate = Gate(served)
    batcher = ScoringBatcher(holder, max_items=100)
    requests = [[impression(10 * r + i) for i in range(r + 1)] for r in range(5)]

    async def scenario() -> tuple[list, int]:
        loop = asyncio.get_running_loop()
        wake_ups = 0
        original = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            nonlocal wake_ups
            wake_ups += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        first = batcher.submit_async(body([impression(0)]))
        deadline = time.monotonic() + 10
        while not gate.entered.is_set():  # the scorer holds the first request in its forward pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        futures = [batcher.submit_async(body(events)) for events in requests]
        gate.opened.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *futures), 10)
        return answers[1:], wake_ups

    try:
        answers, wake_ups = asyncio.run(scenario())
    finally:
        batcher.close()
    assert (batcher.batches, batcher.batched_requests) == (2, 6)
    assert wake_ups == 2  # one per batch, not one per request
    for events, (status, payload, _, items) in zip(requests, answers):
        alone = score_impressions(served, events)
        answer = json.loads(payload)
        assert status == 200 and items == len(events) and answer["impression_ids"] == alone["impression_ids"]

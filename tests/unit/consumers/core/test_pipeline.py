"""The trainer's pure pipeline (consumers.core.pipeline): decode -> join -> mini-batches -> score, then update ->
metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consumers.core.pipeline import EventClock, Pipeline, decode_record, future_bound_ms
from consumers.runtime.assembly import build_pipeline, join_config
from consumers.runtime.config import load_config
from streamer.events import encode

pytestmark = pytest.mark.unit

torch.set_num_threads(1)
TINY = "model.options={rung = 'mtl', embedding_dim = 4, hidden_dims = [8], tower_dims = [4]}"


def config(batch_size: int = 4, delay_s: float = 1e9):
    return load_config(None, env={}, overrides=[
        "model.tasks=['click', 'like']", "join.attribution_window_s={click = 5, like = 10}",
        f"batching.batch_size={batch_size}", f"batching.max_batch_delay_s={delay_s}", TINY, "metrics.windows=[8, 16]"])


def stream(n: int = 40) -> list[tuple[str, bytes]]:
    """n impressions one second apart, each clicked 2 s later when i % 3 == 0, in event-time order."""
    messages = []
    for i in range(n):
        messages.append(("impressions", encode({"v": 1, "impression_id": f"i{i}", "ts_ms": 1000 * i,
                                                "user_id": f"u{i % 5}", "item_id": f"a{i % 7}", "features": {}})))
    for i in range(0, n, 3):
        messages.append(("feedback", encode({"v": 1, "impression_id": f"i{i}", "ts_ms": 1000 * i + 2000,
                                             "task": "click", "value": 1})))
    order = {id(m): (msgpack_ts(m[1]), k) for k, m in enumerate(messages)}
    return sorted(messages, key=lambda m: order[id(m)])


def msgpack_ts(value: bytes) -> int:
    return decode_record(value)[0]["ts_ms"]


def replay(pipeline: Pipeline, messages: list[tuple[str, bytes]], train_every: int = 1) -> list:
    trained = []
    pipeline.on_batch = lambda samples, labels, scores, fired: trained.append(
        ([s.impression["impression_id"] for s in samples], {t: s.copy() for t, s in scores.items()}))
    for k, (topic, value) in enumerate(messages):
        pipeline.ingest(decode_record(value), (topic, 0))
        if (k + 1) % train_every == 0:
            pipeline.train_ready()
    pipeline.flush()
    return trained


def test_every_impression_is_trained_once_with_its_labels() -> None:
    pipeline = build_pipeline(config(), clock=None)
    trained = replay(pipeline, stream())
    ids = [i for batch, _ in trained for i in batch]
    assert sorted(ids) == sorted(f"i{i}" for i in range(40)) and len(ids) == 40
    assert pipeline.trained_samples == 40
    assert pipeline.join.counters["positive_labels"] == 14


def test_replay_batches_do_not_depend_on_how_often_train_ready_is_called() -> None:
    per_record = replay(build_pipeline(config(), clock=None), stream())
    per_ten = replay(build_pipeline(config(), clock=None), stream(), train_every=10)
    assert [b for b, _ in per_record] == [b for b, _ in per_ten]
    for (_, a), (_, b) in zip(per_record, per_ten):
        assert all(np.array_equal(a[t], b[t]) for t in a)


def test_event_clock_cuts_partial_batches_after_max_batch_delay_of_event_time() -> None:
    pipeline = build_pipeline(config(batch_size=100, delay_s=3.0), clock=None)
    trained = replay(pipeline, stream(30))
    assert len(trained) > 1, "a 100-sample batch never fills: only the event-time delay can cut batches"
    assert all(len(b) < 100 for b, _ in trained)


@pytest.mark.parametrize("bounded", [False, True])
def test_a_producer_clock_ahead_is_a_dead_letter_not_the_watermark_when_decoding_is_bounded(bounded: bool) -> None:
    """The live trainer decodes with future_bound_ms (join.max_future_s past its wall clock): without it, one
    device whose clock is 8 h ahead (an impression and its click) moves both topics' event-time clocks, so the
    watermark, there: every pending impression is trained at once without its click, later clicks are late."""
    pipeline = build_pipeline(config(), clock=None)
    messages = stream(30)
    ahead = 15_000 + 8 * 3_600_000
    messages[15:15] = [  # mid-stream, as a device with its time zone taken for UTC sends them
        ("impressions", encode({"v": 1, "impression_id": "tz", "ts_ms": ahead, "user_id": "u", "item_id": "a",
                                "features": {}})),
        ("feedback", encode({"v": 1, "impression_id": "tz", "ts_ms": ahead + 2000, "task": "click", "value": 1}))]
    not_after = future_bound_ms(3600, 30.0) if bounded else None  # "now" is the stream's own time, 30 s
    dead = []
    for topic, value in messages:
        dead += pipeline.ingest(decode_record(value, not_after), (topic, 0))
    pipeline.flush()
    counters = pipeline.join.counters
    assert [e.reason for e in dead] == (["future"] * 2 if bounded else [])
    assert pipeline.dead_letters == (2 if bounded else 0)
    if bounded:
        assert (counters["late_feedback"], counters["late_impressions"], counters["positive_labels"]) == (0, 0, 10)
    else:
        assert counters["late_feedback"] > 0 and counters["late_impressions"] > 0
        assert counters["positive_labels"] < 10


def test_bad_events_come_back_as_dead_letters_and_are_counted() -> None:
    pipeline = build_pipeline(config(), clock=None)
    bad = pipeline.ingest(decode_record(b"\xc1 not msgpack"), ("impressions", 0))
    assert len(bad) == 1 and pipeline.dead_letters == 1
    assert pipeline.metrics.registry.get_sample_value("crossdistil_dead_letters_total", {"reason": bad[0].reason}) == 1


def test_ingest_each_is_ingest_of_each_message_in_turn() -> None:
    messages = stream()
    messages.insert(7, ("impressions", b"\xc1 not msgpack"))
    messages.insert(12, ("feedback", encode({"v": 1, "batch": [
        {"v": 1, "impression_id": "i3", "ts_ms": 5000, "task": "like", "value": 1}]})[:-3]))
    one_by_one, together = (build_pipeline(config(), clock=None) for _ in range(2))
    bad = [error for topic, value in messages for error in one_by_one.ingest(decode_record(value), (topic, 0))]
    assert [e.reason for e in together.ingest_each([(decode_record(v), (t, 0)) for t, v in messages])] == [
        e.reason for e in bad] and len(bad) == 2
    for a, b in ((one_by_one, together), (together, one_by_one)):
        assert a.dead_letters == b.dead_letters and a.events_ingested == b.events_ingested
    assert one_by_one.join.state_dict() == together.join.state_dict()
    assert one_by_one.metrics.snapshot() == together.metrics.snapshot()
    for topic in ("impressions", "feedback"):
        a, b = (p.metrics.registry.get_sample_value("crossdistil_events_consumed_total", {"topic": topic})
                for p in (one_by_one, together))
        assert a == b > 0
    assert one_by_one.flush() == together.flush() == 40


def handover(first, second, directory) -> None:
    """What a restart does: the learner through a checkpoint file, the stream state through plain values."""
    written = first.learner.write_checkpoint(str(directory), 2, {}, None)
    second.learner.load_checkpoint(written["path"])
    second.load_stream_state(first.stream_state(), now=first.clock())


def test_state_round_trip_through_a_checkpoint_continues_identically(tmp_path) -> None:
    messages = stream()
    whole = build_pipeline(config(), clock=None)
    expected = replay(whole, messages)
    first = build_pipeline(config(), clock=None)
    seen = []
    first.on_batch = lambda samples, labels, scores, fired: seen.append(
        [s.impression["impression_id"] for s in samples])
    for topic, value in messages[:25]:
        first.ingest(decode_record(value), (topic, 0))
        first.train_ready()
    second = build_pipeline(config(), clock=None)
    handover(first, second, tmp_path)
    rest = replay(second, messages[25:])
    assert seen + [b for b, _ in rest] == [b for b, _ in expected]
    assert np.array_equal(rest[-1][1]["click"], expected[-1][1]["click"])


def test_replay_join_config_has_no_idle_timeout_and_no_waiting_for_partitions() -> None:
    cfg = config()
    replay_join, live_join = join_config(cfg, live=False), join_config(cfg, live=True)
    assert replay_join.idle_timeout_s is None and not replay_join.wait_for_all_partitions
    assert live_join.wait_for_all_partitions
    assert isinstance(build_pipeline(cfg, clock=None).clock, EventClock)


def river_config():
    return load_config(None, env={}, overrides=[
        "model.tasks=['click', 'like']", "join.attribution_window_s={click = 5, like = 10}",
        "batching.batch_size=4", "batching.max_batch_delay_s=1e9", "model.options={rung = 'river_lr'}",
        "metrics.windows=[8, 16]"])


def test_rung_river_lr_trains_the_river_baseline_through_the_same_pipeline() -> None:
    from models.river_baseline import RiverLearner

    pipeline = build_pipeline(river_config(), clock=None)
    assert isinstance(pipeline.learner.learner, RiverLearner)
    trained = replay(pipeline, stream())
    assert sorted(i for batch, _ in trained for i in batch) == sorted(f"i{i}" for i in range(40))
    # the scores move as the baseline learns (a constant scorer would give one value)
    assert len({round(float(v), 6) for _, scores in trained for v in scores["click"]}) > 1


def test_river_pipeline_state_round_trip_continues_identically(tmp_path) -> None:
    messages = stream()
    expected = replay(build_pipeline(river_config(), clock=None), messages)
    first = build_pipeline(river_config(), clock=None)
    for topic, value in messages[:25]:
        first.ingest(decode_record(value), (topic, 0))
        first.train_ready()
    second = build_pipeline(river_config(), clock=None)
    handover(first, second, tmp_path)
    rest = replay(second, messages[25:])
    assert np.array_equal(rest[-1][1]["click"], expected[-1][1]["click"])


GATED = ("model.options={rung = 'crossdistil', kd_gate = 'trust', embedding_dim = 4, hidden_dims = [8], "
         "tower_dims = [4], kd_gate_window = 64, kd_gate_every = 16}")


def test_the_learners_trust_gate_reaches_the_trainer_metrics_after_every_step() -> None:
    cfg = load_config(None, env={}, overrides=[
        "model.tasks=['click', 'like']", "join.attribution_window_s={click = 5, like = 10}", "batching.batch_size=4",
        "batching.max_batch_delay_s=1e9", GATED, "metrics.windows=[8, 16]"])
    pipeline = build_pipeline(cfg, clock=None)
    replay(pipeline, stream())
    metrics, gate = pipeline.metrics.registry, pipeline.learner.learner.trust_gate
    steps = [metrics.get_sample_value("crossdistil_kd_gate_steps_total", {"task": task, "outcome": outcome}) or 0
             for task in ("click", "like") for outcome in ("distilled", "skipped")]
    assert sum(steps[:2]) == sum(steps[2:]) == pipeline.learner.steps == 10
    assert metrics.get_sample_value("crossdistil_kd_gate_open", {"task": "click"}) in (0.0, 1.0)
    teacher = metrics.get_sample_value("crossdistil_kd_gate_auc", {"task": "click", "role": "teacher"})
    assert teacher == pytest.approx(float(gate.teacher_auc[0]))
    # No like was ever given: the gate's AUCs of like are undefined, so not exported.
    assert metrics.get_sample_value("crossdistil_kd_gate_auc", {"task": "like", "role": "teacher"}) is None


def test_a_model_without_trust_gate_adds_no_gate_metrics() -> None:
    pipeline = build_pipeline(config(), clock=None)  # the mtl rung: no teachers to distil from
    replay(pipeline, stream())
    assert pipeline.metrics.registry.get_sample_value("crossdistil_kd_gate_open", {"task": "click"}) is None
    assert pipeline.metrics.registry.get_sample_value(
        "crossdistil_kd_gate_steps_total", {"task": "click", "outcome": "skipped"}) is None


def test_rebased_join_state_does_not_mark_partitions_idle_after_a_long_downtime() -> None:
    from consumers.core.join import AttributionJoin
    from consumers.core.pipeline import rebase_join_clock

    cfg = load_config(None, env={},
                      overrides=["join.idle_timeout_s=10", "join.attribution_window_s={click=1, long_view=1}"])
    join = AttributionJoin(join_config(cfg))
    sources = [("impressions", 0), ("impressions", 1)]
    join.assign(sources, now=0.0)
    for impression_id, source in (("a", sources[0]), ("b", sources[1])):
        join.add_impression({"impression_id": impression_id, "ts_ms": 1_000, "user_id": "u", "item_id": "i",
                             "features": {}}, source, now=1.0)
    restarted = AttributionJoin(join_config(cfg))
    restarted.load_state_dict(rebase_join_clock(join.state_dict(), now=1_000.0))  # the process was down for 999 s
    restarted.tick(1_001.0)
    restarted.add_impression({"impression_id": "c", "ts_ms": 100_000, "user_id": "u", "item_id": "i",
                              "features": {}}, sources[0], now=1_001.0)
    assert restarted.watermark_ms == 1_000  # partition 1 still holds it back
    assert restarted.emit() == []


def test_joined_samples_encode_as_their_training_rows_do() -> None:
    from consumers.core.join import JoinedSample
    from consumers.core.pipeline import encode_samples, training_rows
    from models.features import FeatureSpec, encode_columns

    spec = FeatureSpec(categorical=("user_id", "item_id", "city"), numeric=("watch",), hash_buckets=1000)
    impressions = [{"v": 1, "impression_id": f"i{i}", "ts_ms": i, "user_id": f"u{i % 2}", "item_id": f"v{i}",
                    "features": {"city": "paris", "watch": float(i)} if i % 3 else {}} for i in range(6)]
    samples = [JoinedSample(e, {"like": i % 2, "finish": int(i == 4)}, "p0", "closed")
               for i, e in enumerate(impressions)]
    got, want = encode_samples(samples, spec, ("like", "finish")), encode_columns(training_rows(samples), spec,
                                                                                   ("like", "finish"))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
    assert got["labels"][:, 0].tolist() == [0, 1, 0, 1, 0, 1] and got["labels"][4, 1] == 1

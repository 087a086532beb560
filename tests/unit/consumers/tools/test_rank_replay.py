"""consumers.tools.rank_replay: two gloo ranks replay a synthetic event log without a broker."""

from __future__ import annotations

import pytest

from consumers.runtime.config import load_config
from consumers.tools.rank_replay import partition_of, rank_records, replay_ranks
from streamer.stream import stream_dataset

pytestmark = [pytest.mark.unit, pytest.mark.slow]  # processes of their own: ~20 s per replay on 2 cores

MODEL = "{rung = 'mtl', embedding_dim = 4, hidden_dims = [8], tower_dims = [4], features = {hash_buckets = 4096}}"


@pytest.fixture(scope="module")
def event_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    path = tmp_path_factory.mktemp("log") / "synthetic.evlog"
    summary = stream_dataset("synthetic", None, f"file://{path}", options={
        "n_events": 3000, "tasks": "click,like", "n_users": 300, "n_items": 200, "seed": 5, "delay_median_s": "1,3",
        "max_delay_s": 10})
    return f"file://{path}", summary["impressions"]


def config(mode: str):
    return load_config(None, env={}, overrides=[
        f"model.options={MODEL}", "model.tasks=['click', 'like']", "model.device='cpu'",
        "join.attribution_window_s={click = 3, like = 10}", "batching.batch_size=64",
        "batching.max_batch_delay_s=30.0", f"distributed.mode='{mode}'", "distributed.average_every_steps=4"])


def test_the_ranks_split_the_log_by_partition_without_losing_or_repeating_a_record(event_log) -> None:
    url, _ = event_log
    shares = [rank_records(url, rank, 2, 4) for rank in range(2)]
    assert sum(len(s) for s in shares) == len(rank_records(url, 0, 1, 4))
    assert all(p % 2 == rank for rank, share in enumerate(shares) for _, p, _ in share)
    assert partition_of("user-1", 4) == partition_of("user-1", 4)


@pytest.mark.parametrize("mode", ["sync", "average"])
def test_two_ranks_train_every_impression_once_and_learn_like_one(event_log, mode: str) -> None:
    url, impressions = event_log
    one = replay_ranks(url, config(mode), 1, partitions=4, chunk=64)
    two = replay_ranks(url, config(mode), 2, partitions=4, chunk=64)
    assert one["samples"] == two["samples"] == impressions
    assert two["events"] == one["events"]
    if mode == "sync":  # every rank takes every step
        assert len({r["steps"] for r in two["per_rank"]}) == 1
    for task in ("click", "like"):
        assert abs(two["auc_all"][task] - one["auc_all"][task]) < 0.05, (one["auc_all"], two["auc_all"])


def test_two_ranks_count_a_counted_task_and_predict_the_others(event_log) -> None:
    """model.options.counted_tasks under synchronous ranks: like is joined and counted (every rank's rows), click
    alone is predicted, on every rank (the answers' width, the union's AUCs)."""
    url, impressions = event_log
    cfg = config("sync")
    cfg.model.options = {**cfg.model.options, "aux_tasks": ["like"], "counted_tasks": ["like"]}
    two = replay_ranks(url, cfg, 2, partitions=4, chunk=64)
    assert two["samples"] == impressions and set(two["auc_all"]) == {"click"}
    assert two["auc_all"]["click"] is not None

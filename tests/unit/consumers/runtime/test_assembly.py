"""The [model], [join] and [batching] sections turned into a pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from consumers.core.pipeline import EventClock
from consumers.runtime.assembly import build_pipeline, join_config, model_config, model_device
from consumers.runtime.config import load_config
from consumers.runtime.learner_process import build_learner
from models.river_baseline import RiverConfig

pytestmark = pytest.mark.unit

SMALL = ["model.options={hidden_dims = [8], tower_dims = [4], embedding_dim = 4, "
         "features = {categorical = ['user_id', 'item_id'], hash_buckets = 1024}}"]


def test_model_section_builds_the_model_config() -> None:
    cfg = load_config(None, env={}, overrides=SMALL + ["model.seed=7"])
    model = model_config(cfg)
    assert model.tasks == ("click", "long_view") and model.seed == 7 and model.features.hash_buckets == 1024


def test_a_river_rung_and_a_preset_are_read_from_the_model_options() -> None:
    river = model_config(load_config(None, env={}, overrides=["model.options={rung = 'river_lr', 'river.lr' = 0.02}"]))
    assert isinstance(river, RiverConfig) and river.lr == 0.02
    trust = model_config(load_config(None, env={}, overrides=["model.options={rung = 'crossdistil@trust'}"]))
    assert trust.rung == "crossdistil" and trust.kd_gate == "trust"


def test_a_replay_pipeline_runs_on_event_time_and_a_live_one_on_the_wall_clock() -> None:
    cfg = load_config(None, env={}, overrides=SMALL)
    replay, live = build_pipeline(cfg, clock=None), build_pipeline(cfg)
    assert isinstance(replay.clock, EventClock) and replay.clock.join is replay.join
    assert not replay.join.config.wait_for_all_partitions and live.join.config.wait_for_all_partitions
    assert join_config(cfg, live=False).idle_timeout_s is None


def test_cuda_graphs_are_refused_with_the_reason_where_a_step_cannot_replay() -> None:
    cfg = load_config(None, env={}, overrides=SMALL + ["model.cuda_graphs=true", "model.device=cpu"])
    with pytest.raises(ValueError, match="model.cuda_graphs: CUDA graphs need a CUDA device, and model.device = 'cpu'"):
        model_device(cfg)  # what `crossdistil train` checks before it opens Kafka
    with pytest.raises(ValueError, match="model.cuda_graphs: .*need a CUDA device; this learner is on cpu"):
        build_learner(cfg)  # the learner's own refusal, for a caller that did not check
    with pytest.raises(ValueError, match="for one trainer"):
        build_pipeline(cfg, clock=None, ranks=SimpleNamespace(world_size=2))
    river = load_config(None, env={}, overrides=["model.options={rung = 'river_lr'}", "model.cuda_graphs=true"])
    with pytest.raises(ValueError, match="one event at a time"):
        build_learner(river)
    plain = load_config(None, env={}, overrides=SMALL + ["model.device=cpu"])
    assert model_device(plain).type == "cpu" and build_learner(plain).graphs is None


def test_a_privileged_teacher_is_refused_where_the_stream_cannot_feed_it() -> None:
    cfg = load_config(None, env={}, overrides=["model.options={privileged = ['play_time_ms']}"])
    with pytest.raises(ValueError, match="the event stream does not carry yet"):
        model_config(cfg)  # `crossdistil train --check-config`, the trainer and backtests
    with pytest.raises(ValueError, match="the event stream does not carry yet"):
        build_learner(cfg)

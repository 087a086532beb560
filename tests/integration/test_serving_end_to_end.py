"""End to end: synthetic stream -> Kafka -> ``crossdistil train`` (its own process) -> serving topic -> serving.

Serving starts first, on an empty serving topic, and follows the trainer's publications as they land; at the end
it must serve the trainer's last published version and score a probe batch exactly as the trainer's final model.
The trainer also learns an auxiliary task (``model.options.aux_tasks``): learnt, never served; and counts another
(``model.options.counted_tasks``): its label rates are inputs, it has no tower and predicts nothing. Its online
counts include a cross (``"user_id*item_category"``) with its own smoothing, read against the user's rate.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from consumers.runtime.config import load_config
from consumers.serving.daemon import ServingDaemon
from streamer.topics import ensure_topics
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TASKS = ("click", "like")
MODEL = {"aux_tasks": ["follow", "comment"], "counted_tasks": ["comment"],
         "count_features": ["user_id", "item_id", "user_id*item_category"], "count_cross_smoothing": 50.0,
         "count_cross_prior": "field",
         "embedding_dim": 8, "hidden_dims": [16], "tower_dims": [8],
         "features": {"categorical": ["user_id", "item_id", "item_category", "hour"], "numeric": ["duration_s"],
                      "hash_buckets": 8192}}


def test_serving_follows_the_trainer_and_scores_like_its_final_model(kafka_broker: str, tmp_path: Path) -> None:
    from consumers.state.checkpoints import CheckpointStore
    from consumers.state.learner_state import learner_state
    from models.features import encode_rows
    from models.learner import Learner
    from streamer.stream import stream_dataset

    tag = uuid.uuid4().hex[:8]
    topics = {"impressions": f"imp-e2e-{tag}", "feedback": f"fb-e2e-{tag}", "dead_letters": f"dl-e2e-{tag}",
              "model": f"model-e2e-{tag}"}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    config = tmp_path / "crossdistil.toml"
    write_trainer_config(config, kafka_broker, topics, {
        "join.attribution_window_s": {"click": 3, "like": 10, "follow": 10, "comment": 10},
        "batching.batch_size": 128,
        "batching.max_batch_delay_s": 1.0,
        "model.tasks": ["click", "like", "follow", "comment"],
        "model.options": MODEL,
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "checkpoint.every_steps": 8,
        "checkpoint.every_s": 0.0,
        "checkpoint.keep_last": 2,
        "serving.port": 0,
    })
    cfg = load_config(config, env={})
    daemon = ServingDaemon(cfg, out=io.StringIO())
    stop = threading.Event()
    status: list[int] = []
    serving = threading.Thread(target=lambda: status.append(daemon.run(stop)), daemon=True)
    serving.start()
    try:
        assert daemon.ready.wait(30)
        summary = stream_dataset("synthetic", None, f"kafka://{kafka_broker}", options={
            "n_events": 4000, "tasks": "click,like,follow,comment", "n_users": 200, "n_items": 500, "seed": 3,
            "delay_median_s": "1,3,3,3",
            "max_delay_s": 10},
            impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
        assert summary["impressions"] == 4000
        log = open(tmp_path / "trainer.log", "wb")
        trainer = subprocess.run(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--exit-when-idle", "4",
             "--torch-threads", "1"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=600,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert trainer.returncode == 0, (tmp_path / "trainer.log").read_text()[-4000:]

        checkpoint = CheckpointStore(cfg.checkpoint.dir).latest()
        final_version = checkpoint.metadata["publish_version"]
        assert final_version >= 2, "the trainer published fewer than two versions: nothing to follow"
        served = daemon.holder.wait_for_version(final_version, timeout_s=60)
        assert served is not None and served.version == final_version, daemon.follower and daemon.follower.stats
        assert daemon.follower.stats.start_path == "empty"  # it followed the publications, it did not start late
        assert served.step == checkpoint.step

        learner = Learner.from_state_dict(learner_state(checkpoint.metadata, checkpoint.tensors))
        probe = [{"impression_id": f"p{u}", "ts_ms": 1_700_000_000_000 + u, "user_id": str(u), "item_id": str(3 * u),
                  "features": {"item_category": str(u % 20), "hour": str(u % 24), "duration_s": 10.0 + u}}
                 for u in range(64)]
        request = urllib.request.Request(daemon.api.url + "/score", data=json.dumps(probe).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.loads(response.read())
        expected = learner.predict(encode_rows(probe, learner.config.features, learner.config.tasks))
        assert body["model_version"] == final_version
        assert body["tasks"] == list(TASKS) and set(body["probabilities"]) == set(TASKS)  # not follow
        assert "follow" in expected and "comment" not in expected  # which the trainer learnt; which it counted
        counted = learner.model.counts.totals.tolist()  # rows, then one label sum per task in model.tasks' order
        assert counted[0] > 0 and counted[4] > 0, counted
        counts = learner.model.counts  # the cross, counted, read against the user's rate with its own a
        assert counts.fields[-1] == "user_id*item_category" and counts.cross_parents == (0,)
        assert counts.cross_smoothing == 50.0 and counts.table[2, :, 0].sum() == counted[0]
        for task in TASKS:
            assert torch.equal(torch.tensor(body["probabilities"][task], dtype=torch.float32), expected[task]), task
    finally:
        stop.set()
        serving.join(30)
    assert status == [0]

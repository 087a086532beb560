"""The published ONNX graph gives the probabilities the project serves, for every backbone.

Each backbone trains briefly on KuaiRand, publishes through the trainer's own code (write_learner_checkpoint with
``onnx``), the messages are reassembled as a reader of the topic would, and onnxruntime scores 1,000 impressions
from the graph alone (inputs as docs/features.md defines them: hashed rows, raw numerics): unseen ids, missing
fields and extreme numerics included. ``ServingModel.score`` (what ``/score`` answers with) is the reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from consumers.state.checkpoints import CheckpointStore
from consumers.state.learner_state import write_learner_checkpoint
from consumers.state.wire import Reassembler
from models.config import ModelConfig
from models.features import FeatureSpec, encode_rows
from models.learner import Learner, ServingModel
from models.onnx_export import TENSOR_NAME

pytestmark = pytest.mark.unit
ort = pytest.importorskip("onnxruntime", reason="onnxruntime checks the graph (a dev dependency)")

TASKS = ("click", "long_view")
SPEC = FeatureSpec(categorical=("user_id", "item_id", "hour", "tab"), numeric=("duration_ms",), hash_buckets=2**14)
N = 1000


def kuairand_rows(shared_data: Path) -> list[dict]:
    from streamer.datasets import open_dataset

    rows = []
    for i, interaction in enumerate(open_dataset("kuairand", shared_data / "kuairand").interactions()):
        if i >= 2 * N:
            break
        rows.append({"user_id": interaction.user_id, "item_id": interaction.item_id,
                     "features": dict(interaction.features), "labels": dict(interaction.labels)})
    return rows


def hostile(rows: list[dict]) -> list[dict]:
    """Unseen ids, missing fields and extreme numerics mixed into real impressions."""
    out = []
    for i, row in enumerate(rows):
        row = {**row, "features": dict(row["features"])}
        if i % 7 == 0:
            row["user_id"], row["item_id"] = f"unseen-user-{i}", f"unseen-item-{i}"
        if i % 5 == 0:
            row["features"].pop("hour", None)
            row["features"].pop("duration_ms", None)
        if i % 11 == 0:
            row["features"]["duration_ms"] = [1e30, -1e30, 0.0, 3.5e9][i % 4]
        out.append(row)
    return out


def graph_inputs(rows: list[dict]) -> dict[str, np.ndarray]:
    """The graph's inputs from the rows, as docs/features.md says: hashed rows, raw numerics (missing: 0)."""
    categorical = encode_rows(rows, SPEC, TASKS).categorical.numpy()
    numeric = np.array([[float(r["features"].get(name, 0.0) or 0.0) for name in SPEC.numeric] for r in rows],
                       dtype=np.float32)
    return {"categorical": categorical, "numeric": numeric}


def trained_and_published(config: ModelConfig, rows: list[dict], tmp_path: Path):  # noqa: ANN201
    """``config``'s learner after N rows, published with its ONNX graph and read back as serving reads it."""
    learner = Learner(config)
    for start in range(0, N, 100):
        learner.step(encode_rows(rows[start:start + 100], SPEC, config.tasks))
    publication = {"manifest": {"step": learner.steps}, "version": 1, "chunk_size": 900_000,
                   "previous_chunk_count": 0, "max_message_bytes": 1 << 20, "onnx": True}
    written = write_learner_checkpoint(learner, CheckpointStore(tmp_path), {}, publication)
    (published,) = Reassembler().checkpoints([(k, v) for k, v in written["messages"]])
    return published


@pytest.mark.parametrize("backbone", ["shared_bottom", "mmoe", "ple", "cross_stitch"])
def test_onnxruntime_on_the_published_graph_gives_the_served_probabilities(backbone: str, shared_data: Path,
                                                                           tmp_path: Path) -> None:
    rows = kuairand_rows(shared_data)
    published = trained_and_published(ModelConfig(tasks=TASKS, backbone=backbone, rung="crossdistil",
                                                  embedding_dim=8, hidden_dims=(32,), tower_dims=(16,),
                                                  features=SPEC), rows, tmp_path)
    tensors = published.tensors
    contract = json.loads(published.metadata["serving"]["onnx"])
    assert contract["inputs"][0]["fields"] == list(SPEC.categorical) and contract["outputs"][0]["tasks"] == list(TASKS)

    impressions = hostile(rows[N:])
    session = ort.InferenceSession(tensors[TENSOR_NAME].numpy().tobytes())
    (probabilities,) = session.run(["probabilities"], graph_inputs(impressions))
    served = ServingModel.from_serving_state(tensors, published.metadata["serving"]).score_rows(impressions)
    reference = torch.stack([served[task] for task in TASKS], dim=1).numpy()
    assert probabilities.shape == (N, len(TASKS))
    assert np.abs(probabilities - reference).max() <= 1e-5


def test_counts_of_crosses_are_computed_in_the_graph(shared_data: Path, tmp_path: Path) -> None:
    """Online counts of crosses (``"user_id*tab"``): the graph hashes each pair into its rows as the model does, so
    onnxruntime gives the served probabilities, and they differ from a model without the crosses' counts; so does
    a cross read against its field's rate with its own smoothing (``count_cross_prior="field"``)."""
    rows = kuairand_rows(shared_data)
    probabilities = []
    crosses = ("user_id", "item_id", "user_id*tab", "item_id*hour")
    for i, (fields, options) in enumerate([(("user_id", "item_id"), {}), (crosses, {}),
                                           (crosses, {"count_cross_prior": "field", "count_cross_smoothing": 20.0})]):
        published = trained_and_published(ModelConfig(tasks=TASKS, count_features=fields, embedding_dim=8,
                                                      hidden_dims=(32,), tower_dims=(16,), features=SPEC, **options),
                                          rows, tmp_path / str(i))
        session = ort.InferenceSession(published.tensors[TENSOR_NAME].numpy().tobytes())
        (graph,) = session.run(["probabilities"], graph_inputs(rows[N:]))
        served = ServingModel.from_serving_state(published.tensors, published.metadata["serving"]).score_rows(rows[N:])
        reference = torch.stack([served[task] for task in TASKS], dim=1).numpy()
        assert np.abs(graph - reference).max() <= 1e-5
        probabilities.append(graph)
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-3
    assert np.abs(probabilities[1] - probabilities[2]).max() > 1e-3


@pytest.mark.parametrize("counted", [False, True])
def test_auxiliary_tasks_are_learnt_but_neither_exported_nor_served(shared_data: Path, tmp_path: Path,
                                                                    counted: bool) -> None:
    """``aux_tasks`` (here like, between the served tasks), learnt or only counted (``counted_tasks``: no tower, its
    rates among the graph's inputs): the graph's columns and the follower's tasks are the served ones, and
    onnxruntime gives the served model's probabilities of exactly those."""
    from consumers.serving.follower import load_checkpoint

    rows = kuairand_rows(shared_data)
    published = trained_and_published(ModelConfig(tasks=("click", "like", "long_view"), aux_tasks=("like",),
                                                  counted_tasks=("like",) if counted else (),
                                                  embedding_dim=8, hidden_dims=(32,), tower_dims=(16,),
                                                  features=SPEC), rows, tmp_path)
    contract = json.loads(published.metadata["serving"]["onnx"])
    assert contract["outputs"][0]["tasks"] == list(TASKS) and contract["outputs"][0]["shape"] == ["batch", 2]
    served = load_checkpoint(published)
    assert served.tasks == TASKS

    session = ort.InferenceSession(published.tensors[TENSOR_NAME].numpy().tobytes())
    (probabilities,) = session.run(["probabilities"], graph_inputs(rows[N:]))
    scored = served.model.score_rows(rows[N:])
    assert list(scored) == list(TASKS)
    reference = torch.stack([scored[task] for task in TASKS], dim=1).numpy()
    assert probabilities.shape == (N, 2) and np.abs(probabilities - reference).max() <= 1e-5

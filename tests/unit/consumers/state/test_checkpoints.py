"""Specification of the checkpoint store (consumers/state/checkpoints.py): atomic, verified, no pickle."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from consumers.core.join import AttributionJoin, JoinConfig
from consumers.state.checkpoints import (
    CheckpointError,
    CheckpointStore,
    decode_checkpoint_file,
    encode_checkpoint_file,
    positions_from_plain,
    positions_to_plain,
)

pytestmark = pytest.mark.unit


def tensors(step: int) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((3, 2), float(step)), "layer.bias": torch.arange(2, dtype=torch.int64)}


def test_a_written_checkpoint_loads_back_exactly(tmp_path):
    store = CheckpointStore(tmp_path)
    join = AttributionJoin(JoinConfig(attribution_window_s={"like": 10.0}))
    join.add_impression({"impression_id": "a", "ts_ms": 5, "user_id": "u", "item_id": "i", "features": {"x": 1.5}},
                        ("impressions", 0))
    positions = {("impressions", 0): 42, ("feedback", 1): 7}
    metadata = {"positions": positions_to_plain(positions), "join_state": join.state_dict(), "watermark_ms": 5}
    store.write(7, tensors(7), metadata)

    loaded = store.latest()
    assert loaded is not None and loaded.step == 7
    assert set(loaded.tensors) == {"layer.weight", "layer.bias"}
    assert torch.equal(loaded.tensors["layer.weight"], tensors(7)["layer.weight"])
    assert loaded.tensors["layer.bias"].dtype == torch.int64
    assert positions_from_plain(loaded.metadata["positions"]) == positions
    restored = AttributionJoin(JoinConfig(attribution_window_s={"like": 10.0}))
    restored.load_state_dict(loaded.metadata["join_state"])
    assert restored.pending_impressions == 1
    assert [s.impression["features"] for s in restored.flush()] == [{"x": 1.5}]


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        store.write(step, tensors(step), {})
    assert store.steps() == [3, 4]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-000000000003.cdckpt", "ckpt-000000000004.cdckpt"]


def test_an_empty_directory_has_no_latest_checkpoint(tmp_path):
    assert CheckpointStore(tmp_path).latest() is None


def test_a_crash_during_write_leaves_the_previous_checkpoint_readable(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write(1, tensors(1), {})
    # What a crash between "write temp file" and "rename" leaves behind: a partial temp file.
    data = encode_checkpoint_file(tensors(2), {"step": 2})
    (tmp_path / ".tmp-ckpt-000000000002.cdckpt.abc123").write_bytes(data[: len(data) // 2])
    assert store.latest().step == 1
    CheckpointStore(tmp_path)  # the next store on this directory cleans up
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_a_truncated_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.write(1, tensors(1), {})
    newest = store.write(2, tensors(2), {})
    newest.write_bytes(newest.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="consumers.state.checkpoints"):
        loaded = store.latest()
    assert loaded.step == 1
    assert "truncated" in caplog.text
    assert store.steps() == [1]  # the bad file was set aside, so pruning cannot keep it instead of good ones
    assert (tmp_path / "ckpt-000000000002.cdckpt.corrupt").exists()


def test_a_flipped_byte_is_detected(tmp_path):
    store = CheckpointStore(tmp_path)
    path = store.write(1, tensors(1), {"note": "x"})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        store.load(path)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):  # never None: that starts from scratch
        store.latest()


def test_a_file_that_is_not_a_checkpoint_is_rejected():
    with pytest.raises(CheckpointError, match="not a crossdistil checkpoint"):
        decode_checkpoint_file(b"\x80\x04\x95" + b"\0" * 100)  # a pickle header is never unpickled
    with pytest.raises(CheckpointError, match="truncated"):
        decode_checkpoint_file(b"CDCKPT01")


def test_metadata_that_is_not_plain_is_refused_at_write_time(tmp_path):
    with pytest.raises(TypeError, match="plain values"):
        CheckpointStore(tmp_path).write(1, tensors(1), {"bad": object()})
    assert CheckpointStore(tmp_path).steps() == []


def test_tied_tensors_are_stored_as_copies():
    weight = torch.randn(4, 3)
    tensors_out, _ = decode_checkpoint_file(encode_checkpoint_file({"a": weight, "b": weight}, {}))
    assert torch.equal(tensors_out["a"], weight) and torch.equal(tensors_out["b"], weight)


def test_the_metadata_alone_is_still_verified_against_the_whole_file(tmp_path):
    store = CheckpointStore(tmp_path)
    store.write(1, tensors(1), {"note": "one"})
    newest = store.write(2, tensors(2), {"note": "two"})
    loaded = store.latest(with_tensors=False)  # a trainer whose learner process loads the tensors itself
    assert loaded.step == 2 and loaded.metadata["note"] == "two" and loaded.tensors == {}
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # damage in the tensors is caught even when they are not decoded
    newest.write_bytes(bytes(data))
    loaded = store.latest(with_tensors=False)
    assert loaded.step == 1 and loaded.metadata["note"] == "one"


def gated_learner():
    from models.config import ModelConfig
    from models.learner import Learner

    return Learner(ModelConfig(rung="crossdistil", kd_gate="trust", teacher_task_weight=1.0, teacher_backbone_grad=0.0,
                               kd_gate_window=64, kd_gate_every=16, hidden_dims=(8,), tower_dims=(4,)))


def gate_batch(start: int, n: int = 24):
    from models.features import encode_rows

    rows = [{"user_id": f"u{i % 5}", "item_id": f"i{i % 11}", "features": {},
             "labels": {"click": int(i % 3 == 0), "long_view": int(i % 4 == 1)}} for i in range(start, start + n)]
    learner = gated_learner()
    return encode_rows(rows, learner.config.features, learner.config.tasks)


@pytest.mark.slow
def test_the_learners_trust_gate_survives_a_trainer_checkpoint_exactly(tmp_path):
    from consumers.state.learner_state import learner_state, load_learner_checkpoint, write_learner_checkpoint

    learner = gated_learner()
    for k in range(5):  # 120 samples: the 64-sample window is full and the gate decided after every batch
        learner.step(gate_batch(24 * k))
    learner.trust_gate.since_decision = 5  # mid-way to the next decision, so that counter must be kept too
    saved = {name: value.clone() if isinstance(value, torch.Tensor) else value
             for name, value in learner.trust_gate.state_dict().items()}
    assert torch.isfinite(saved["teacher_auc"]).all() and saved["filled"] == 64
    written = write_learner_checkpoint(learner, CheckpointStore(tmp_path), {"note": "gated"}, None)

    checkpoint = CheckpointStore(tmp_path).latest()  # read from a loaded checkpoint ...
    in_process = gated_learner()
    in_process.load_state_dict(learner_state(checkpoint.metadata, checkpoint.tensors))
    in_child = gated_learner()  # ... and from the file, as the trainer and its learner process do
    assert load_learner_checkpoint(in_child, written["path"]) == 5
    for restored in (in_process, in_child):
        for name, value in saved.items():
            got = restored.trust_gate.state_dict()[name]
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got, value, rtol=0, atol=0, equal_nan=True)
            else:
                assert got == value, name
    expected, _ = learner.step(gate_batch(120))  # the next step gates, and re-decides, the same way
    for restored in (in_process, in_child):
        losses, _ = restored.step(gate_batch(120))
        assert {k: v for k, v in losses.items() if "gate" in k or "auc" in k} == \
               {k: v for k, v in expected.items() if "gate" in k or "auc" in k}


def test_a_checkpoint_directory_that_cannot_be_made_names_it_and_the_file_in_its_way(tmp_path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match=f"^checkpoint directory {afile} cannot be created: {afile} is a file"):
        CheckpointStore(afile)
    with pytest.raises(NotADirectoryError, match=f"^checkpoint directory {afile}/ck cannot be created: {afile} is a"):
        CheckpointStore(afile / "ck")

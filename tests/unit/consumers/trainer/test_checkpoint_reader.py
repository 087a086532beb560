"""One reader of a checkpoint file (``consumers.state.checkpoints.read_checkpoint_file``): a restore, a warm start and
``crossdistil inspect`` say the same thing of the same problem, and a sound file that cannot be used here is left as
it is. And the stream side of a checkpoint is still checked on restore, by one trainer and by a rank."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

from consumers.state.checkpoints import CheckpointError, decode_checkpoint_file, encode_checkpoint_file
from consumers.tools.inspect import inspect_checkpoints
from tests.unit.consumers.tools.test_inspect import round_checkpointer, trainer_folder
from tests.unit.consumers.trainer.fakes import FlakyProducer
from tests.unit.consumers.trainer.test_checkpointing import checkpointer

pytestmark = pytest.mark.unit

FIRST = "ckpt-000000000001.cdckpt"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The bytes of a real trainer's checkpoint of step 1."""
    folder = tmp_path_factory.mktemp("written")
    trainer_folder(folder, checkpoints=1)
    return (folder / FIRST).read_bytes()


def recoded(data: bytes, change: Callable[[dict], dict]) -> bytes:
    """``data``'s checkpoint with its metadata changed by ``change``, verifying again (a whole file, not damage)."""
    tensors, metadata = decode_checkpoint_file(data)
    return encode_checkpoint_file(tensors, change(metadata))


def inspected(folder: Path) -> dict:
    (entry,) = inspect_checkpoints(folder)["folders"][0]["checkpoints"]
    return entry


def restore_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as refused:
        checkpointer(folder, FlakyProducer(refuse=False)).restore()
    return str(refused.value)


def warm_start_error(tmp_path: Path, source: Path) -> str:
    with pytest.raises(CheckpointError) as refused:
        checkpointer(tmp_path / "new", FlakyProducer(refuse=False), f"checkpoint.warm_start='{source}'").restore()
    return str(refused.value)


DAMAGE = {
    "truncated": (lambda data: data[: len(data) // 2], "truncated or extended: "),
    "shorter than the header": (lambda data: data[:20], "truncated: 20 bytes, shorter than the 56-byte header"),
    "not a checkpoint": (lambda data: b"\x80\x04\x95" + bytes(100), "not a crossdistil checkpoint (magic"),
    "a flipped byte": (lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:], "corrupted: sha256"),
    "no integer step": (lambda data: recoded(data, lambda m: {**m, "step": "1"}),
                        "its metadata has no integer 'step' ('1')"),
}


@pytest.mark.parametrize("problem", list(DAMAGE))
def test_a_damaged_file_is_named_alike_by_restore_warm_start_and_inspect(tmp_path: Path, written: bytes,
                                                                         problem: str) -> None:
    damage, said = DAMAGE[problem]
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / FIRST).write_bytes(damage(written))
    shutil.copy(folder / FIRST, tmp_path / "source.cdckpt")

    entry = inspected(folder)
    assert not entry["verifies"] and entry["problem"].startswith(said)
    assert warm_start_error(tmp_path, tmp_path / "source.cdckpt") == f"{tmp_path / 'source.cdckpt'}: {entry['problem']}"
    message = restore_error(folder)  # the only checkpoint is set aside: none is left to restore
    assert message.startswith(f"no usable checkpoint in {folder}, only damaged ones ({FIRST}: {entry['problem']})")
    assert (folder / f"{FIRST}.corrupt").exists()


def test_a_file_whose_step_is_not_its_names_is_refused_alike(tmp_path: Path, written: bytes) -> None:
    """A checkpoint renamed or copied over another: restored, it would stay the store's newest by name."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    renamed = folder / "ckpt-000000000002.cdckpt"
    renamed.write_bytes(written)
    said = "its metadata says step 1, its name 2: a file renamed or copied over another; name it " + FIRST

    entry = inspected(folder)
    assert not entry["verifies"] and entry["problem"].startswith(said)
    assert warm_start_error(tmp_path, renamed) == f"{renamed}: {entry['problem']}"
    assert f"only damaged ones (ckpt-000000000002.cdckpt: {entry['problem']})" in restore_error(folder)


@pytest.mark.parametrize("problem", ["a newer file format", "unreadable"])
def test_a_sound_file_that_cannot_be_read_here_is_named_alike_and_left_as_it_is(
        tmp_path: Path, written: bytes, monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    path = folder / FIRST
    if problem == "a newer file format":
        path.write_bytes(b"CDCKPT02" + written[8:])
        said = "checkpoint file format CDCKPT02, written by another version of crossdistil"
    else:
        path.write_bytes(written)
        real_read_bytes = Path.read_bytes

        def read_bytes(p: Path) -> bytes:
            if p == path:  # permissions, an I/O error: the file itself may be sound
                raise PermissionError(13, "Permission denied", str(p))
            return real_read_bytes(p)

        monkeypatch.setattr(Path, "read_bytes", read_bytes)
        said = "cannot be read (Permission denied); make it readable"

    entry = inspected(folder)
    assert not entry["verifies"] and entry["problem"].startswith(said)
    assert warm_start_error(tmp_path, path) == f"{path}: {entry['problem']}"
    assert restore_error(folder) == (f"{path}: {entry['problem']}; it is left as it is, and nothing older is loaded "
                                     "in its place")
    assert path.exists()  # not set aside as damaged


def test_a_ranks_part_where_a_model_is_needed_is_refused_by_restore_and_warm_start_alike(tmp_path: Path) -> None:
    """Rank 1's part of a round holds its partitions' stream state and no model: inspect describes it (it verifies),
    a warm start and a one-trainer restore refuse it with one message (a restore used to fail on KeyError 'learner'),
    and leave it where it is."""
    ranks = tmp_path / "ranks"
    for rank in (0, 1):
        c = round_checkpointer(ranks, rank)
        c.kafka.positions = {("impressions", rank): 5}
        assert c.write("periodic")
    part = ranks / "rank-1" / FIRST
    entry = inspected(ranks / "rank-1")
    assert entry["verifies"] and entry["model"] is None and entry["round"] == {"round": 1, "rank": 1, "world_size": 2}

    said = f"{part}: rank 1's part of a checkpoint round: only the stream state of its partitions; the model is in " \
           "the rank-0 folder's files"
    assert warm_start_error(tmp_path, part) == said
    assert restore_error(ranks / "rank-1") == f"{said}; it is left as it is, and nothing older is loaded in its place"
    assert part.exists()


# ------------------------------------------------------------------------------------------ the stream side


def without_join_state(path: Path) -> None:
    path.write_bytes(recoded(path.read_bytes(), lambda m: {k: v for k, v in m.items() if k != "join_state"}))


def test_one_trainer_refuses_a_checkpoint_without_its_stream_side(tmp_path: Path) -> None:
    trainer_folder(tmp_path, checkpoints=1)
    without_join_state(tmp_path / FIRST)
    assert "verifies but its metadata has no 'join_state' (the stream side" in restore_error(tmp_path)


class RankOneOfTwo:
    """Rank 1 of 2 alone, restoring: rank 0 found round 1 complete and broadcasts its part's bytes (the model)."""

    rank, world_size, info = 1, 2, SimpleNamespace(label="rank 1/2")

    def __init__(self, model: bytes) -> None:
        self.model = model

    def agree(self, values):
        return [1, *values[1:]]  # the newest complete round, as rank 0 read it

    def broadcast_bytes(self, data):
        return self.model


def test_a_rank_refuses_its_part_of_a_round_without_its_stream_side(tmp_path: Path) -> None:
    for rank in (0, 1):
        c = round_checkpointer(tmp_path, rank)
        c.kafka.positions = {("impressions", rank): 5}
        assert c.write("periodic")
    model = (tmp_path / "rank-0" / FIRST).read_bytes()

    def restore():
        rank_one = round_checkpointer(tmp_path, 1)
        rank_one.ranks = RankOneOfTwo(model)
        return rank_one.restore(), rank_one.kafka.positions

    assert restore() == (1, {("impressions", 1): 5})  # the part as written restores
    without_join_state(tmp_path / "rank-1" / FIRST)
    with pytest.raises(CheckpointError, match="verifies but its metadata has no 'join_state' .the stream side"):
        restore()

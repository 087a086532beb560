"""What a store finds when its own files are damaged, unreadable, of a newer version, or another writer's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from consumers.state.checkpoints import (
    CheckpointDirectoryInUse,
    CheckpointError,
    CheckpointFormatError,
    CheckpointStore,
)
from consumers.state.learner_state import check_format
from consumers.state.ledger import Ledger, LedgerError, read_ledger
from tests.lock_holder import lock_held_by_another_process

pytestmark = pytest.mark.unit


def three_checkpoints(directory: Path) -> CheckpointStore:
    store = CheckpointStore(directory)
    for step in (1, 2, 3):
        store.write(step, {"w": torch.full((4,), float(step))}, {"positions": [["impressions", 0, 10 * step]]})
    return store


@pytest.mark.parametrize("damage", [
    lambda data: data[:100],  # a disk that filled up
    lambda data: b"\0" * len(data),  # a file system crash
    lambda data: bytes(range(256)) * (len(data) // 256 + 1),  # a copy gone wrong
])
def test_every_checkpoint_damaged_is_an_error_naming_them_never_a_start_from_scratch(tmp_path: Path, damage) -> None:
    store = three_checkpoints(tmp_path)
    for step in store.steps():
        path = store.path_for(step)
        path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="no usable checkpoint") as error:
        store.latest()
    assert all(f"ckpt-00000000000{step}.cdckpt" in str(error.value) for step in (1, 2, 3))
    assert "move the *.corrupt files" in str(error.value)
    # The next start finds only the files set aside: still refused, not a silent start from scratch.
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        CheckpointStore(tmp_path).latest()


def test_a_checkpoint_that_cannot_be_read_is_an_error_and_no_older_one_is_loaded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = three_checkpoints(tmp_path)
    newest = store.path_for(3)
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path == newest:  # permissions, an I/O error: not damage, the file may be fine
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(CheckpointError, match="cannot be read .Permission denied.; make it readable"):
        store.latest()
    assert store.steps() == [1, 2, 3]  # nothing renamed .corrupt


def test_a_checkpoint_of_a_newer_file_format_is_an_error_and_no_older_one_is_loaded(tmp_path: Path) -> None:
    store = three_checkpoints(tmp_path)
    newest = store.path_for(3)
    newest.write_bytes(b"CDCKPT02" + newest.read_bytes()[8:])
    with pytest.raises(CheckpointFormatError, match="format CDCKPT02, written by another version of crossdistil"):
        store.latest()
    assert store.steps() == [1, 2, 3] and newest.exists()


def test_a_checkpoint_of_a_newer_trainer_format_says_so_instead_of_starting_a_new_model(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).write(1, {}, {"trainer_format": 3})
    with pytest.raises(CheckpointError, match="written by a newer version of crossdistil .trainer_format 3") as error:
        check_format(CheckpointStore(tmp_path).latest())
    assert "empty directory" not in str(error.value)


def test_a_second_writer_of_a_directory_is_refused_naming_the_first_and_leaves_its_temp_files(tmp_path: Path) -> None:
    with lock_held_by_another_process(tmp_path) as holder:
        in_flight = tmp_path / ".tmp-ckpt-000000000007.cdckpt.x"  # the first writer's checkpoint, mid-write
        in_flight.write_bytes(b"partial")
        with pytest.raises(CheckpointDirectoryInUse, match=f"in use by another trainer .pid {holder.pid}."):
            CheckpointStore(tmp_path, lock=True)
        assert in_flight.exists()
        CheckpointStore(tmp_path)  # a reader takes no lock
    CheckpointStore(tmp_path, lock=True).unlock()  # the lock ends with its process, however it ends


@pytest.mark.parametrize("damage, problem", [
    (lambda data: data[:-8], "truncated"),
    (lambda data: b"\0" * len(data), "line 1 is not a ledger header"),
    (lambda data: b"\xff" + data[1:], "not UTF-8"),
    (lambda data: data.replace(b"\t1\t", b"\t\t", 1), "line 2"),
])
def test_a_damaged_ledger_segment_is_an_error_naming_it_not_rows_dropped(tmp_path: Path, damage, problem) -> None:
    ledger = Ledger(tmp_path, ("click",))
    ledger.add(["i1", "i2"], {"click": [1, 0]}, {"click": [0.7, 0.2]})
    segment = ledger.commit(step=1)
    segment.write_bytes(damage(segment.read_bytes()))
    with pytest.raises(LedgerError, match=problem) as error:
        read_ledger(tmp_path)
    assert str(segment) in str(error.value)

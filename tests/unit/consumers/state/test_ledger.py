"""The trained-sample ledger keeps exactly the samples inside the restored model."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumers.state.ledger import Ledger, read_ledger

pytestmark = pytest.mark.unit


def test_ledger_keeps_only_segments_up_to_the_restored_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, ("click",))
    ledger.add(["a", "b"], {"click": [1, 0]}, {"click": [0.9, 0.1]})
    ledger.commit(2)
    ledger.add(["c"], {"click": [1]}, {"click": [0.5]})
    ledger.commit(3)  # its checkpoint never landed
    ledger.add(["d"], {"click": [0]}, {"click": [0.5]})  # never committed
    assert Ledger(tmp_path, ("click",)).discard_after(2) == [3]
    assert [(r["impression_id"], r["label/click"]) for r in read_ledger(tmp_path)] == [("a", 1), ("b", 0)]


def test_a_ledger_directory_that_is_a_file_is_named_in_the_error(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match=f"^ledger directory {afile} cannot be created: {afile} is a file, not"):
        Ledger(afile, ("click",))

"""The trained-sample ledger: which impressions the model was trained on, made durable with the checkpoints.

An optional audit trail of the trainer (``crossdistil train --ledger DIR``), used by the tests to prove that
every impression is trained exactly once across crashes. Rows of trained batches are collected in memory; at
each checkpoint the rows since the previous one become one *segment* file, ``ledger-<step, 12 digits>.tsv``,
written atomically (temp file, fsync, rename) **before** the checkpoint of that step. On start the trainer
restores checkpoint S and calls :meth:`Ledger.discard_after` ``(S)``: segments of steps above S belong to a
checkpoint that never landed, and their samples are trained again from the replayed events. So the union of
the segments on disk is always exactly the set of samples inside the latest checkpoint's model.

A segment is TSV with a header line: ``impression_id``, then ``label/<task>`` (0 or 1) and ``pred/<task>`` (the
prequential prediction made before the update) for each task, one row per trained sample in training order.

>>> import tempfile
>>> ledger = Ledger(tempfile.mkdtemp(), ("click",))
>>> ledger.add(["i1", "i2"], {"click": [1, 0]}, {"click": [0.7, 0.2]})
>>> _ = ledger.commit(step=1)
>>> ledger.add(["i3"], {"click": [1]}, {"click": [0.6]})
>>> _ = ledger.commit(step=2)
>>> ledger.discard_after(1)
[2]
>>> [row["impression_id"] for row in read_ledger(ledger.directory)]
['i1', 'i2']
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from consumers.state.checkpoints import fsync_directory, make_folder

_SEGMENT = re.compile(r"^ledger-(\d{12})\.tsv$")


class Ledger:
    """Collects trained rows and writes them as one segment per checkpoint step (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str], tasks: Sequence[str]) -> None:
        self.directory = Path(directory)
        self.tasks = tuple(tasks)
        make_folder(self.directory, "ledger directory")
        self._lines: list[str] = []

    def add(self, impression_ids: Sequence[str], labels: Mapping[str, Sequence[Any]],
            predictions: Mapping[str, Sequence[Any]]) -> None:
        """Record one trained batch (labels and predictions per task, in the batch's row order)."""
        columns = [labels[t] for t in self.tasks] + [predictions[t] for t in self.tasks]
        for i, impression_id in enumerate(impression_ids):
            fields = [str(impression_id)] + [str(int(c[i])) for c in columns[: len(self.tasks)]]
            fields += [f"{float(c[i]):.6f}" for c in columns[len(self.tasks):]]
            self._lines.append("\t".join(fields))

    @property
    def uncommitted(self) -> int:
        """Rows trained since the last commit (lost, and trained again, if the process dies now)."""
        return len(self._lines)

    def commit(self, step: int) -> Path | None:
        """Write the rows since the last commit as the segment of ``step`` (atomically); None if there are none."""
        if not self._lines:
            return None
        header = "\t".join(["impression_id"] + [f"label/{t}" for t in self.tasks] + [f"pred/{t}" for t in self.tasks])
        final = self.directory / f"ledger-{step:012d}.tsv"
        fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(header + "\n" + "\n".join(self._lines) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, final)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)
        self._lines = []
        return final

    def discard_after(self, step: int | None) -> list[int]:
        """Delete segments newer than the restored checkpoint's ``step`` (all of them for None); returns their steps.

        Also drops rows not yet committed: they describe training that the restored state does not contain.
        """
        self._lines = []
        removed = []
        for segment_step, path in segments(self.directory):
            if step is None or segment_step > step:
                path.unlink()
                removed.append(segment_step)
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".tmp-"):
                Path(entry.path).unlink(missing_ok=True)
        return removed


def segments(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every segment in ``directory``, oldest first."""
    found = []
    for entry in os.scandir(directory):
        match = _SEGMENT.match(entry.name)
        if match:
            found.append((int(match.group(1)), Path(entry.path)))
    return sorted(found)


class LedgerError(ValueError):
    """A ledger segment that is not what ``Ledger.commit`` writes: damaged on disk (truncated, zero-filled)."""


def read_ledger(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every trained row, in training order: ``{"impression_id": str, "label/<task>": int, "pred/<task>": float}``.

    A damaged segment is a ``LedgerError`` naming the file and the line, never rows silently dropped or misread (a
    segment is written whole, atomically, so any other shape is damage on disk).
    """
    rows: list[dict[str, Any]] = []
    for _, path in segments(directory):
        rows += read_segment(path)
    return rows


def read_segment(path: Path) -> list[dict[str, Any]]:
    """The rows of one segment file; ``LedgerError`` naming the file and line when it is damaged."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LedgerError(f"ledger segment {path} is damaged: not UTF-8 text at byte {exc.start}") from None
    lines = text.split("\n")
    header = lines[0].split("\t")
    if header[0] != "impression_id" or not all(name.startswith(("label/", "pred/")) for name in header[1:]):
        raise LedgerError(f"ledger segment {path} is damaged: line 1 is not a ledger header ({lines[0][:80]!r})")
    if lines[-1] != "" or len(lines) < 3:  # commit writes the header, at least one row, and a final newline
        raise LedgerError(f"ledger segment {path} is damaged: truncated (no complete last line)")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines[1:-1], start=2):
        values = line.split("\t")
        try:
            if len(values) != len(header) or not values[0]:
                raise ValueError(f"{len(values)} fields, the header has {len(header)}")
            row: dict[str, Any] = {"impression_id": values[0]}
            for name, value in zip(header[1:], values[1:]):
                row[name] = int(value) if name.startswith("label/") else float(value)
        except ValueError as exc:
            raise LedgerError(f"ledger segment {path} is damaged at line {number}: {exc}") from None
        rows.append(row)
    return rows

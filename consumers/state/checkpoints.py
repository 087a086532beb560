"""Checkpoints on local disk: written atomically, the last K kept, the newest complete one loaded.

Nothing is ever unpickled: tensors are stored as safetensors bytes, everything else as msgpack.

File format (one file per checkpoint, ``ckpt-<step, 12 digits>.cdckpt``)::

    offset  size  content
    0       8     magic b"CDCKPT01"
    8       8     M: length of the metadata, unsigned little-endian
    16      8     S: length of the tensors, unsigned little-endian
    24      32    sha256 over the next M + S bytes
    56      M     metadata: one msgpack map (plain values: str keys, str/int/float/bool/None/bytes/lists/maps)
    56+M    S     tensors: safetensors bytes (``safetensors.torch.save``)

The file is exactly ``56 + M + S`` bytes; anything else (a truncated or extended file) is rejected.

What a trainer puts in the metadata (conventions, not enforced): ``step`` (added by ``write``),
``positions`` (``positions_to_plain({(topic, partition): next offset})``), ``join_state``
(``AttributionJoin.state_dict()``), ``batcher_state``, ``watermark_ms``, ``config_hash``. Restoring means:
load the model tensors, ``join.load_state_dict(...)``, then seek every partition to its position; events
before a position are already inside the join state or the model.

Writing: a temporary file in the same directory, fsync, rename over the final name, fsync the directory. A
crash leaves at worst a ``.tmp-*`` file, which readers ignore and the next store opened on the directory
removes; a write that fails (a full disk, a file size limit) removes its temporary file and leaves the previous
checkpoints as they were. One writer per directory: the trainer opens its store with ``lock=True``, which holds
an exclusive lock on ``.lock`` there for the life of the process, so a second trainer pointed at the same folder
is refused instead of interleaving its checkpoints (and offsets) with the first one's.

Reading (``latest``): the newest file that verifies. A damaged newer file (truncated, zero-filled, garbage) is
renamed ``<name>.corrupt`` with a warning and the next older one is taken: its positions are earlier, so the
events after them are read and trained again, once. Never a silent start from scratch: when checkpoints (or
``.corrupt`` files set aside before) exist but none verifies, ``latest`` raises ``CheckpointError`` naming them.
A file of a newer format (magic ``CDCKPT`` + another number) or one that cannot be read (permissions, I/O) is
also an error, not damage: it is left in place and nothing older is loaded instead.

Beside the checkpoints, ``published.json`` (written the same atomic way) records the last publication that
Kafka acknowledged: ``{"version": V, "step": S}``. A checkpoint is written before its publication is attempted,
so only this record says whether the publication landed; a trainer restored from a checkpoint whose step it
does not name publishes that step again.

Several ranks (``consumers.trainer.ranked``) each keep a store of their own, ``<checkpoint.dir>/rank-<r>``, whose
files are numbered by checkpoint *round* instead of step; rank 0's file holds the model, the others' only their
stream state. Rank 0's store also holds ``round.json``, ``{"round": R, "world_size": N, ...}``, written once every
rank's file of round R is durable: the round every rank restores.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from consumers.state.tensors import safetensors_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

MAGIC = b"CDCKPT01"
_MAGIC_FAMILY = b"CDCKPT"  # + two digits: the file format's number
_HEADER = struct.Struct("<8sQQ32s")
_NAME = re.compile(r"^ckpt-(\d{12})\.cdckpt$")
_TEMP_PREFIX = ".tmp-"
_CORRUPT_SUFFIX = ".corrupt"
LOCK_FILE = ".lock"  # held by the one writer of a directory (CheckpointStore(..., lock=True))
PUBLICATION_RECORD = "published.json"
ROUND_RECORD = "round.json"  # several ranks: the newest round whose every part is durable (rank 0's store)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupted, or not a checkpoint at all.

    ``problem``: what is wrong, without the file's name (``str()`` is "<path>: <problem>" where ``path`` is given).
    ``damaged``: whether the file itself is damaged, so that a store may set it aside and take an older one; False
    for a sound file that cannot be used here (unreadable, of a newer format, one rank's part where a model is
    needed), which is left as it is.
    """

    def __init__(self, problem: str, path: Any = None, damaged: bool = True) -> None:
        super().__init__(problem if path is None else f"{path}: {problem}")
        self.problem, self.path, self.damaged = problem, path, damaged


class CheckpointFormatError(CheckpointError):
    """A checkpoint file of a format this version does not read (written by a newer crossdistil): not damage."""

    def __init__(self, problem: str, path: Any = None, damaged: bool = False) -> None:
        super().__init__(problem, path, damaged)


class LockHeld(OSError):
    """Another process holds the lock ``take_lock`` asked for; ``holder``: the pid its file names ("unknown")."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is locked by pid {holder}")
        self.holder = holder


def take_lock(path: Path) -> int:
    """An exclusive lock on the file ``path`` (made if missing), held until its descriptor (returned) is closed or
    the process ends, however it ends (a POSIX record lock); the file then names this process's pid. ``LockHeld``
    when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class CheckpointDirectoryInUse(OSError):
    """Another process holds the lock of a checkpoint directory (``CheckpointStore(..., lock=True)``)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its step, tensors (on CPU), plain metadata and the file it came from."""

    step: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    path: Path | None = None


def encode_checkpoint_file(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> bytes:
    """The bytes of one checkpoint file (see the module docstring for the layout)."""
    try:
        meta = msgpack.packb(dict(metadata), use_bin_type=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint metadata must hold plain values only (msgpack-able): {exc}") from exc
    body = safetensors_bytes(tensors)
    digest = hashlib.sha256()
    digest.update(meta)
    digest.update(body)
    return _HEADER.pack(MAGIC, len(meta), len(body), digest.digest()) + meta + body


def checkpoint_step(name: str, set_aside: bool = False) -> int | None:
    """The step of a checkpoint file named ``name`` (``ckpt-<12 digits>.cdckpt``; ``set_aside``: of one a restore set
    aside as damaged, ``ckpt-<12 digits>.cdckpt.corrupt``), or None for any other name.

    >>> checkpoint_step("ckpt-000000000042.cdckpt"), checkpoint_step("ckpt-000000000042.cdckpt.corrupt")
    (42, None)
    >>> checkpoint_step("ckpt-000000000042.cdckpt.corrupt", set_aside=True), checkpoint_step("published.json")
    (42, None)
    """
    if set_aside:
        if not name.endswith(_CORRUPT_SUFFIX):
            return None
        name = name[:-len(_CORRUPT_SUFFIX)]
    match = _NAME.match(name)
    return int(match.group(1)) if match else None


def decode_checkpoint_file(data: bytes, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Verify and decode the bytes of one checkpoint file; raises CheckpointError saying what is wrong.

    ``with_tensors=False``: verify everything but decode only the metadata (the tensors come back empty).
    """
    from safetensors.torch import load

    if len(data) < _HEADER.size:
        raise CheckpointError(f"truncated: {len(data)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, meta_len, body_len, expected = _HEADER.unpack_from(data)
    if magic != MAGIC:
        if magic[:6] == _MAGIC_FAMILY and magic[6:].isdigit():
            raise CheckpointFormatError(f"checkpoint file format {magic.decode()}, written by another version of "
                                        f"crossdistil; this one reads {MAGIC.decode()} (run the version that wrote "
                                        "it, or a newer one)")
        raise CheckpointError(f"not a crossdistil checkpoint (magic {magic!r}, expected {MAGIC!r})")
    size = _HEADER.size + meta_len + body_len
    if len(data) != size:
        raise CheckpointError(f"truncated or extended: {len(data)} bytes, the header announces {size}")
    view = memoryview(data)
    meta = view[_HEADER.size : _HEADER.size + meta_len]
    body = view[_HEADER.size + meta_len :]
    digest = hashlib.sha256()
    digest.update(meta)
    digest.update(body)
    if digest.digest() != expected:
        raise CheckpointError("corrupted: sha256 of the content does not match the header")
    try:
        metadata = msgpack.unpackb(meta, raw=False, strict_map_key=False)
        tensors = load(bytes(body)) if with_tensors else {}
    except Exception as exc:  # hash matched, so this is a writer bug, not disk damage
        raise CheckpointError(f"undecodable content despite a matching hash: {exc}") from exc
    if not isinstance(metadata, dict):
        raise CheckpointError(f"metadata is a {type(metadata).__name__}, expected a map")
    return tensors, metadata


def make_folder(directory: Path, what: str) -> None:
    """Create ``directory`` and its missing parents; where that fails, an OSError of the same kind saying which
    folder (``what``) and why in one line (``FileExistsError``'s own message, "[Errno 17] File exists", names
    neither the folder meant nor the file in its way).

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> _ = (root / "afile").write_text("x")
    >>> make_folder(root / "afile" / "checkpoints", "checkpoint directory")
    Traceback (most recent call last):
    ...
    NotADirectoryError: checkpoint directory .../afile/checkpoints cannot be created: .../afile is a file, not a folder
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        in_the_way = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
        why = f"{in_the_way} is a file, not a folder" if in_the_way is not None else exc.strerror
        raise type(exc)(f"{what} {directory} cannot be created: {why}") from None


def positions_to_plain(positions: Mapping[tuple[str, int], int]) -> list[list[Any]]:
    """``{(topic, partition): next offset}`` as ``[[topic, partition, next offset], ...]``, sorted."""
    return [[topic, partition, offset] for (topic, partition), offset in sorted(positions.items())]


def positions_from_plain(plain: Iterable[Iterable[Any]]) -> dict[tuple[str, int], int]:
    """Inverse of ``positions_to_plain``."""
    return {(str(topic), int(partition)): int(offset) for topic, partition, offset in plain}


def publication_acknowledged(meta: Mapping[str, Any], record: Mapping[str, Any] | None, step: Any) -> bool:
    """Whether Kafka acknowledged the publication of checkpoint ``step`` (its metadata ``meta``): the checkpoint says
    so (``published``), or the store's publication record (``CheckpointStore.publication``) names that step with the
    checkpoint's version or a later one. The checkpoint is written before its publication is attempted; a restoring
    trainer publishes the step again when this is False, and ``crossdistil inspect`` says which it is."""
    version = meta.get("publish_version")
    return bool(meta.get("published")) or (
        isinstance(record, Mapping) and record.get("step") == step and isinstance(version, int)
        and isinstance(record.get("version"), int) and record["version"] >= version)


def untrained(step: Any, warm_started: Any) -> bool:
    """Whether the checkpoint of learner step ``step`` holds a new model's random initialisation: step 0 of a model
    not warm-started (its metadata's ``warm_started``). Such a checkpoint is never published (a trainer's
    ``Checkpointer.publishes``): it would replace the model serving has with random scores.

    >>> untrained(0, False), untrained(0, True), untrained(3, False)
    (True, False, False)
    """
    return step == 0 and not warm_started


class CheckpointStore:
    """A directory of checkpoints: ``write`` atomically, keep the last ``keep_last``, load the ``latest``.

    >>> import tempfile, torch
    >>> store = CheckpointStore(tempfile.mkdtemp(), keep_last=2)
    >>> for step in (10, 20, 30):
    ...     _ = store.write(step, {"w": torch.full((2,), float(step))}, {"positions": [["impressions", 0, step]]})
    >>> store.steps()
    [20, 30]
    >>> latest = store.latest()
    >>> latest.step, latest.tensors["w"].tolist(), latest.metadata["positions"]
    (30, [30.0, 30.0], [['impressions', 0, 30]])
    """

    def __init__(self, directory: str | os.PathLike[str], keep_last: int = 3, lock: bool = False) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be a positive integer, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        make_folder(self.directory, "checkpoint directory")
        self._lock_fd: int | None = None
        if lock:  # before the temp files go: they may be another writer's, mid-write
            self._lock()
        self._remove_temp_files()

    def _lock(self) -> None:
        """Hold an exclusive lock on ``.lock`` for the life of this process (``take_lock``);
        ``CheckpointDirectoryInUse`` naming the holder if another has it."""
        try:
            self._lock_fd = take_lock(self.directory / LOCK_FILE)
        except LockHeld as held:
            raise CheckpointDirectoryInUse(
                f"checkpoint directory {self.directory} is in use by another trainer (pid {held.holder}): one "
                "writer per directory, or their checkpoints and offsets mix; stop that one, or give this one a "
                "checkpoint.dir of its own") from None

    def unlock(self, remove: bool = False) -> None:
        """Release the lock taken with ``lock=True`` (a no-op without one); ``remove``: delete ``.lock`` too."""
        if self._lock_fd is None:
            return
        if remove:
            (self.directory / LOCK_FILE).unlink(missing_ok=True)
        os.close(self._lock_fd)  # closing the file releases the record lock
        self._lock_fd = None

    def path_for(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        return self.directory / f"ckpt-{step:012d}.cdckpt"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, oldest first (not verified)."""
        return sorted(step for entry in os.scandir(self.directory) if (step := checkpoint_step(entry.name)) is not None)

    def write(self, step: int, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> Path:
        """Write the checkpoint of ``step`` atomically, then drop all but the newest ``keep_last``."""
        if not isinstance(step, int) or step < 0 or step >= 10**12:
            raise ValueError(f"step must be an integer in [0, 10**12), got {step!r}")
        final = self.path_for(step)
        self._write_atomically(final, encode_checkpoint_file(tensors, {**metadata, "step": step}))
        self._prune()
        return final

    def write_publication(self, version: int, step: int) -> None:
        """Record that Kafka acknowledged publication ``version`` of ``step`` (see the module docstring)."""
        self._write_atomically(self.directory / PUBLICATION_RECORD,
                               json.dumps({"version": int(version), "step": int(step)}).encode())

    def publication(self) -> dict[str, int] | None:
        """The last acknowledged publication, ``{"version", "step"}``; None when there is none (or it is unreadable)."""
        path = self.directory / PUBLICATION_RECORD
        try:
            record = json.loads(path.read_bytes())
            return {"version": int(record["version"]), "step": int(record["step"])}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %s (the restored step is published again)", path, exc)
            return None

    def write_round(self, record: Mapping[str, Any]) -> None:
        """Several ranks (``consumers.trainer.ranked``): record that checkpoint round ``record["round"]`` is complete,
        every rank's part durable. Only the rank-0 store holds this record; see ``ROUND_RECORD``."""
        self._write_atomically(self.directory / ROUND_RECORD, json.dumps(dict(record), sort_keys=True).encode())

    def round(self) -> dict[str, Any] | None:
        """The newest complete round's record, or None when no round completed (or the record is unreadable)."""
        path = self.directory / ROUND_RECORD
        try:
            record = json.loads(path.read_bytes())
            int(record["round"]), int(record["world_size"])
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is unreadable ({exc}): it names the newest complete checkpoint round of "
                                  "the ranks; restore it from a backup or start from an empty checkpoint.dir") from exc

    def _write_atomically(self, final: Path, data: bytes) -> None:
        fd, temp_name = tempfile.mkstemp(prefix=f"{_TEMP_PREFIX}{final.name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp_name, final)
        except BaseException:
            Path(temp_name).unlink(missing_ok=True)
            raise
        fsync_directory(self.directory)

    def load(self, path: str | os.PathLike[str], with_tensors: bool = True) -> Checkpoint:
        """Load and verify one checkpoint file (``read_checkpoint_file``); raises CheckpointError if it is unusable.

        ``with_tensors=False``: the metadata only (for a process that leaves the tensors to another one).
        """
        return read_checkpoint_file(path, with_tensors)

    def latest(self, with_tensors: bool = True, model: bool = False) -> Checkpoint | None:
        """The newest checkpoint that loads and verifies (``read_checkpoint_file``; ``model``: one that holds the
        model, not a rank's part of a round); None if the directory never held one.

        Damaged files are renamed to ``<name>.corrupt`` (kept for inspection, never loaded again) with a
        warning, so that pruning cannot later keep them in place of good checkpoints, and the next older one is
        tried. ``CheckpointError`` when checkpoints exist but none verifies (those of this call and ``.corrupt``
        files set aside before: starting from scratch would retrain every partition from its beginning), or when
        the newest is sound but cannot be used (a newer format, unreadable, a rank's part): each names the file and
        what to do, and nothing older is loaded in its place.
        """
        damaged: list[str] = []
        for step in reversed(self.steps()):
            path = self.path_for(step)
            try:
                return read_checkpoint_file(path, with_tensors, model)
            except CheckpointError as exc:
                if not exc.damaged:
                    raise type(exc)(f"{exc.problem}; it is left as it is, and nothing older is loaded in its place",
                                    path, damaged=False) from None
                log.warning("skipping unusable checkpoint %s: %s (renamed to %s%s)", path, exc.problem, path.name,
                            _CORRUPT_SUFFIX)
                damaged.append(f"{path.name}: {exc.problem}")
                try:
                    os.replace(path, path.with_name(path.name + _CORRUPT_SUFFIX))
                except OSError:
                    pass
        set_aside = sorted(entry.name for entry in os.scandir(self.directory)
                           if checkpoint_step(entry.name, set_aside=True) is not None)
        if damaged or set_aside:
            found = "; ".join(damaged) if damaged else ", ".join(set_aside)
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}, only damaged ones ({found}); starting from scratch would "
                "train every partition again from its beginning. Restore the checkpoints from a backup, or, to start "
                f"a new model, move the *{_CORRUPT_SUFFIX} files out of the folder (or point checkpoint.dir at an "
                "empty one)")
        return None

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            self.path_for(step).unlink(missing_ok=True)

    def _remove_temp_files(self) -> None:
        for entry in os.scandir(self.directory):
            if entry.name.startswith(_TEMP_PREFIX):
                log.warning("removing %s, left by an interrupted checkpoint write", entry.path)
                Path(entry.path).unlink(missing_ok=True)


def read_checkpoint_file(path: str | os.PathLike[str], with_tensors: bool = False, model: bool = False
                         ) -> Checkpoint:
    """The checkpoint file at ``path``, verified, its tensors decoded only ``with_tensors``: the one reader of a
    restore, a warm start and ``crossdistil inspect``. Nothing is unpickled, nothing on disk is changed.

    One ``CheckpointError`` per problem, "<path>: <problem>" (``problem`` alone on the exception):

    * not damage, the file left as it is (``damaged`` False): it cannot be read (permissions, an I/O error), or it
      is of a file format this version does not read (``CheckpointFormatError``), or (``model``: where a model is
      needed) it is one rank's part of a checkpoint round other than rank 0's, which holds no model;
    * damage: shorter than its header, not a checkpoint, truncated or extended, a sha256 that does not match,
      undecodable, metadata without an integer ``step``, or a step other than its name's (``ckpt-<step>.cdckpt``).

    >>> import tempfile
    >>> path = CheckpointStore(tempfile.mkdtemp()).write(7, {}, {"rank": 1})
    >>> read_checkpoint_file(path).step
    7
    >>> read_checkpoint_file(path, model=True)
    Traceback (most recent call last):
    ...
    consumers.state.checkpoints.CheckpointError: .../ckpt-000000000007.cdckpt: rank 1's part of a checkpoint round...
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot be read ({exc.strerror or exc}); make it readable", path, damaged=False
                              ) from exc
    try:
        tensors, metadata = decode_checkpoint_file(data, with_tensors)
    except CheckpointError as exc:
        raise type(exc)(exc.problem, path, exc.damaged) from None
    step, named = metadata.get("step"), checkpoint_step(path.name)
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"its metadata has no integer 'step' ({step!r}): not written by a checkpoint store",
                              path)
    if named is not None and step != named:
        raise CheckpointError(f"its metadata says step {step}, its name {named}: a file renamed or copied over "
                              f"another; name it ckpt-{step:012d}.cdckpt or move it away", path)
    rank = metadata.get("rank", 0)
    if model and rank != 0:
        raise CheckpointError(f"rank {rank}'s part of a checkpoint round: only the stream state of its partitions; "
                              "the model is in the rank-0 folder's files", path, damaged=False)
    return Checkpoint(step=step, tensors=tensors, metadata=metadata, path=path)


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename inside ``directory`` durable; skipped where directories cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

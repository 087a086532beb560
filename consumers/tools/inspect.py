"""``crossdistil inspect``: what a trainer left on disk, and what is on the serving topic, without touching either.

``crossdistil inspect checkpoints DIR`` reads a trainer's ``checkpoint.dir`` (or a ranked trainer's, with its
``rank-<r>`` folders): every checkpoint file with its step, when it was written, its size and whether it verifies
(``consumers.state.checkpoints.read_checkpoint_file``, the reader of a restore: the header, the length, the sha256
and the step), and for each that verifies the model's configuration, the stream positions, the join's pending
impressions and counters and its publication; beside them the store's publication record, the ranks' round record,
the files an interrupted write or a damaged checkpoint left, a ``--ledger``'s segments, and whether a trainer holds
the folder's lock now. Nothing in the folder is created, renamed, removed or written (not even the lock, which is
only tested with ``F_GETLK``), and nothing is unpickled: checkpoints are msgpack and safetensors, read by the
store's own reader without their tensors.

``crossdistil inspect serving --bootstrap HOST:PORT`` reads the serving topic from its beginning to its end with
serving's start-up loop (``consumers.runtime.topic_range.read_range``; no consumer group, nothing committed) and
verifies each publication with ``consumers.state.wire.Reassembler``, the code a replica verifies it with: versions,
steps, chunks present or missing (compaction keeps only the newest value of each chunk key), size and wire format,
the newest ``--newest`` first. It reads in bounded memory (:class:`Publications`): a version's chunks are held only
until its manifest, and only the newest judgements are kept.

Exit status: 0 when the newest checkpoint verifies (every rank's newest, for ranks) or the serving topic was read;
2 for bad input (DIR is not a folder); 3 when Kafka cannot be reached or the topic does not exist; 4 when the newest
checkpoint does not verify; 5 when there is no checkpoint at all. ``--json`` prints one JSON object instead of the
table (its shape: docs/serving.md, "Inspecting a trainer's state").
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import heapq
import json
import os
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.runtime.config import KafkaConfig
from consumers.runtime.topic_range import read_range
from consumers.state.checkpoints import (
    LOCK_FILE,
    PUBLICATION_RECORD,
    ROUND_RECORD,
    CheckpointError,
    checkpoint_step,
    publication_acknowledged,
    read_checkpoint_file,
    untrained,
)
from consumers.state.ledger import LedgerError, read_segment, segments
from consumers.state.wire import (
    DEFAULT_MAX_VERSIONS,
    MANIFEST_KEY,
    SERVING_TOPIC_MAX_MESSAGE_BYTES,
    Reassembler,
    WireCheckpoint,
)
from streamer.kafka_settings import SecurityError, add_client_arguments, client_options_from_args

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_KAFKA = 3
EXIT_NEWEST_DAMAGED = 4
EXIT_NO_CHECKPOINT = 5

_RANK_FOLDER = re.compile(r"^rank-(\d+)$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil inspect``."""
    parser.epilog = ("exit status: 0 the newest checkpoint verifies (every rank's, for ranks) / the topic was read; "
                     "2 DIR is not a folder; 3 Kafka unreachable or no such topic; 4 the newest checkpoint does not "
                     "verify; 5 no checkpoint in DIR")
    what = parser.add_subparsers(dest="what", metavar="WHAT", required=True)
    checkpoints = what.add_parser(
        "checkpoints", help="a trainer's checkpoint.dir: files, verification, positions, join, publication, lock",
        description="Every checkpoint in DIR (a trainer's checkpoint.dir, or a ranked trainer's with rank-<r> "
                    "folders), read-only: nothing in DIR is changed, and nothing is unpickled.",
        epilog="exit status: 0 the newest checkpoint verifies (every rank's newest, for ranks); 2 DIR is not a "
               "folder; 4 the newest checkpoint does not verify (the trainer would fall back to an older one, or "
               "refuse to start); 5 no checkpoint in DIR")
    checkpoints.add_argument("directory", metavar="DIR", help="the trainer's checkpoint.dir")
    checkpoints.add_argument("--ledger", metavar="DIR", default=None,
                             help="the trainer's --ledger folder: list its segments too (rank-<r> folders for ranks)")
    checkpoints.add_argument("--json", action="store_true", help="one JSON object (docs/serving.md) instead of a table")
    serving = what.add_parser(
        "serving", help="the publications on the serving topic: versions, steps, chunks, complete or not",
        description="The publications on the serving topic, newest first, read with serving's own reader (no "
                    "consumer group: nothing is committed).",
        epilog="exit status: 0 the topic was read; 3 Kafka is unreachable or the topic does not exist")
    serving.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="a broker of the cluster")
    serving.add_argument("--topic", default=None, metavar="T",
                         help="the serving topic (default: kafka.model_topic's default, model-updates)")
    serving.add_argument("--newest", type=_count, default=NEWEST, metavar="N",
                         help=f"list the newest N publications (default {NEWEST}; 0: all of them); every one is read "
                              "and counted")
    serving.add_argument("--json", action="store_true", help="one JSON object (docs/serving.md) instead of a table")
    add_client_arguments(serving)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of publications (an integer >= 0; 0 lists all)")
    return value


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil inspect``; returns the exit status."""
    if args.what == "checkpoints":
        return _run_checkpoints(args)
    return _run_serving(args)


# ------------------------------------------------------------------------------------------------ checkpoints


def _run_checkpoints(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"crossdistil inspect: {directory} is not a folder (give a trainer's checkpoint.dir)", file=sys.stderr)
        return EXIT_BAD_INPUT
    report = inspect_checkpoints(directory, Path(args.ledger) if args.ledger else None)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_checkpoints(report))
    return int(report["exit_status"])


def inspect_checkpoints(directory: Path, ledger: Path | None = None) -> dict[str, Any]:
    """The report of ``crossdistil inspect checkpoints``: ``{"directory", "status", "exit_status", "folders"}``, a
    folder per store (the directory itself, then its ``rank-<r>`` folders), each from :func:`inspect_folder`.

    ``status``: ``ok`` (the newest checkpoint of every store that has any verifies), ``newest_damaged`` or
    ``no_checkpoint``.
    """
    ranks = sorted((int(m.group(1)), entry.path) for entry in os.scandir(directory)
                   if entry.is_dir() and (m := _RANK_FOLDER.match(entry.name)))
    folders = []
    if not ranks or _has_store_files(directory):
        folders.append(inspect_folder(directory, None, ledger))
    for rank, path in ranks:
        folders.append(inspect_folder(Path(path), rank, ledger / f"rank-{rank}" if ledger is not None else None))
    with_checkpoints = [f for f in folders if f["checkpoints"]]
    if not with_checkpoints:
        status, code = "no_checkpoint", EXIT_NO_CHECKPOINT
    elif all(f["checkpoints"][0]["verifies"] for f in with_checkpoints):
        status, code = "ok", EXIT_OK
    else:
        status, code = "newest_damaged", EXIT_NEWEST_DAMAGED
    return {"directory": str(directory), "status": status, "exit_status": code, "folders": folders}


def _has_store_files(directory: Path) -> bool:
    return any(entry.name.startswith("ckpt-") or entry.name in (LOCK_FILE, PUBLICATION_RECORD)
               for entry in os.scandir(directory))


def inspect_folder(directory: Path, rank: int | None, ledger: Path | None) -> dict[str, Any]:
    """One store's folder: ``{"directory", "rank", "lock", "publication_record", "round_record", "checkpoints"
    (newest first), "set_aside", "temp_files", "ledger"}``."""
    names = sorted(entry.name for entry in os.scandir(directory) if entry.is_file())
    record, record_problem = _json_record(directory / PUBLICATION_RECORD)
    round_record, round_problem = _json_record(directory / ROUND_RECORD)
    checkpoints = [inspect_file(directory / name, record)
                   for name in sorted((n for n in names if checkpoint_step(n) is not None), reverse=True)]
    return {
        "directory": str(directory),
        "rank": rank,
        "lock": lock_holder(directory),
        "publication_record": record, "publication_record_problem": record_problem,
        "round_record": round_record, "round_record_problem": round_problem,
        "checkpoints": checkpoints,
        "set_aside": [n for n in names if checkpoint_step(n, set_aside=True) is not None],
        "temp_files": [n for n in names if n.startswith(".tmp-")],
        "ledger": inspect_ledger(ledger) if ledger is not None else None,
    }


def _json_record(path: Path) -> tuple[Any, str | None]:
    """A small JSON record of the store (``published.json``, ``round.json``): (its value, None), (None, None) when
    absent, (None, why) when unreadable."""
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable: {exc}"


def inspect_file(path: Path, publication_record: Mapping[str, Any] | None) -> dict[str, Any]:
    """One checkpoint file: ``{"file", "step", "written_at" (UTC, ISO 8601), "size_bytes", "verifies", "problem"}``
    and, when it verifies, what the trainer restores from it (:func:`describe_metadata`). Read by the trainer's own
    reader (``read_checkpoint_file``): ``problem`` is its error's, the file's name left out (the table names it)."""
    stat = path.stat()
    entry: dict[str, Any] = {"file": path.name, "step": checkpoint_step(path.name),
                             "written_at": _utc(stat.st_mtime), "size_bytes": stat.st_size,
                             "verifies": False, "problem": None}
    try:
        checkpoint = read_checkpoint_file(path)
    except CheckpointError as exc:
        entry["problem"] = exc.problem
        return entry
    entry["verifies"] = True
    entry.update(describe_metadata(checkpoint.metadata, publication_record))
    return entry


def describe_metadata(meta: Mapping[str, Any], publication_record: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a verified trainer checkpoint says: ``trainer_format``, ``model`` (rung, backbone, tasks and the options
    that differ from today's defaults), ``positions`` (``"topic/partition": next offset``), ``join``
    (pending impressions, counters, watermark), ``publication`` (version, acknowledged) and, for ranks, ``round``."""
    positions = {f"{topic}/{partition}": offset for topic, partition, offset in meta.get("positions") or []}
    join = meta.get("join_state") if isinstance(meta.get("join_state"), Mapping) else {}
    described: dict[str, Any] = {
        "trainer_format": meta.get("trainer_format"),
        "model": describe_model(meta),
        "positions": positions,
        "join": {"pending_impressions": len(join.get("pending") or []),
                 "counters": dict(join.get("counters") or {}),
                 "watermark_ms": meta.get("watermark_ms")},
        "trained_samples": meta.get("trained_samples"),
        "publication": describe_publication(meta, publication_record),
    }
    if "round" in meta:
        described["round"] = {key: meta.get(key) for key in ("round", "rank", "world_size")}
    return described


def describe_model(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The learner's configuration in a checkpoint's metadata: rung, backbone, tasks, and every other option whose
    value is not ``ModelConfig``'s default today (``{option: [saved, default]}``); None where the file holds no
    learner configuration (a rank other than 0), ``{"kind": "other", ...}`` for a peer's."""
    # lazy: torch (the learner's state helpers) loads only where a checkpoint's model is described
    from consumers.state.learner_state import saved_config
    from models.config import ModelConfig, config_differences

    try:
        saved = saved_config(meta)
    except (ValueError, KeyError, TypeError) as exc:
        return {"kind": "unreadable", "problem": str(exc)}
    if not isinstance(saved, Mapping):
        return None
    if not {"rung", "backbone", "tasks"} <= set(saved):
        return {"kind": "other", "config": _plain(saved)}
    differing = config_differences(dict(saved), ModelConfig())
    return {"kind": "crossdistil", "rung": saved["rung"], "backbone": saved["backbone"],
            "tasks": list(saved["tasks"]),
            "differs_from_defaults": {key: [_plain(was), _plain(now)] for key, (was, now) in differing.items()
                                      if key not in ("rung", "backbone", "tasks")}}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def describe_publication(meta: Mapping[str, Any], record: Mapping[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's publication as a restoring trainer sees it (``consumers.trainer.checkpointing``): its version,
    and whether Kafka acknowledged it (the checkpoint says so, or the store's record names its step)."""
    return {"version": meta.get("publish_version"),
            "acknowledged": publication_acknowledged(meta, record, meta.get("step")),
            "untrained": untrained(meta.get("step"), meta.get("warm_started", False))}


def lock_holder(directory: Path) -> dict[str, Any]:
    """Whether a process holds ``directory/.lock`` now (tested with ``F_GETLK``, which takes nothing: a trainer
    starting meanwhile is not refused), the holder's pid, and the pid the file records (its last holder's).

    ``F_GETLK`` does not see this process's own locks: inspect a folder from another process than its trainer."""
    path = directory / LOCK_FILE
    try:
        recorded = path.read_bytes()[:64].decode(errors="replace").strip()
    except FileNotFoundError:
        return {"held": False, "pid": None, "recorded_pid": None, "problem": None}
    except OSError as exc:
        return {"held": None, "pid": None, "recorded_pid": None, "problem": f"cannot be read: {exc.strerror or exc}"}
    recorded_pid = int(recorded) if recorded.isdigit() else None
    try:
        pid = _lock_owner(path)
    except OSError as exc:
        return {"held": None, "pid": None, "recorded_pid": recorded_pid, "problem": f"cannot test: {exc}"}
    return {"held": pid is not None, "pid": pid, "recorded_pid": recorded_pid, "problem": None}


if sys.platform.startswith("linux"):
    _FLOCK = struct.Struct("@hhqqi4x")  # struct flock: l_type, l_whence, l_start, l_len, l_pid
    _PID_FIELD = 4
elif sys.platform == "darwin":
    _FLOCK = struct.Struct("@qqihh")  # l_start, l_len, l_pid, l_type, l_whence
    _PID_FIELD = 2
else:  # pragma: no cover - the trainer runs on Linux and macOS
    _FLOCK, _PID_FIELD = None, 0


def _lock_owner(path: Path) -> int | None:
    """The pid of the process holding a lock on ``path`` (``F_GETLK``: nothing is taken), or None."""
    if _FLOCK is None:
        raise OSError("F_GETLK is not supported on this platform")
    fd = os.open(path, os.O_RDONLY)
    try:
        if sys.platform == "darwin":
            query = _FLOCK.pack(0, 0, 0, fcntl.F_WRLCK, os.SEEK_SET)
            answer = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
            l_type = answer[3]
        else:
            query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            answer = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, query))
            l_type = answer[0]
    finally:
        os.close(fd)
    return None if l_type == fcntl.F_UNLCK else int(answer[_PID_FIELD])


def inspect_ledger(directory: Path) -> dict[str, Any]:
    """A ledger folder's segments (``consumers.state.ledger``): ``{"directory", "segments": [{"file", "step",
    "rows", "size_bytes", "problem"}], "problem"}``, oldest first; a segment is damaged where the ledger's own reader
    (``read_segment``) says so, its rows then counted by lines."""
    if not directory.is_dir():
        return {"directory": str(directory), "segments": [], "problem": "not a folder"}
    found = []
    for step, path in segments(directory):
        try:
            rows, problem = len(read_segment(path)), None
        except LedgerError as exc:
            rows, problem = max(0, path.read_bytes().count(b"\n") - 1), str(exc)
        found.append({"file": path.name, "step": step, "rows": rows, "size_bytes": path.stat().st_size,
                      "problem": problem})
    return {"directory": str(directory), "segments": found, "problem": None}


def render_checkpoints(report: Mapping[str, Any]) -> str:
    """The human form of :func:`inspect_checkpoints`: a table per folder, then the newest verified checkpoint."""
    lines = [f"{report['directory']}: {_STATUS[report['status']]}"]
    for folder in report["folders"]:
        title = folder["directory"] if folder["rank"] is None else f"rank {folder['rank']}: {folder['directory']}"
        lines += ["", title, f"  lock          {_describe_lock(folder['lock'])}"]
        record = folder["publication_record"]
        if record is not None or folder["publication_record_problem"]:
            lines.append(f"  published     {folder['publication_record_problem'] or _record(record)}")
        if folder["round_record"] is not None or folder["round_record_problem"]:
            lines.append(f"  round record  {folder['round_record_problem'] or json.dumps(folder['round_record'])}")
        if folder["set_aside"]:
            lines.append(f"  set aside     {', '.join(folder['set_aside'])} (damaged, never loaded again)")
        if folder["temp_files"]:
            lines.append(f"  interrupted   {', '.join(folder['temp_files'])} (removed when a trainer opens the folder)")
        if not folder["checkpoints"]:
            lines.append("  no checkpoint")
        else:
            rows = [("FILE", "STEP", "WRITTEN (UTC)", "SIZE", "VERIFIES")]
            rows += [(c["file"], str(c["step"]), c["written_at"], _size(c["size_bytes"]),
                      "yes" if c["verifies"] else f"no: {c['problem']}") for c in folder["checkpoints"]]
            lines += ["  " + line for line in _table(rows)]
            newest = next((c for c in folder["checkpoints"] if c["verifies"]), None)
            if newest is not None:
                lines += _describe_checkpoint(newest)
        if folder["ledger"] is not None:
            lines += _describe_ledger(folder["ledger"])
    return "\n".join(lines)


_STATUS = {"ok": "the newest checkpoint verifies",
           "newest_damaged": "the NEWEST CHECKPOINT DOES NOT VERIFY (a trainer falls back to an older one, or refuses "
                             "to start when none verifies)",
           "no_checkpoint": "no checkpoint (a trainer starts from scratch)"}


def _describe_lock(lock: Mapping[str, Any]) -> str:
    if lock["problem"]:
        return f"unknown ({lock['problem']})"
    if lock["held"]:
        return f"held by pid {lock['pid']} (a trainer is running on this folder)"
    last = f" (last holder: pid {lock['recorded_pid']})" if lock["recorded_pid"] is not None else ""
    return "free" + last


def _record(record: Any) -> str:
    if isinstance(record, Mapping):
        return f"version {record.get('version')} of step {record.get('step')} acknowledged by Kafka"
    return json.dumps(record)


def _describe_checkpoint(c: Mapping[str, Any]) -> list[str]:
    lines = [f"  newest verified: {c['file']}"]
    model = c.get("model")
    if model is not None and model.get("kind") == "crossdistil":
        differs = ", ".join(f"{k}={json.dumps(v[0])}" for k, v in model["differs_from_defaults"].items())
        lines.append(f"    model        rung {model['rung']}, backbone {model['backbone']}, tasks "
                     f"{','.join(model['tasks'])}")
        if differs:
            lines.append(f"    non-default  {differs}")
    elif model is not None:
        lines.append(f"    model        {json.dumps(model)}")
    positions = ", ".join(f"{tp} -> {offset}" for tp, offset in c["positions"].items()) or "none"
    lines.append(f"    positions    {positions}")
    join = c["join"]
    counters = ", ".join(f"{k} {v}" for k, v in join["counters"].items() if v)
    lines.append(f"    join         {join['pending_impressions']} pending impressions"
                 + (f"; {counters}" if counters else ""))
    publication = c["publication"]
    unknown = "NOT acknowledged as far as a restore can tell (a trainer restored from it publishes it again)"
    if publication.get("untrained"):
        lines.append("    publication  none: a new model's step 0 (untrained) is never published")
    else:
        lines.append(f"    publication  version {publication['version']}, "
                     + ("acknowledged" if publication["acknowledged"] else unknown))
    if "round" in c:
        r = c["round"]
        lines.append(f"    round        {r['round']} (rank {r['rank']} of {r['world_size']})")
    return lines


def _describe_ledger(ledger: Mapping[str, Any]) -> list[str]:
    if ledger["problem"]:
        return [f"  ledger        {ledger['directory']}: {ledger['problem']}"]
    segments = ledger["segments"]
    rows = sum(s["rows"] for s in segments)
    damaged = [s["file"] for s in segments if s["problem"]]
    steps = f", steps {segments[0]['step']}..{segments[-1]['step']}" if segments else ""
    return [f"  ledger        {ledger['directory']}: {len(segments)} segments, {rows} rows{steps}"
            + (f"; damaged: {', '.join(damaged)}" if damaged else "")]


# -------------------------------------------------------------------------------------------------- serving


NEWEST = 20  # publications listed by default (--newest); every one is read and counted


def _run_serving(args: argparse.Namespace) -> int:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    # lazy: kafka-python, which the checkpoint view and the parser (crossdistil --help) never need
    from streamer.kafka_security import connection_failure, preflight
    from streamer.topics import honour_auto_create

    topic = args.topic or KafkaConfig().model_topic
    options: dict[str, Any] = {
        "bootstrap_servers": args.bootstrap, "group_id": None, "enable_auto_commit": False,  # reads only
        # Small fetches keep the client's buffers small; a larger message still comes whole (KIP-74, Kafka 0.10.1+).
        "max_partition_fetch_bytes": FETCH_BYTES, "fetch_max_bytes": FETCH_BYTES,
        "allow_auto_create_topics": False, "auto_offset_reset": "earliest",
    }
    try:
        options.update(client_options_from_args(args))
    except SecurityError as exc:
        print(f"crossdistil inspect: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        preflight(args.bootstrap, options)
        consumer = honour_auto_create(KafkaConsumer(**options))
    except KafkaError as exc:
        print(f"crossdistil inspect: {connection_failure(args.bootstrap, options, exc, hint='or set --bootstrap')}",
              file=sys.stderr)
        return EXIT_KAFKA
    judged = Publications(keep=args.newest)
    try:
        if not consumer.partitions_for_topic(topic):
            print(f"crossdistil inspect: topic {topic} does not exist at {args.bootstrap} (give the trainer's "
                  "kafka.model_topic with --topic)", file=sys.stderr)
            return EXIT_KAFKA
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        begin = consumer.beginning_offsets([tp])[tp]
        end = consumer.end_offsets([tp])[tp]
        for record in read_range(consumer, tp, begin, end):  # serving's start-up loop, one record at a time
            judged.add(record.offset, record.key, record.value)
    finally:
        consumer.close(autocommit=False)
    found = judged.newest()
    report = {"bootstrap": args.bootstrap, "topic": topic, "beginning_offset": begin, "end_offset": end,
              "records": judged.records, "publications_seen": judged.seen, "publications": found}
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render_serving(report))
    return EXIT_OK


MAX_MESSAGE_BYTES = SERVING_TOPIC_MAX_MESSAGE_BYTES  # as serving reads the topic: no valid message is larger
# What one fetch asks for (serving asks for MAX_MESSAGE_BYTES): on a 100 MiB topic of 100 publications, 1 / 4 / 16 MiB
# fetches read in 1.91 / 1.38 / 1.44 s with Python peaks of 9 / 19 / 67 MiB (bench/results/inspect_memory_fetch.json).
FETCH_BYTES = 4 << 20
BUFFERED_VERSIONS = DEFAULT_MAX_VERSIONS  # versions whose chunks wait for their manifest, as in a replica's Reassembler


@dataclass
class _Chunks:
    """The chunks of one version read so far: their messages (None once dropped: more than ``BUFFERED_VERSIONS``
    versions waited for a manifest), the indices seen, and the chunk counts their headers announce."""

    messages: list[tuple[bytes | None, bytes | None]] | None = field(default_factory=list)
    indices: set[int] = field(default_factory=set)
    counts: set[Any] = field(default_factory=set)


class Publications:
    """Serving-topic messages in, in offset order (:meth:`add`); the newest publications out (:meth:`newest`), each
    judged alone by a ``Reassembler`` of its own, the verifier a replica uses (chunk and payload sha256, sizes,
    safetensors), whatever came before it.

    Memory stays bounded however long the topic: a version's chunks are held only until its manifest comes (and of
    at most ``BUFFERED_VERSIONS`` versions at once: beyond, the oldest's are dropped, as a replica drops them), and
    only the ``keep`` newest judgements are kept (None or 0: all of them, as ``--newest 0``). ``records`` and
    ``seen`` count every message and every publication read.
    """

    def __init__(self, keep: int | None = None) -> None:
        self.keep = keep or None
        self.records = 0
        self.seen = 0
        self._waiting: dict[int, _Chunks] = {}  # versions whose manifest has not come yet
        self._kept: list[tuple[tuple[int, bool, int], int, dict[str, Any]]] = []  # a min-heap by _rank

    def add(self, offset: int, key: bytes | None, value: bytes | None) -> None:
        """One message of the topic (tombstones and messages that are no publication's are counted, not judged: a
        replica rejects them on their own)."""
        self.records += 1
        header = _header(value)
        version = header.get("version") if header is not None else None
        if not isinstance(version, int) or isinstance(version, bool):
            return
        if key != MANIFEST_KEY:
            self._chunk(version, key, value, header)
            return
        own = self._waiting.pop(version, _Chunks())
        self._keep(_judge(version, offset, header, own, [*(own.messages or []), (key, value)]))

    def newest(self) -> list[dict[str, Any]]:
        """The judgements kept, newest first (by version; a manifest before a version's chunks without one), the
        versions still waiting for a manifest among them (``"offset": None``: a publication cut short or still
        arriving)."""
        for version, own in sorted(self._waiting.items()):
            self._keep(_without_manifest(version, own))
        self._waiting.clear()
        return [entry for _, _, entry in sorted(self._kept, reverse=True)]

    def _chunk(self, version: int, key: bytes | None, value: bytes | None, header: Mapping[str, Any]) -> None:
        own = self._waiting.get(version)
        if own is None:
            buffered = sorted(v for v, c in self._waiting.items() if c.messages is not None)
            if len(buffered) >= BUFFERED_VERSIONS:
                self._waiting[buffered[0]].messages = None
            own = self._waiting[version] = _Chunks()
        if own.messages is not None:
            own.messages.append((key, value))
        if header.get("version") == version and isinstance(header.get("index"), int):
            own.indices.add(header["index"])
        own.counts.add(header.get("count"))

    def _keep(self, entry: dict[str, Any]) -> None:
        self.seen += 1
        item = (_rank(entry), self.seen, entry)
        if self.keep is None or len(self._kept) < self.keep:
            heapq.heappush(self._kept, item)
        elif item[:2] > self._kept[0][:2]:
            heapq.heapreplace(self._kept, item)


def publications(messages: Iterable[tuple[int, bytes | None, bytes | None]],
                 keep: int | None = None) -> list[dict[str, Any]]:
    """The newest ``keep`` publications (all with None) among serving-topic ``messages`` ((offset, key, value), in
    offset order), newest first, each judged alone (:class:`Publications`): ``{"version", "offset" (the
    manifest's), "step", "published_at", "chunks" (announced), "chunks_present", "size_bytes", "complete",
    "problem" (a wire rejection: "missing_chunk: 3 of 4 chunks missing: 0, 1, 2"), "wire_format",
    "payload_format", "serving_format", "tasks"}``. Chunks of a version without a manifest (a publication cut
    short, or one still arriving) are one entry with ``"offset": None``.
    """
    judged = Publications(keep)
    for offset, key, value in messages:
        judged.add(offset, key, value)
    return judged.newest()


def _rank(entry: Mapping[str, Any]) -> tuple[int, bool, int]:
    return entry["version"], entry["offset"] is not None, entry["offset"] or 0


def _judge(version: int, offset: int, header: Mapping[str, Any], own: _Chunks,
           messages: Sequence[tuple[bytes | None, bytes | None]]) -> dict[str, Any]:
    """A manifest's publication, verified with the chunks of its version read before it (``messages``)."""
    if own.messages is None:
        complete, problem = False, (f"evicted: its chunks came before those of {BUFFERED_VERSIONS} newer versions "
                                    "without a manifest between; not verified (a serving replica drops them too)")
    else:
        reassembler = Reassembler(max_payload_bytes=1 << 62, max_message_bytes=MAX_MESSAGE_BYTES)
        outcome = None
        for key, value in messages:
            outcome = reassembler.feed(key, value) or outcome
        complete = isinstance(outcome, WireCheckpoint)
        problem = "; ".join(f"{r.reason}: {r.detail}" for r in reassembler.rejections) or None
    metadata = header.get("metadata") if isinstance(header.get("metadata"), Mapping) else {}
    serving = metadata.get("serving") if isinstance(metadata.get("serving"), Mapping) else {}
    published_ms = metadata.get("published_at_ms")
    return {
        "version": version, "offset": offset, "step": metadata.get("step"),
        "published_at": _utc(published_ms / 1000) if isinstance(published_ms, (int, float)) else None,
        "chunks": header.get("chunks"), "chunks_present": len(own.indices), "size_bytes": header.get("size"),
        "complete": complete, "problem": problem,
        "wire_format": header.get("format"), "payload_format": header.get("payload_format"),
        "serving_format": serving.get("format"), "tasks": metadata.get("tasks"),
    }


def _without_manifest(version: int, own: _Chunks) -> dict[str, Any]:
    counts = {count for count in own.counts if count is not None}
    return {"version": version, "offset": None, "step": None, "published_at": None,
            "chunks": counts.pop() if len(counts) == 1 else None, "chunks_present": len(own.indices),
            "size_bytes": None, "complete": False, "problem": "no manifest: a publication cut short, or still arriving",
            "wire_format": None, "payload_format": None, "serving_format": None, "tasks": None}


def _header(value: bytes | None) -> dict[str, Any] | None:
    import msgpack

    if value is None:
        return None
    try:
        header = msgpack.unpackb(value, raw=False)
    except Exception:  # any malformed value: msgpack raises several exception types
        return None
    return header if isinstance(header, dict) else None


def render_serving(report: Mapping[str, Any]) -> str:
    """The human form of the serving topic's report: one line per publication, newest first."""
    found = report["publications"]
    seen = report.get("publications_seen", len(found))
    shown = f" (the newest {len(found)} below; --newest 0 lists all)" if len(found) < seen else ""
    lines = [f"serving topic {report['topic']} at {report['bootstrap']}: offsets {report['beginning_offset']}.."
             f"{report['end_offset']}, {report['records']} records, {seen} publications{shown}"]
    if not found:
        return "\n".join(lines + ["  no publication yet"])
    rows = [("VERSION", "STEP", "PUBLISHED (UTC)", "CHUNKS", "SIZE", "FORMAT", "STATE")]
    for p in found:
        wire = f"wire {p['wire_format']}, {p['payload_format']}" if p["wire_format"] is not None else "-"
        if p["serving_format"]:
            wire += f", {p['serving_format']}"
        rows.append((str(p["version"]), str(p["step"] if p["step"] is not None else "-"), p["published_at"] or "-",
                     f"{p['chunks_present']}/{p['chunks'] if p['chunks'] is not None else '?'}",
                     _size(p["size_bytes"]) if p["size_bytes"] is not None else "-", wire,
                     "complete" if p["complete"] else p["problem"]))
    return "\n".join(lines + ["  " + line for line in _table(rows)])


# ------------------------------------------------------------------------------------------------ formatting


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _size(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]) for row in rows]

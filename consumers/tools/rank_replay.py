"""Several trainer ranks replaying an event log without a broker: what N ranks learn, and how fast.

Each rank is a process of its own (``torch.multiprocessing``, gloo over loopback) running the trainer's pipeline
(``consumers.runtime.assembly.build_pipeline`` with its ``Ranks``) on the replay clock, over the records it would
own behind Kafka: an event's partition is the one the streamer's Kafka sink gives its key (murmur2, as the Java
client, over ``partitions`` partitions), and rank r owns partitions p with p mod N == r
(``consumers.runtime.ranks.owned_partitions``). The ranks meet every ``chunk`` records of their own, as the
trainer's ranks meet once per poll: they step together (``distributed.mode = "sync"``) or average every
``distributed.average_every_steps`` steps (``"average"``), and at the end flush together. One rank
(``world_size`` 1) is the plain pipeline, with no process group at all. A rank that fails leaves the process group at
once (the others' next collective with it fails instead of waiting out ``distributed.timeout_s``), and
:func:`replay_ranks` raises ``RankReplayError`` naming that rank, with its error and traceback.

Returned: every trained sample's labels and prequential scores in event-time order (the union over the ranks),
the prequential AUC of all of them and of the last 20 %, events/s (all events over the slowest rank's replay
time), steps, and the seconds each rank spent in collectives. ``bench/scaling.py`` and ``docs/scaling.md`` use it.
"""

from __future__ import annotations

import datetime
import json
import math
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from consumers.core.pipeline import EventClock, NoMetrics, decode_record
from consumers.runtime.assembly import build_pipeline
from consumers.runtime.config import Config, config_from_dict
from consumers.runtime.ranks import RankError, RankInfo, Ranks, leave_group, owned_partitions
from models.metrics import auc
from streamer.eventlog import path_from_url, read_event_log

TAIL = 0.2


def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (the streamer keys events by user).

    >>> partition_of("u1", 4) == partition_of("u1", 4) and 0 <= partition_of("u1", 4) < 4
    True
    """
    from kafka.partitioner.default import murmur2  # lazy: the hash only; no Kafka client is started

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def rank_records(url: str, rank: int, world_size: int, partitions: int) -> list[tuple[str, int, bytes]]:
    """(topic, partition, msgpack value) of the event log's records rank ``rank`` owns, in log order."""
    owned = set(owned_partitions(partitions, rank, world_size))
    packer = msgpack.Packer(use_bin_type=True)
    out = []
    for record in read_event_log(path_from_url(url)):
        p = partition_of(str(record.key), partitions)
        if p in owned:
            out.append((record.topic, p, packer.pack(record.event)))
    return out


class _Collected:
    """The pipeline's ``on_batch`` hook: labels, prequential scores and event times of every trained sample."""

    def __init__(self) -> None:
        self.labels: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []

    def __call__(self, samples: list, labels: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray],
                 _fired: Any) -> None:
        self.labels.append(np.stack(list(labels.values()), axis=1))
        self.scores.append(np.stack(list(scores.values()), axis=1))
        self.ts.append(np.array([s.impression["ts_ms"] for s in samples], dtype=np.int64))


def _replay(rank: int, world_size: int, cfg: Config, url: str, partitions: int, chunk: int,
            init_file: str | None) -> dict[str, Any]:
    """One rank's replay (module docstring); its results as plain arrays and figures. ``init_file`` None: no
    process group (one rank, or an ``independent`` share: a model of its own, no collectives).

    The group is left on every way out: together at the end, alone on an error (whose collective with this rank
    then fails on the other ranks instead of waiting ``distributed.timeout_s``), never kept into the interpreter's
    exit, where gloo's threads could abort the process."""
    torch.set_num_threads(1)
    records = rank_records(url, rank, world_size, partitions)
    if world_size == 1 or init_file is None:
        return _replay_share(records, cfg, chunk, None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    try:
        result = _replay_share(records, cfg, chunk, Ranks(RankInfo(rank, world_size), cfg.distributed))
    except BaseException:
        leave_group()
        raise
    leave_group(together=True)
    return result


def _replay_share(records: list[tuple[str, int, bytes]], cfg: Config, chunk: int,
                  ranks: Ranks | None) -> dict[str, Any]:
    """The pipeline over one rank's ``records``, meeting the other ``ranks`` every ``chunk`` of them (None: alone)."""
    collected = _Collected()
    pipeline = build_pipeline(cfg, clock=EventClock(), metrics=NoMetrics(), on_batch=collected, ranks=ranks)
    learner = pipeline.learner
    if ranks is not None:
        learner.broadcast_model()
        ranks.agree([0])  # start the clocks together
    started = time.perf_counter()
    events = 0
    averaging = ranks is not None and cfg.distributed.mode == "average"
    every = cfg.distributed.average_every_steps
    start = 0
    while True:
        for topic, partition, value in records[start:start + chunk]:
            decoded = decode_record(value)
            events += len(decoded)
            pipeline.ingest(decoded, (topic, partition))
            pipeline.train_ready()
        start += chunk
        if ranks is None:
            if start >= len(records):
                break
            continue
        more, average = ranks.agree([start < len(records),
                                     averaging and bool(every) and learner.steps_since_average >= every])
        learner.step_together(pipeline.cut_partial)
        pipeline.collect()
        if average:
            learner.average()
        if not more:
            break
    if averaging:
        learner.average()
    pipeline.flush()
    seconds = time.perf_counter() - started
    return {
        "labels": np.concatenate(collected.labels) if collected.labels else np.zeros((0, len(cfg.model.learnt_tasks))),
        "scores": np.concatenate(collected.scores) if collected.scores else np.zeros((0, len(cfg.model.learnt_tasks))),
        "ts": np.concatenate(collected.ts) if collected.ts else np.zeros(0, dtype=np.int64),
        "events": events, "records": len(records), "seconds": seconds, "steps": int(learner.steps),
        "collective_seconds": float(learner.collective.seconds) if ranks is not None else 0.0,
        "collective_calls": int(learner.collective.calls) if ranks is not None else 0,
    }


class RankReplayError(RuntimeError):
    """A rank of a replay failed: which rank, and its error with the traceback it had in its process."""


def _spawned(rank: int, world_size: int, cfg_dict: dict, url: str, partitions: int, chunk: int, init_file: str | None,
             out_dir: str) -> None:
    try:
        result = _replay(rank, world_size, config_from_dict(cfg_dict), url, partitions, chunk, init_file)
    except BaseException as exc:  # said to the parent (_failure); torch.multiprocessing exits the process non-zero
        report = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                  "collective": isinstance(exc, RankError)}
        (Path(out_dir) / f"rank-{rank}.error.json").write_text(json.dumps(report))
        raise
    np.savez(Path(out_dir) / f"rank-{rank}.npz", **{k: np.asarray(v) for k, v in result.items()})


def _failure(out_dir: str, world_size: int, url: str, exc: Exception) -> RankReplayError:
    """What the parent raises when a rank failed (``exc``: torch.multiprocessing's word for it): the rank whose own
    error it was, not those whose collective with it failed then (``RankError``), with its error and traceback, and
    what the others said."""
    reports = {}
    for rank in range(world_size):
        path = Path(out_dir) / f"rank-{rank}.error.json"
        if path.exists():
            reports[rank] = json.loads(path.read_text())
    index = getattr(exc, "error_index", None)
    own = [rank for rank in sorted(reports) if not reports[rank]["collective"]]
    if own:
        cause = own[0]
    elif index is not None and index not in reports:
        cause = None  # ended without a Python error (a signal: SIGABRT, the OOM killer): exc says how
    else:
        cause = min(reports, default=None)
    others = "; ".join(f"rank {rank}/{world_size}: {reports[rank]['error']}" for rank in sorted(reports)
                       if rank != cause)
    then = f" (then {others})" if others else ""
    if cause is None:
        who = f"rank {index}/{world_size}" if index is not None else "a rank"
        return RankReplayError(f"{who} failed replaying {url}: {exc}{then}")
    return RankReplayError(f"rank {cause}/{world_size} failed replaying {url}: {reports[cause]['error']}{then}"
                           f"\n\nrank {cause}'s traceback:\n{reports[cause]['traceback']}")


def replay_ranks(url: str, cfg: Config, world_size: int, *, partitions: int = 8, chunk: int = 256,
                 independent: bool = False) -> dict[str, Any]:
    """Replay the event log at ``url`` with ``world_size`` ranks (module docstring); the figures and the arrays.

    ``independent``: the same shares in as many processes at once, with no process group and no collectives (N
    separate models): the machine's own ceiling for N ranks, against which their collectives are measured."""
    if world_size > partitions:
        raise ValueError(f"{world_size} ranks need at least {world_size} partitions, got {partitions}")
    if world_size == 1:
        parts = [_replay(0, 1, cfg, url, partitions, chunk, None)]
    else:
        with tempfile.TemporaryDirectory(prefix="rank-replay-") as tmp:
            init = None if independent else str(Path(tmp) / "init")
            default_tempdir, tempfile.tempdir = tempfile.tempdir, tmp  # torch's spawn keeps a failed rank's error file
            try:
                mp.spawn(_spawned, args=(world_size, cfg.to_dict(), url, partitions, chunk, init, tmp),
                         nprocs=world_size, join=True)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                raise _failure(tmp, world_size, url, exc) from None
            finally:
                tempfile.tempdir = default_tempdir
            parts = []
            for rank in range(world_size):
                with np.load(Path(tmp) / f"rank-{rank}.npz") as data:
                    parts.append({k: data[k] if data[k].ndim else data[k].item() for k in data.files})
    return summarize(parts, tuple(cfg.model.learnt_tasks))


def summarize(parts: list[dict[str, Any]], tasks: tuple[str, ...]) -> dict[str, Any]:
    """The union of the ranks' samples in event-time order, its AUCs, and the ranks' speed and collective cost."""
    ts = np.concatenate([p["ts"] for p in parts])
    order = np.argsort(ts, kind="stable")
    labels = np.concatenate([p["labels"] for p in parts])[order]
    scores = np.concatenate([p["scores"] for p in parts])[order]
    tail = int(len(order) * (1 - TAIL))
    seconds = max(float(p["seconds"]) for p in parts)
    events = sum(int(p["events"]) for p in parts)
    steps = max(int(p["steps"]) for p in parts)

    def safe_auc(y: np.ndarray, p: np.ndarray) -> float | None:
        value = auc(y, p) if len(y) else math.nan
        return None if math.isnan(value) else round(float(value), 5)

    return {
        "ranks": len(parts),
        "samples": int(len(order)),
        "events": events,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1) if seconds else None,
        "steps": steps,
        "auc_all": {t: safe_auc(labels[:, k], scores[:, k]) for k, t in enumerate(tasks)},
        "auc_tail": {t: safe_auc(labels[tail:, k], scores[tail:, k]) for k, t in enumerate(tasks)},
        "collective_seconds_per_step": round(max(float(p["collective_seconds"]) for p in parts) / max(steps, 1), 6),
        "collective_share": round(max(float(p["collective_seconds"]) / max(float(p["seconds"]), 1e-9)
                                      for p in parts), 4),
        "per_rank": [{"records": int(p["records"]), "events": int(p["events"]),
                      "seconds": round(float(p["seconds"]), 3), "steps": int(p["steps"])} for p in parts],
    }


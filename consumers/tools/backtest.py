"""``crossdistil backtest``: replay an event log or a Kafka topic range through the trainer's own pipeline.

Every configuration gets a ``consumers.core.pipeline.Pipeline`` (the trainer's join, batching, training and metrics
code) driven by the replay clock, ``EventClock`` (the join's watermark): nothing waits on the wall clock, and
the same input and configuration give the same numbers bit for bit (with ``--torch-threads 1``, the default).
Records are decoded once and fed to every configuration's pipeline in the same order, so configurations are
compared on exactly the same events.

Inputs:

* ``--log file://PATH``: an event log (docs/event-log.md), unpacked once as it is read; every record's event is
  checked by the trainer's validator in place (``LoggedRecord``: what the trainer's decoder gives for the bytes
  a Kafka message would carry, without packing them); its source is ``(topic, 0)``.
* ``--kafka HOST:PORT``: the impressions and feedback topics of the (first) configuration, every partition, in
  ``[--from-offset, --to-offset)`` or ``[--from-time, --to-time)`` (record timestamps; ISO 8601 or unix ms).
  The partitions are merged by event time (each partition keeps its order) so the replay does not depend on
  fetch timing, and read as they are replayed, at most ``read_ahead`` records per partition at a time
  (``KafkaRange``).

A range that selects nothing (``from >= to``, or no record inside it) is an error (exit status 2), not an empty
report.

A configuration that fails part-way (its step raises, its loss is not finite, it runs out of memory, its learner
process dies) is dropped from the replay there, and one that cannot be built (reason ``build``) before it; the
others go on to the end (``consumers.tools.failures.Failures``). Its failure is in
``summary.json`` (``failed``), the report and on stderr, and the command exits with ``EXIT_FAILED`` (4), or
``EXIT_ALL_FAILED`` (5) when every configuration failed (the replay stops then). A failure of the shared input (the
log, the intake process, the broker) still stops everything.

Outputs (``--out DIR``): ``summary.json`` and ``series_<config>.csv`` (deterministic: no wall-clock field),
``timing.json`` (wall-clock seconds and throughput, not deterministic), ``auc_<task>.png`` and ``report.md``.
See docs/backtest.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import difflib
import heapq
import io
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consumers.core.join import describe_unknown_tasks
from consumers.runtime.config import Config, ConfigError, load_config
from consumers.runtime.paths import check_output_folder
from consumers.runtime.timeparse import parse_time
from consumers.state.wire import stable_hash
from streamer.eventlog import DamagedRecords, EventLogError
from streamer.events import EventError, decode_events
from streamer.kafka_settings import add_client_arguments, client_options_from_args

# The pipeline, the intake, the comparison, the failures and the features load numpy, and the Kafka preflight
# kafka-python: the functions that use them import them ("# lazy: numpy"), so that building the parser
# (crossdistil backtest --help) loads neither.
if TYPE_CHECKING:
    import numpy as np

    from consumers.core.pipeline import Pipeline, UserCodes
    from consumers.tools.failures import Failures
    from consumers.tools.intake import IntakeGroup, LoggedRecord, LogRecords, ReplayCache

SUMMARY_FORMAT = 1
LAST_FRACTION = 0.2  # "prequential AUC over the last 20% of the stream", as the trainer's acceptance reports it
BATCHING_MODES = ("event-time", "dense")
DENSE_TRAIN_EVERY = 256  # dense batching: records ingested between two train_ready calls (same batches)
INTAKE_MODES = ("auto", "process", "inline")
DETECTION_STYLES = {"adwin": "--", "page_hinkley": ":", "auc_drop": "-"}  # line style of each detector's marks
PLOT_MARKERS = ("o", "s", "^", "D", "v", "x")  # one per configuration's line
SMALL_BATCH_SHARE = 0.25  # the report warns when the mean batch is below this share of batching.batch_size
# Exit statuses: 0 done; 1 the intake process or the replay cache failed, or the outputs could not be written; 2 a
# usage, configuration or input error (a bad range, a damaged log); 3 Kafka not reachable; and these two:
EXIT_FAILED = 4  # some configuration failed part-way (or could not be built) and was dropped; the others' are written
EXIT_ALL_FAILED = 5  # every configuration failed: no result (the outputs say why)


# ------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil backtest``."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", metavar="file://PATH",
                        help="an event log written by 'crossdistil stream --to file://PATH'")
    source.add_argument("--kafka", metavar="HOST:PORT",
                        help="replay the impressions and feedback topics of this broker")
    parser.add_argument("--from-offset", type=int, default=None, help="--kafka: first offset of every partition")
    parser.add_argument("--to-offset", type=int, default=None,
                        help="--kafka: end offset (exclusive) of every partition")
    parser.add_argument("--from-time", default=None, metavar="ISO|MS",
                        help="first record time (--kafka: record timestamp; --log: event ts_ms), ISO 8601 or unix ms")
    parser.add_argument("--to-time", default=None, metavar="ISO|MS",
                        help="end record time (exclusive), ISO 8601 or unix ms")
    parser.add_argument("--config", dest="configs_files", action="append", default=[], metavar="FILE",
                        help="a trainer configuration (TOML); repeat to compare several side by side")
    parser.add_argument("--configs", dest="rungs", default=None, metavar="RUNG[,RUNG...]",
                        help="shorthand: one configuration per rung (model.options.rung) on the one --config, e.g. "
                             "mtl,crossdistil; RUNG@PRESET adds a named option set of models.config.PRESETS, e.g. "
                             "crossdistil@paper")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a configuration value in every configuration (repeatable)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created; this backtest's files in it are replaced, and the series_*.csv, "
                             "traceback_*.txt and auc_*.png an earlier one left there removed)")
    parser.add_argument("--batching", choices=BATCHING_MODES, default="event-time",
                        help="event-time (default): max_batch_delay_s runs on the log's event time, so the batches "
                             "are those a live trainer makes when the events arrive at the log's own rate; dense: "
                             "batches of batching.batch_size only (max_batch_delay_s not used), replayed as fast as "
                             "the machine trains. The attribution windows run on event time in both")
    parser.add_argument("--intake", choices=INTAKE_MODES, default="auto",
                        help="where a dense replay of an event log reads, validates, joins and encodes: process (a "
                             "child process, on a core of its own, while this one trains: same numbers, ~2x faster "
                             "on two free cores) or inline (this process). auto (default): process when it applies "
                             "(dense batching, --log, every configuration trained in this process), else inline")
    parser.add_argument("--replay-cache", default=None, metavar="DIR",
                        help="keep what the intake process reads, validates, joins and encodes in DIR (a file per "
                             "log, range, join, batching and feature sets, ~40%% of the log's size), and read it "
                             "instead on a later replay of the same: the same numbers, no intake work (safe to "
                             "delete; a changed log or code is a new entry)")
    parser.add_argument("--replay-cache-limit", type=_size_arg, default=None, metavar="SIZE",
                        help="the most the --replay-cache folder keeps, e.g. 500M, 20G (default 20G): after a replay, "
                             "the least recently used entries are removed until the rest fit, and an entry larger than "
                             "this by itself is not kept")
    parser.add_argument("--sample-every", type=int, default=None, metavar="N",
                        help="one time-series point every N trained samples (default: a quarter of the configuration's "
                             "smallest metrics window, e.g. 2500 for windows [10000, 100000]; a point costs an exact "
                             "AUC of every window)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="replay only the first N records")
    parser.add_argument("--skip-damaged", action="store_true",
                        help="--log: skip the log's damaged records (not {topic, key, event}, a string that is not "
                             "UTF-8, a last record cut short) instead of stopping at the first; they are counted "
                             "in summary.json (skipped_records), the report's warnings and on stderr. Bytes that are "
                             "not msgpack still stop the replay")
    parser.add_argument("--torch-threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads (default 1: bit-for-bit reproducible, and fastest on a busy "
                             "machine)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_client_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil backtest``; returns the exit status."""
    # lazy: torch and numpy, which building the parser does not need
    import torch

    from consumers.tools.intake import IntakeError

    torch.set_num_threads(max(1, args.torch_threads))
    out = Path(args.out)
    try:
        check_output_folder(out, "--out")
        configs = build_configs(args.configs_files, args.rungs, args.overrides)
        input_desc: dict[str, Any]
        cfg0 = next(iter(configs.values()))  # the topics a trainer reads
        if args.log:
            if args.from_offset is not None or args.to_offset is not None:
                raise ValueError("--from-offset/--to-offset apply to --kafka; an event log has no offsets (use "
                                 "--limit)")
            records, input_desc = log_records(args.log, parse_time(args.from_time), parse_time(args.to_time),
                                              args.limit, topics=[cfg0.kafka.impressions_topic,
                                                                  cfg0.kafka.feedback_topic],
                                              skip_damaged=args.skip_damaged)
        else:
            if args.skip_damaged:
                raise ValueError("--skip-damaged applies to an event log (--log): a Kafka record that is not a valid "
                                 "message is a dead letter already, as in the trainer")
            records, input_desc = kafka_records(
                args.kafka, [cfg0.kafka.impressions_topic, cfg0.kafka.feedback_topic],
                from_offset=args.from_offset, to_offset=args.to_offset,
                from_ms=parse_time(args.from_time), to_ms=parse_time(args.to_time), limit=args.limit,
                client_options=client_options_from_args(args))
        # a log's progress is its bytes, all read; with --limit the replay stops after that many records
        total, unit = ((args.limit, "records") if args.log and args.limit is not None
                       else (input_desc.get("records") or input_desc.get("bytes"),
                             "records" if "records" in input_desc else "bytes"))
        result = run_backtest(records, configs, batching=args.batching, sample_every=args.sample_every,
                              progress=not args.quiet, intake=args.intake, replay_cache=args.replay_cache,
                              replay_cache_limit=args.replay_cache_limit, total=total, progress_unit=unit,
                              on_failure=_say_failed)
    except (ConfigError, EventLogError, ValueError) as exc:  # SecurityError is a ValueError too
        print(f"crossdistil backtest: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(f"crossdistil backtest: {exc}", file=sys.stderr)
        return 3
    except IntakeError as exc:  # the intake process died or failed, or a replay cache entry is damaged
        print(f"crossdistil backtest: {exc}", file=sys.stderr)
        return 1
    built_none = result.failed and not result.runs and result.records == 0  # every configuration failed to build
    if result.records == 0 and not built_none:
        ranged = any(v is not None for v in (args.from_time, args.to_time, args.from_offset, args.to_offset))
        damaged = DamagedRecords.from_dict(result.damaged) if result.damaged else None
        print(f"crossdistil backtest: nothing to replay: {args.log or args.kafka} has no records"
              f"{' in the range given (check --from-time/--to-time/--from-offset/--to-offset)' if ranged else ''}"
              f"{f' that are not damaged ({damaged.describe()})' if damaged else ''}; no outputs written",
              file=sys.stderr)
        return 2
    try:
        _, data = write_outputs(result, out, input_desc, plots=not args.no_plots, command=command_line())
    except OSError as exc:  # checked before the replay, so something changed meanwhile (or the disk is full)
        print(f"crossdistil backtest: the replay ran but its outputs could not be written to {out}: {exc}",
              file=sys.stderr)
        return 1
    _say_what_was_done(result, args, out, len(configs), data)
    if result.failed and not result.runs:
        stopped = ("no configuration could be built, so nothing was replayed" if built_none else
                   f"the replay stopped after {result.records:,} records")
        print(f"crossdistil backtest: every configuration failed ({', '.join(result.failed)}): there is no result; "
              f"{stopped}. {out}/report.md and summary.json's 'failed' say where and why", file=sys.stderr)
        return EXIT_ALL_FAILED
    if result.failed:
        print(f"crossdistil backtest: {len(result.failed)} of {len(configs)} configurations failed and were dropped "
              f"({', '.join(result.failed)}); the others' results are complete (exit status {EXIT_FAILED})",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


def _say_failed(name: str, failure: dict[str, Any]) -> None:
    """The line a configuration's failure gets on stderr when it happens (``run_backtest``'s ``on_failure``)."""
    # lazy: numpy
    from consumers.tools.failures import describe_failure

    print(f"crossdistil backtest: configuration {name!r} failed: {describe_failure(failure)}; dropped from the "
          "replay, the others go on", file=sys.stderr)


def _say_what_was_done(result: BacktestResult, args: argparse.Namespace, out: Path, n_configs: int,
                       data: dict[str, Any]) -> None:
    """A replay's lines after its outputs: per configuration its figures and, with several, each one's verdict
    against the first on stdout; the summary's (``data``) warnings, the first dead letters, the replay cache's hint
    and upkeep on stderr."""
    # lazy: numpy
    from consumers.tools.failures import describe_failure
    from consumers.tools.intake import format_size

    print(f"crossdistil backtest: {result.records} records, {n_configs} configuration(s), {result.batching} "
          f"batching -> {out}/report.md")
    for name, run_ in result.runs.items():
        aucs = ", ".join(f"{t} {_fmt(v)}" for t, v in run_.prequential_auc().items())
        combined = run_.ranking_metrics()["combined"]
        stats = batch_statistics(run_.batch_sizes)
        gate = run_.pipeline.metrics.kd_gate_summary()
        distilled = "; steps distilling " + ", ".join(
            f"{t} {g['distilled_steps']}/{g['distilled_steps'] + g['skipped_steps']}" for t, g in gate.items()
        ) if gate else ""
        print(f"  {name}: {run_.pipeline.trained_samples} samples in {stats['batches']} batches (mean "
              f"{stats['mean']}), prequential AUC {aucs}; combined AUC {_fmt(combined['auc'])}, NDCG@10 "
              f"{_fmt(combined['ndcg10'])}{distilled}")
    for name, run_ in result.failed.items():
        print(f"  {name}: FAILED: {describe_failure(run_.failure)}")
    comparison = data.get("comparison")
    for name, entry in (comparison or {}).get("configurations", {}).items():  # the report's verdict lines
        print(f"  {name} vs {comparison['baseline']} (paired, 95% interval, Holm-adjusted): {entry['summary']}")
    for warning in data["warnings"]:
        print(f"crossdistil backtest: warning: {warning}", file=sys.stderr)
    for example in result.dead_letter_examples[:3]:
        print(f"crossdistil backtest:   dead letter: {example}", file=sys.stderr)
    hint = replay_cache_hint(result, args.replay_cache)
    if hint and not args.quiet:
        print(f"crossdistil backtest: hint: {hint}", file=sys.stderr)
    cache = result.processes.get("replay_cache", {})
    if cache.get("error"):
        print(f"crossdistil backtest: warning: replay cache {cache['file']} {cache['error']} (the replay itself is "
              "complete)", file=sys.stderr)
    if cache.get("evicted") and not args.quiet:
        evicted = cache["evicted"]
        print(f"crossdistil backtest: replay cache: removed {evicted['files']} least recently used file(s) "
              f"({format_size(evicted['bytes'])}) to keep {Path(cache['file']).parent} within "
              f"{format_size(cache['limit_bytes'])} (--replay-cache-limit)", file=sys.stderr)


def _size_arg(text: str) -> int:
    """argparse's type for a size: ``parse_size``, its error said as argparse says a bad value."""
    # lazy: numpy
    from consumers.tools.intake import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# ------------------------------------------------------------------------------------------ configuration


def build_configs(files: Sequence[str], rungs: str | None, overrides: Sequence[str]) -> dict[str, Config]:
    """Named configurations: one per ``--config`` file (named by its stem), or one per rung on one base file."""
    from models.config import split_config_name  # lazy: the CLI starts without torch

    if rungs:
        if len(files) > 1:
            raise ValueError("--configs RUNG,... applies rung overrides to one base configuration; pass at most one "
                             "--config")
        base = load_config(files[0] if files else None, overrides=overrides)
        out: dict[str, Config] = {}
        for name in [r.strip() for r in rungs.split(",") if r.strip()]:
            rung, preset = split_config_name(name)  # "crossdistil@paper": the rung with a preset's options
            check_rung(rung, name)
            cfg = copy.deepcopy(base)
            cfg.model.options = {**cfg.model.options, **preset, "rung": rung}
            out[name] = cfg
        if not out:
            raise ValueError("--configs is empty: name at least one rung, e.g. --configs mtl,crossdistil")
        return out
    if not files:
        return {"default": load_config(None, overrides=overrides)}
    out = {}
    for path in files:
        name = Path(path).stem
        while name in out:
            name += "'"
        out[name] = load_config(path, overrides=overrides)
    return out


def check_rung(rung: str, name: str) -> None:
    """A ``ValueError`` for a ``--configs`` entry ``name`` whose rung is none a learner is made of, naming the
    closest valid one and every valid form."""
    # lazy: the models (torch) load only when a replay runs
    from models.config import PRESETS, RUNGS
    from models.river_baseline import RIVER_CONFIGS
    from models.vw_baseline import VW_CONFIGS

    valid = [*RUNGS, *RIVER_CONFIGS, *VW_CONFIGS]
    if rung in valid:
        return
    close = difflib.get_close_matches(rung, valid, n=1)
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    where = f" in {name!r}" if name != rung else ""
    raise ValueError(f"--configs: unknown rung {rung!r}{where}{guess}. Valid: the ablation ladder's rungs "
                     f"{', '.join(RUNGS)}; the river baselines {', '.join(RIVER_CONFIGS)}; the Vowpal Wabbit peers "
                     f"{', '.join(VW_CONFIGS)}; and RUNG@PRESET, a rung with a preset's options ({', '.join(PRESETS)}; "
                     "e.g. crossdistil@paper)")


# ----------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Record:
    """One message to replay: its source (topic, partition), the value bytes a Kafka message would carry and, from
    a Kafka range, the record's timestamp (ms; CreateTime or LogAppendTime, as the topic keeps it)."""

    topic: str
    partition: int
    value: bytes | None
    timestamp_ms: int | None = None

    @property
    def size(self) -> int:
        """Bytes of the message (its value and about the framing of a record), for the progress bar."""
        return len(self.value or b"") + 24

    def events(self, max_future_s: float = 0.0) -> list[dict | EventError]:
        """The value decoded and validated by the trainer's decoder (``consumers.core.pipeline.decode_record``);
        with ``max_future_s`` (``join.max_future_s``) an event stamped more than that after the record's timestamp is
        bad (reason ``future``), as the live trainer finds it when it reads the record at that time
        (``future_bound_ms``)."""
        return decode_events(self.value if self.value is not None else b"",
                             not_after_ms=not_after_ms(self.timestamp_ms, max_future_s))


def not_after_ms(timestamp_ms: int | None, max_future_s: float) -> int | None:
    """The latest event time a live trainer accepts when it reads a record stamped ``timestamp_ms`` at that very time
    (``consumers.core.pipeline.future_bound_ms`` at the record's time, in whole milliseconds); None (no bound) for a
    record without a timestamp (-1: a message format before timestamps) or ``max_future_s`` 0.

    >>> not_after_ms(1_700_000_000_123, 3600), not_after_ms(1_700_000_000_123, 0), not_after_ms(-1, 3600)
    (1700003600123, None, None)
    """
    if timestamp_ms is None or timestamp_ms < 0 or not max_future_s > 0:
        return None
    return timestamp_ms + round(max_future_s * 1000)


READ_AHEAD = 2000  # records polled at a time per partition (and so at most held per partition)
STALL_S = 120.0  # a partition that yields nothing for this long while its range is unfinished is an error


def log_records(url: str, from_ms: int | None = None, to_ms: int | None = None, limit: int | None = None,
                topics: Sequence[str] | None = None, skip_damaged: bool = False) -> tuple[LogRecords, dict[str, Any]]:
    """The records of an event log: ``consumers.tools.intake.log_records``, here beside ``kafka_records``."""
    # lazy: numpy
    from consumers.tools import intake

    return intake.log_records(url, from_ms, to_ms, limit, topics, skip_damaged)


def kafka_records(bootstrap: str, topics: Sequence[str], *, from_offset: int | None = None,
                  to_offset: int | None = None, from_ms: int | None = None, to_ms: int | None = None,
                  limit: int | None = None, read_ahead: int = READ_AHEAD,
                  client_options: dict[str, Any] | None = None,
                  max_future_s: float | None = None) -> tuple[KafkaRange, dict[str, Any]]:
    """Every partition of ``topics`` in an offset or time range, merged by event time (partitions keep their order).

    The range is resolved now (per partition ``[start, stop)`` offsets; a time bound becomes the first offset whose
    record timestamp is at or after it, via ``offsets_for_times``); the records are read when the result is
    iterated, streaming (see ``KafkaRange``). ``client_options``: extra kafka-python settings (security).
    ``max_future_s``: the merge leaves out of its clock the events stamped that far after their record
    (``KafkaRange.read``; None: ``run_backtest`` merges for each configuration with its ``join.max_future_s``). Raises
    ``ValueError`` for a bad or empty range, ``ConnectionError`` when the broker is not reachable.
    """
    # lazy: numpy
    from kafka import TopicPartition

    from consumers.tools.intake import check_time_range

    if (from_offset is not None or to_offset is not None) and (from_ms is not None or to_ms is not None):
        raise ValueError("give an offset range (--from-offset/--to-offset) or a time range (--from-time/--to-time), "
                         "not both")
    if from_offset is not None and to_offset is not None and from_offset >= to_offset:
        raise ValueError(f"--from-offset {from_offset} is not before --to-offset {to_offset}: the range is empty")
    check_time_range(from_ms, to_ms)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of records, got {limit}")
    client_options = dict(client_options or {})
    consumer = _range_consumer(bootstrap, **client_options)
    try:
        partitions = []
        for topic in topics:
            ids = consumer.partitions_for_topic(topic)
            if not ids:
                raise ValueError(f"topic {topic!r} does not exist on {bootstrap}")
            partitions += [TopicPartition(topic, p) for p in sorted(ids)]
        begin = consumer.beginning_offsets(partitions)
        end = consumer.end_offsets(partitions)
        ranges: dict[Any, tuple[int, int]] = {}
        found_from = consumer.offsets_for_times({tp: from_ms for tp in partitions}) if from_ms is not None else {}
        found_to = consumer.offsets_for_times({tp: to_ms for tp in partitions}) if to_ms is not None else {}
        for tp in partitions:
            start = max(begin[tp], from_offset if from_offset is not None else begin[tp])
            stop = min(end[tp], to_offset if to_offset is not None else end[tp])
            if from_ms is not None:  # no record at or after from_ms: nothing of this partition is in range
                start = found_from[tp].offset if found_from.get(tp) is not None else end[tp]
            if to_ms is not None:
                stop = found_to[tp].offset if found_to.get(tp) is not None else end[tp]
            ranges[tp] = (start, max(start, stop))
    finally:
        consumer.close()
    count = sum(stop - start for start, stop in ranges.values())
    held = {f"{tp.topic}-{tp.partition}": [begin[tp], end[tp]] for tp in partitions}
    if count == 0:
        raise ValueError(f"the range selects no records of {', '.join(topics)} on {bootstrap} "
                         f"(partitions hold offsets {held}); widen --from/--to")
    desc = {"kind": "kafka", "topics": list(topics), "from_offset": from_offset, "to_offset": to_offset,
            "from_ms": from_ms, "to_ms": to_ms, "limit": limit, "records": min(count, limit or count),
            "ranges": {f"{tp.topic}-{tp.partition}": list(r) for tp, r in ranges.items()}}
    return KafkaRange(bootstrap, ranges, limit=limit, read_ahead=read_ahead, client_options=client_options,
                      max_future_s=max_future_s), desc


def _range_consumer(bootstrap: str, **options: Any) -> Any:
    """A group-less, non-committing consumer that creates no topic (a backtest reads; it never moves a group's
    offsets, nor makes a topic it was given by mistake)."""
    # lazy: kafka-python
    from kafka import KafkaConsumer
    from kafka.errors import KafkaError

    from streamer.kafka_security import connection_failure, preflight
    from streamer.topics import honour_auto_create  # lazy: kafka-python, only for a topic range

    options = {"reconnect_backoff_max_ms": 2000, "bootstrap_timeout_ms": 10_000, **options}
    try:
        preflight(bootstrap, options)  # a wrong listener or a refused SASL login at once (kafka-python: 10 s)
        return honour_auto_create(KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                                                allow_auto_create_topics=False, **options))
    except KafkaError as exc:
        raise ConnectionError(connection_failure(bootstrap, options, exc)) from None


class KafkaRange:
    """The records of per-partition offset ranges, merged by event time, read as they are replayed.

    Each partition is a stream in offset order whose merge key is (running max of its events' ``ts_ms``, topic,
    partition, offset); ``heapq.merge`` takes the smallest head, so the order depends only on the records, never
    on fetch timing. Each partition has its own consumer, polled (at most ``read_ahead`` records) only when the
    merge has taken everything polled before, so at most ``read_ahead`` records per partition are held (plus the
    client's fetch buffer, one ``max_partition_fetch_bytes``), whatever the length of the range.
    ``peak_buffered`` is the most records held at once during the last iteration. Iterating again reads the
    range again. Each ``Record`` carries its Kafka timestamp (``Record.events`` bounds its events' time by it).

    ``max_future_s`` (``join.max_future_s``; None or 0: no bound): an event stamped more than that after its record's
    timestamp is one the live trainer dead-letters (``future``), so it does not move its partition's merge clock
    either: one producer's clock far ahead would otherwise hold the rest of its partition back until every other
    partition is done. ``read(max_future_s)`` iterates with another bound.
    """

    def __init__(self, bootstrap: str, ranges: dict[Any, tuple[int, int]], *, limit: int | None = None,
                 read_ahead: int = READ_AHEAD, client_options: dict[str, Any] | None = None,
                 max_future_s: float | None = None) -> None:
        if read_ahead < 1:
            raise ValueError(f"read_ahead must be positive, got {read_ahead}")
        self.bootstrap, self.ranges, self.limit, self.read_ahead = bootstrap, dict(ranges), limit, read_ahead
        self.client_options = dict(client_options or {})
        self.max_future_s = max_future_s
        self.peak_buffered = 0
        self._held: dict[Any, int] = {}

    def __iter__(self) -> Iterator[Record]:
        return self.read(self.max_future_s)

    def read(self, max_future_s: float | None) -> Iterator[Record]:
        """The records, merged with ``max_future_s`` as the bound of the merge clock (see the class)."""
        self.peak_buffered = 0
        self._held = {}
        wanted = [(tp, start, stop) for tp, (start, stop) in self.ranges.items() if start < stop]
        partitions = [self._messages(tp, start, stop) for tp, start, stop in wanted]
        try:
            streams = [_ordered(tp.topic, tp.partition, messages, max_future_s)
                       for (tp, _, _), messages in zip(wanted, partitions)]
            for item in itertools.islice(heapq.merge(*streams), self.limit):
                yield item[-1]
        finally:
            for messages in partitions:  # closes their consumers now, not when garbage collected
                messages.close()

    def _messages(self, tp: Any, start: int, stop: int) -> Iterator[Any]:
        """The messages of ``tp`` in ``[start, stop)``, in offset order, ``read_ahead`` at a time."""
        from kafka.errors import KafkaError

        consumer = _range_consumer(self.bootstrap, max_poll_records=self.read_ahead, **self.client_options)
        try:
            consumer.assign([tp])
            consumer.seek(tp, start)
            deadline = time.monotonic() + STALL_S
            while consumer.position(tp) < stop:
                try:
                    batch = [m for m in consumer.poll(timeout_ms=500).get(tp, []) if m.offset < stop]
                except KafkaError as exc:
                    raise ConnectionError(f"reading {tp.topic}-{tp.partition} from Kafka at "
                                          f"{self.bootstrap} failed: {exc}") from None
                if batch:
                    deadline = time.monotonic() + STALL_S
                elif time.monotonic() > deadline:
                    raise ConnectionError(f"reading {tp.topic}-{tp.partition} from {self.bootstrap} stalled at offset "
                                          f"{consumer.position(tp)} (its range ends at {stop}) for {STALL_S:.0f} s")
                self._held[tp] = len(batch)
                self.peak_buffered = max(self.peak_buffered, sum(self._held.values()))
                for i, message in enumerate(batch):
                    self._held[tp] = len(batch) - i
                    yield message
                self._held[tp] = 0
        finally:
            consumer.close()


def _ordered(topic: str, partition: int, messages: Iterable[Any], max_future_s: float | None = None
             ) -> Iterator[tuple]:
    """Merge keys of one partition: (running max of event ts, topic, partition, offset, Record). An event stamped
    more than ``max_future_s`` after its record's timestamp (a dead letter, ``future``) does not move the clock."""
    import msgpack

    clock = -math.inf
    for message in messages:
        timestamp = getattr(message, "timestamp", None)
        timestamp = timestamp if isinstance(timestamp, int) and timestamp >= 0 else None
        try:
            obj = msgpack.unpackb(message.value, raw=False) if message.value is not None else None
            events = obj.get("batch", [obj]) if isinstance(obj, dict) else []
            stamps = [e["ts_ms"] for e in events if isinstance(e, dict) and isinstance(e.get("ts_ms"), int)]
            bound = not_after_ms(timestamp, max_future_s or 0.0)
            if bound is not None:
                stamps = [stamp for stamp in stamps if stamp <= bound]
            if stamps:
                clock = max(clock, min(stamps))
        except Exception:  # a bad message keeps its partition's clock; the pipeline dead-letters it
            pass
        yield (clock, topic, partition, message.offset, Record(topic, partition, message.value, timestamp))


# ------------------------------------------------------------------------------------------------ replay


def _user_codes() -> UserCodes:
    """A new ``consumers.core.pipeline.UserCodes`` (``ConfigRun.coder``)."""
    # lazy: numpy
    from consumers.core.pipeline import UserCodes

    return UserCodes()


@dataclass
class ConfigRun:
    """One configuration's pipeline and what the replay recorded from it."""

    name: str
    cfg: Config
    pipeline: Pipeline  # None for a configuration whose build failed (``failure["reason"]`` is "build")
    sample_every: int
    series: list[dict[str, Any]] = field(default_factory=list)
    detections: list[dict[str, Any]] = field(default_factory=list)
    impression_ids: list[str] = field(default_factory=list)
    event_ts_ms: list[int] = field(default_factory=list)
    labels: dict[str, list] = field(default_factory=dict)
    scores: dict[str, list] = field(default_factory=dict)
    user_codes: list = field(default_factory=list)  # per batch, int32 codes of the users (``UserCodes``)
    coder: UserCodes = field(default_factory=_user_codes)  # where the batches do not come coded (an intake's do)
    batch_sizes: list[int] = field(default_factory=list)  # of every trained batch, in order
    seconds: float = 0.0
    leader: str | None = None  # the configuration whose join and batcher cut this one's batches (run_backtest)
    # a group's first configuration: the group's stream (its join and batcher, which train nothing themselves: every
    # batch goes to each configuration of the group through its ``Forwarding``); None for the others
    stream: Pipeline | None = None
    failure: dict[str, Any] | None = None  # why and where it failed (``failure_of``); None while it trains
    failure_traceback: str | None = None
    _next_point: int = 0

    def on_batch(self, samples: list, labels: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                 fired: list[tuple[str, str]]) -> None:
        """Pipeline hook: keep the prequential predictions, detections and, every N samples, a series point."""
        # lazy: numpy
        from consumers.core.pipeline import SampleColumns, sample_columns

        ids, users, ts_ms = sample_columns(samples)
        self.batch_sizes.append(len(samples))
        self.impression_ids += ids
        # Users as small integer codes (for per-user NDCG); an intake process codes them the same way.
        coded = samples.user_codes if isinstance(samples, SampleColumns) else None
        self.user_codes.append(coded if coded is not None else self.coder(users))
        self.event_ts_ms += ts_ms
        for task in labels:
            self.labels.setdefault(task, []).append(labels[task])
            self.scores.setdefault(task, []).append(scores[task])
        trained = self.pipeline.trained_samples
        event_ms = self.event_ts_ms[-1]
        for task, detector in fired:
            self.detections.append({"task": task, "detector": detector, "samples": trained, "event_time_ms": event_ms})
        if trained >= self._next_point:
            self.add_point(event_ms)

    def drop(self) -> None:
        """After a failure: stop its learner (a learner process) and let go of the model and the predictions (an
        out-of-memory failure frees what it held); the counts its failure names stay."""
        # lazy: numpy
        from consumers.tools.failures import Dropped

        if self.pipeline is not None:  # None: it was never built
            with contextlib.suppress(Exception):  # a learner process that died already
                self.pipeline.close()
            self.pipeline.learner = Dropped(len(self.batch_sizes))
        self.labels, self.scores, self.user_codes = {}, {}, []
        self.impression_ids, self.event_ts_ms = [], []

    def add_point(self, event_ms: int) -> None:
        """A time-series point from the metrics' snapshot (the same numbers /metrics would show)."""
        trained = self.pipeline.trained_samples
        # the series shows AUC and log loss (and the AUC's drift): the other metrics' window sums are not read
        snapshot = self.pipeline.metrics.snapshot(gauc=False, metrics=("auc", "log_loss"))
        for task in self.pipeline.scored_tasks:
            student = snapshot.get(task, {}).get("student", {})
            row: dict[str, Any] = {"samples": trained, "event_time_ms": event_ms, "task": task,
                                   "steps": self.pipeline.learner.steps}
            for window in [str(w) for w in self.pipeline.metrics.windows] + ["lifetime"]:
                row[f"auc@{window}"] = student.get("auc", {}).get(window)
                row[f"log_loss@{window}"] = student.get("log_loss", {}).get(window)
            for key, value in sorted(student.get("auc_drift", {}).items()):
                row[f"auc_drift@{key}"] = value
            watched = snapshot.get(task, {}).get("drift_detections")  # None: not one of metrics.drift_tasks
            row["detections"] = sum(watched.values()) if watched is not None else None
            self.series.append(row)
        self._next_point = (trained // self.sample_every + 1) * self.sample_every

    def arrays(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """All prequential (labels, predictions) of ``task``, in training order."""
        import numpy as np

        if not self.labels.get(task):
            return np.zeros(0, np.int8), np.zeros(0, np.float32)
        return np.concatenate(self.labels[task]), np.concatenate(self.scores[task])

    def users(self) -> np.ndarray:
        """The user (as an integer code) of every prequential prediction, in training order."""
        import numpy as np

        return np.concatenate(self.user_codes) if self.user_codes else np.zeros(0, np.int32)

    def ranking_metrics(self, last_fraction: float | None = None) -> dict[str, Any]:
        """Per-user NDCG@10 per served task (relevance 2 y + y_partner, the partner being the next served task
        cyclically) and the served tasks' combined score: its AUC and NDCG@10 (``models.evaluation.combined_metrics``,
        weights 1), over every prequential prediction (or the last ``last_fraction`` of them); ``None`` where
        undefined."""
        import numpy as np

        from models.evaluation import combined_metrics, default_partners  # lazy: the CLI starts without torch
        from models.metrics import graded_relevance, ndcg_at_k

        tasks = self.cfg.model.served_tasks  # auxiliary tasks are not ranked by: out of the combined score
        columns = [self.arrays(task) for task in tasks]
        labels = np.stack([y for y, _ in columns], axis=1) if columns else np.zeros((0, 0))
        scores = {task: p for task, (_, p) in zip(tasks, columns)}
        users = self.users()
        if last_fraction is not None:
            start = int(len(users) * (1 - last_fraction))
            labels, users, scores = labels[start:], users[start:], {t: p[start:] for t, p in scores.items()}
        if len(users) == 0:
            return {"ndcg10": {task: None for task in tasks}, "combined": {"auc": None, "ndcg10": None,
                                                                           "weights": [1.0] * len(tasks)}}
        partners = default_partners(tasks)
        ndcg = {}
        for k, task in enumerate(tasks):
            y_partner = labels[:, tasks.index(partners[task])] if task in partners else None
            ndcg[task] = _finite(ndcg_at_k(graded_relevance(labels[:, k], y_partner), scores[task], users, k=10))
        combined = combined_metrics(labels, scores, users, tasks)
        return {"ndcg10": ndcg,
                "combined": {"auc": _finite(combined["auc"]), "ndcg10": _finite(combined["ndcg10"]),
                             "weights": combined["weights"]}}

    def prequential_auc(self, last_fraction: float | None = None) -> dict[str, float | None]:
        """Exact AUC of every prequential prediction per task (or of the last ``last_fraction`` of them)."""
        from models.metrics import auc  # lazy: numpy loads only when a replay runs

        out: dict[str, float | None] = {}
        for task in self.pipeline.scored_tasks:
            y, p = self.arrays(task)
            if last_fraction is not None:
                start = int(len(y) * (1 - last_fraction))
                y, p = y[start:], p[start:]
            value = auc(y, p) if len(y) else math.nan
            out[task] = None if math.isnan(value) else float(value)
        return out


@dataclass
class BacktestResult:
    """Every configuration's run on the same records."""

    runs: dict[str, ConfigRun]
    records: int
    events: int
    seconds: float
    batching: str = "event-time"
    # where the input was read, joined and encoded: "inline" (here), "process" (an intake process) or "cache" (a
    # replay cache's copy of an intake process's output, run_backtest's replay_cache)
    intake: str = "inline"
    # an intake replay's processes: learner processes it started (configurations trained in one), the intake
    # process's CPU seconds (for timing.json: what the input cost, now that it is not on the replay's clock) and the
    # replay cache's file, whether it was read (hit) and its size
    processes: dict[str, Any] = field(default_factory=dict)
    # the first bad events (``consumers.tools.intake.add_dead_letter_examples``), described
    dead_letter_examples: list[str] = field(default_factory=list)
    # the configurations that failed part-way and were dropped (``ConfigRun.failure`` says why), not in ``runs``
    failed: dict[str, ConfigRun] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # every configuration's name, in the order given
    # an event log read with skip_damaged: what was skipped (``streamer.eventlog.DamagedRecords.to_dict``); None: strict
    damaged: dict[str, Any] | None = None

    @property
    def names(self) -> list[str]:
        """Every configuration, finished or failed, in the order given (the first is the comparison's baseline)."""
        return list(self.all_runs())

    def all_runs(self) -> dict[str, ConfigRun]:
        """``runs`` and ``failed`` together, in the order the configurations were given."""
        every = {**self.runs, **self.failed}
        order = self.order or list(every)
        return {name: every[name] for name in order if name in every}


def run_backtest(records: Iterable[Record | LoggedRecord], configs: dict[str, Config], *, batching: str = "event-time",
                 sample_every: int | None = None, progress: bool = False, total: int | None = None,
                 progress_unit: str = "records", intake: str = "auto",
                 replay_cache: str | os.PathLike | None = None,
                 replay_cache_limit: int | None = None,
                 on_failure: Callable[[str, dict[str, Any]], None] | None = None) -> BacktestResult:
    """Replay ``records`` through one pipeline per configuration (decoded once, fed to each in the same order).

    Each pipeline runs on the replay clock; at the end the join and batcher are flushed, as the trainer does at
    the end of a finite stream (``--exit-when-idle``). ``batching``: ``"event-time"`` (``max_batch_delay_s`` on
    the replay clock: a live trainer's batches at the log's own rate) or ``"dense"`` (batches cut by
    ``batch_size`` only); the join's attribution windows run on event time in both. ``sample_every``: samples
    between two series points (None: ``default_sample_every`` of each configuration).

    Configurations whose join and batching settings are the same (``stream_key``) make the same batches from the
    same records, so they are replayed as one group: the first one's join and batcher cut the batches, and every
    batch is trained by each configuration of the group (``Forwarding``), encoded once when they read the same
    features (``SharedEncoding``). Each configuration keeps its own learner, metrics and series.

    ``intake``: ``"process"`` reads, validates, joins, batches and encodes in a child process
    (``consumers.tools.intake``) while this one trains: dense batching of an event log (``log_records``) only,
    and every configuration trained in this process; the same batches, so the same numbers. ``"inline"``: all
    here. ``"auto"``: the process where it applies.

    ``replay_cache``: a folder where an intake process's output is kept (``consumers.tools.intake.ReplayCache``); a
    later replay of the same log, range, join, batching and feature sets (and code) reads it instead of starting the
    intake process (``BacktestResult.intake`` is then ``"cache"``): the same batches, so the same numbers. The folder
    keeps at most ``replay_cache_limit`` bytes of entries (None: 20 GiB), the least recently used removed first.

    A configuration that raises while it trains (its step, its loss not finite, its metrics, its learner process) is
    dropped there: ``on_failure(name, failure)`` is called at once, the others go on to the end, and the result has
    it in ``failed`` instead of ``runs`` (``ConfigRun.failure``: ``failure_of``). Once every configuration has failed
    the replay stops. What they share (the input, the groups' joins and batchers, the intake process) still raises.
    What can be checked before anything is built raises a ``ValueError`` (``check_configs``); a configuration whose
    build raises is dropped before the replay (reason ``build``), and when none could be built the input is not read.
    A Kafka range is read once per distinct ``join.max_future_s`` of its groups (``_replay_passes``).
    """
    from consumers.runtime.processes import tune_gc  # lazy: the replay's imports load only when one runs
    from consumers.tools.failures import Failures
    from consumers.tools.intake import DEFAULT_CACHE_LIMIT, LogRecords

    replay_cache_limit = DEFAULT_CACHE_LIMIT if replay_cache_limit is None else replay_cache_limit
    _check_options(sample_every, batching, intake, replay_cache_limit)
    check_configs(configs)
    tune_gc()
    failures = Failures(on_failure)
    kafka = isinstance(records, KafkaRange)  # records with Kafka timestamps: join.max_future_s applies (Record.events)
    runs, leaders = _grouped_runs(configs, batching, sample_every, failures=failures, kafka=kafka)
    if failures.all_failed:  # not one configuration could be built: nothing to train, the input is not read
        return BacktestResult({}, 0, 0, 0.0, batching, failed=dict(runs), order=list(runs))
    why_inline = _why_inline(records, runs, batching)
    if intake == "process" and why_inline:
        for run_ in runs.values():
            run_.drop()
        raise ValueError(f"--intake process does not apply: {why_inline} (use --intake inline or auto)")
    if replay_cache is not None and (why_inline or intake == "inline"):
        for run_ in runs.values():
            run_.drop()
        raise ValueError(f"--replay-cache keeps what an intake process reads, which this replay has none of: "
                         f"{why_inline or '--intake inline'}")
    by_process = intake != "inline" and why_inline is None
    started = time.perf_counter()
    examples: list[str] = []  # the first bad events, described
    skipping = isinstance(records, LogRecords) and records.skip_damaged
    damaged = DamagedRecords() if skipping else None  # what a log read with skip_damaged skipped
    with _progress(progress, total, progress_unit) as advance:
        processes: dict[str, Any] = {}
        if by_process:
            n_records, n_events, intake, processes, damaged = _replay_with_intake(
                records, runs, list(leaders.values()), advance, progress_unit, replay_cache, replay_cache_limit,
                examples, failures)
        else:
            n_records, n_events = _replay_passes(records, leaders, damaged, batching == "dense", advance,
                                                 progress_unit, examples, failures)
            damaged = damaged.to_dict() if damaged is not None else None
        _finish(runs, failures)
    finished = {name: run_ for name, run_ in runs.items() if run_.failure is None}
    failed = {name: run_ for name, run_ in runs.items() if run_.failure is not None}
    return BacktestResult(finished, n_records, n_events, time.perf_counter() - started, batching,
                          intake if by_process else "inline", processes, examples, failed, list(runs), damaged)


def check_configs(configs: dict[str, Config]) -> None:
    """What can be checked of each configuration before anything is built: its model's options (``model_config``:
    ``models.zoo.learner_config``'s checks, a privileged teacher), its device on this machine (``model_device``) and
    its join's settings. A ``ValueError`` naming the configuration (exit status 2: nothing is replayed); what fails
    only when a configuration is built drops that configuration instead (``_grouped_runs``, reason ``build``)."""
    from consumers.runtime.assembly import join_config, model_config, model_device  # lazy: assembly imports torch

    for name, cfg in configs.items():
        try:
            model_config(cfg)
            model_device(cfg)
            join_config(cfg, live=False)
        except ValueError as exc:
            raise ValueError(f"configuration {name!r}: {exc}") from None


def _check_options(sample_every: int | None, batching: str, intake: str, replay_cache_limit: int) -> None:
    """``run_backtest``'s own arguments, each a ``ValueError`` saying what was wrong (exit status 2)."""
    if sample_every is not None and sample_every < 1:
        raise ValueError(f"--sample-every must be a positive number of samples, got {sample_every}")
    if batching not in BATCHING_MODES:
        raise ValueError(f"--batching must be one of {', '.join(BATCHING_MODES)}, got {batching!r}")
    if intake not in INTAKE_MODES:
        raise ValueError(f"--intake must be one of {', '.join(INTAKE_MODES)}, got {intake!r}")
    if replay_cache_limit < 0:
        raise ValueError(f"--replay-cache-limit must be at least 0 bytes, got {replay_cache_limit}")


def merge_bound(records: KafkaRange, cfg: Config) -> float:
    """The bound of a Kafka range's merge clock for a configuration: the range's own (``kafka_records``'
    ``max_future_s``), else the configuration's ``join.max_future_s``, as a backtest of it alone merges."""
    return cfg.join.max_future_s if records.max_future_s is None else records.max_future_s


def _replay_passes(records: Iterable[Any], leaders: dict[Any, ConfigRun], damaged: DamagedRecords | None,
                   dense: bool, advance: Any, progress_unit: str, examples: list[str], failures: Failures
                   ) -> tuple[int, int]:
    """An inline replay (``_replay_inline``) of the input: a log read with skip_damaged counts what it skips in
    ``damaged``. A Kafka range is merged in an order that depends on ``join.max_future_s`` (an event the bound
    refuses does not move its partition's merge clock, ``KafkaRange``), so its groups are replayed in one pass over
    the range per distinct bound (``merge_bound``), each group in the order a backtest of it alone reads: one pass
    when they all have the same bound. The first pass gives the counts, the progress and the dead letter examples
    (the later passes read the same records; with ``--limit`` the first N of their own order)."""
    if damaged is not None:
        records = records.read(damaged)
    if not isinstance(records, KafkaRange):
        return _replay_inline(records, leaders, dense, advance, progress_unit, examples, failures)
    passes: dict[float, dict[Any, ConfigRun]] = {}
    for key, leader in leaders.items():
        passes.setdefault(merge_bound(records, leader.cfg), {})[key] = leader
    counts = []
    for bound, group in passes.items():
        first = not counts
        counts.append(_replay_inline(records.read(bound), group, dense, advance if first else lambda n: None,
                                     progress_unit, examples if first else [], failures, future_bound=True))
    return counts[0]


def _finish(runs: dict[str, ConfigRun], failures: Failures) -> None:
    """The end of a replay for each configuration still training: its learner process's last answers, the group's
    stream counts (one join for the group) and the final series point."""
    for run_ in runs.values():
        if run_.failure is not None:
            continue
        t0 = time.perf_counter()
        stream = runs[run_.leader or run_.name].stream
        with failures.guard(run_):
            run_.pipeline.collect(wait=True)  # a learner process's last answers
        run_.pipeline.dead_letters, run_.pipeline.events_ingested = stream.dead_letters, stream.events_ingested
        if run_.event_ts_ms and run_.failure is None:
            with failures.guard(run_):
                run_.add_point(run_.event_ts_ms[-1])  # the final state is always a point
        run_.seconds += time.perf_counter() - t0


def _replay_inline(records: Iterable[Any], leaders: dict[Any, ConfigRun], dense: bool, advance: Any,
                   progress_unit: str, examples: list[str], failures: Failures,
                   future_bound: bool = False) -> tuple[int, int]:
    """Read, join, batch and train here, a chunk of records at a time; (records, events) replayed. The first bad
    events are described into ``examples``. Stops (without the end's flush) once every configuration of the groups
    of ``leaders`` has failed. ``future_bound`` (records with Kafka timestamps): each group's events are decoded
    with its ``join.max_future_s`` against each record's timestamp (``Record.events``), once per distinct bound."""
    # lazy: numpy
    from consumers.tools.intake import DEAD_LETTER_EXAMPLES, add_dead_letter_examples

    # Event time: train after every record, as the clock may cut a batch at any record. Dense: the batches do
    # not depend on when samples are collected (the join closes windows as records arrive; only batch_size cuts),
    # so train every DENSE_TRAIN_EVERY records, as the live trainer does once per poll. Groups are independent,
    # so each replays a chunk of records in turn (timed per chunk, not per record).
    n_records = n_events = 0
    records = iter(records)
    bounds = [leader.cfg.join.max_future_s if future_bound else 0.0 for leader in leaders.values()]
    while chunk := list(itertools.islice(records, DENSE_TRAIN_EVERY)):
        decodings: dict[float, list] = {}  # per bound (in stream_key: the groups with the same one share it)
        for index, leader in enumerate(leaders.values()):
            decoded = decodings.get(bounds[index])
            if decoded is None:
                decoded = decodings[bounds[index]] = [
                    (record.events(bounds[index]) if bounds[index] else record.events(),
                     (record.topic, record.partition)) for record in chunk]
            with _own_time(leader):
                pipeline = leader.stream
                if dense:
                    bad = pipeline.ingest_each(decoded)
                    if len(chunk) == DENSE_TRAIN_EVERY:
                        pipeline.train_ready()
                else:
                    bad = []
                    for events, source in decoded:
                        bad += pipeline.ingest(events, source)
                        pipeline.train_ready()
            if bad and index == 0 and len(examples) < DEAD_LETTER_EXAMPLES:  # every group reads the same records
                add_dead_letter_examples(examples, chunk, decoded, n_records)
        n_records += len(chunk)
        n_events += sum(len(events) for events, _ in decoded)
        advance(len(chunk) if progress_unit == "records" else sum(record.size for record in chunk))
        if all(m.failure is not None for leader in leaders.values() for m in leader.stream.learner.members):
            return n_records, n_events  # nothing left to train: the rest of the input would change no number
    for leader in leaders.values():
        with _own_time(leader):
            leader.stream.flush()
    return n_records, n_events


def _why_inline(records: Iterable[Any], runs: dict[str, ConfigRun], batching: str) -> str | None:
    """Why this replay cannot take its input from an intake process (None: it can)."""
    # lazy: numpy
    from consumers.tools.intake import LogRecords

    if batching != "dense":
        return "event-time batching cuts batches on the replay clock of each pipeline (use --batching dense)"
    if not isinstance(records, LogRecords):
        return "the input is not an event log (--log)"
    from consumers.runtime.learner_process import RemoteLearner  # lazy: it imports torch

    for run_ in runs.values():
        if run_.pipeline is None:  # not built: trains nothing
            continue
        port = run_.pipeline.learner.port  # FiniteLoss's
        if not isinstance(getattr(port, "encode", None), SharedEncoding) and not isinstance(port, RemoteLearner):
            return f"configuration {run_.name!r} does not train on encoded features"
    return None


def _columns_of(current: dict[str, Any], samples: list, index: int) -> Any:
    """The intake process's arrays of feature set ``index`` for ``samples``, which must be the group's current batch."""
    if samples is not current["samples"]:
        raise RuntimeError("an intake replay trained a batch that is not the intake process's current one")
    return current["columns"][index]


class _Prepared:
    """``InProcessLearner.encode`` of a configuration in an intake replay: the batch the intake process encoded
    for its feature set (``index``), the one being trained (``current``, the group's)."""

    def __init__(self, current: dict[str, Any], index: int, tasks: Sequence[str]) -> None:
        self.current, self.index, self.tasks = current, index, tuple(tasks)

    def __call__(self, samples: list) -> Any:
        # lazy: numpy
        from models.features import batch_from_columns

        return batch_from_columns(_columns_of(self.current, samples, self.index), self.tasks)


class _PreparedRemote:
    """The learner port of a configuration that trains in a learner process of its own during an intake replay
    (``consumers.runtime.learner_process.RemoteLearner``): each batch goes out as the intake process encoded it."""

    def __init__(self, remote: Any, current: dict[str, Any], index: int) -> None:
        self.remote, self.current, self.index = remote, current, index

    @property
    def steps(self) -> int:
        return self.remote.steps

    @property
    def in_flight(self) -> int:
        return self.remote.in_flight

    def submit(self, samples: list, context: Any) -> None:
        self.remote.submit_columns(_columns_of(self.current, samples, self.index), context)

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Any]]:
        return self.remote.answers(wait)

    def check_alive(self) -> None:
        self.remote.check_alive()

    def close(self) -> None:
        self.remote.close()


def _intake_group(leader: ConfigRun) -> IntakeGroup:
    """What an intake cuts and encodes for a group (the leader and the configurations that train its batches)."""
    # lazy: numpy
    from consumers.tools.intake import IntakeGroup

    pipeline = leader.pipeline
    return IntakeGroup(pipeline.join.config, pipeline.batcher.batch_size, pipeline.tasks,
                       tuple(_feature_sets(leader)[2]))


def _feature_sets(leader: ConfigRun) -> tuple[list[ConfigRun], dict[str, Any], list[Any]]:
    """A group's configurations, the feature set each reads, and the distinct feature sets in order."""
    members = list(leader.stream.learner.members)
    features = {m.name: _features(m) for m in members}
    return members, features, list(dict.fromkeys(features.values()))


def _features(run_: ConfigRun) -> Any:
    """The feature set a configuration's learner reads."""
    from consumers.runtime.assembly import model_config  # lazy: assembly imports torch and the models

    return model_config(run_.cfg).features


def _intake_ports(leader: ConfigRun, current: dict[str, Any], free_cores: list[int]) -> tuple[list[Any], list[Any]]:
    """Point a group's configurations at the batches of the intake process: (their feature sets, the learner
    processes started). While ``free_cores[0]`` > 0 (``_replay_with_intake``: at least one on two cores), all but
    one of a group's configurations train in learner processes of their own, a core each, side by side. This
    process keeps every configuration's metrics besides its own step, so where learner processes are forks (ready
    at once, ``learner_process.forks_learners``) the costliest steps (``_step_cost``) move first and the cheapest
    stays here (from a warm cache, mtl,crossdistil of KuaiRand-Pure on two cores: 11.7-13.2 s against 14.8-17.0 s
    with crossdistil's step here; cold 15.1-18.1 s against 17.8-22.7 s; one-off pairs). A learner process that is a
    new interpreter pays seconds of imports before its first step: then the cheapest steps move first and the
    costliest stays (on a tie, the group's first stays, either way). One with ``model.separate_process`` trains in
    its own process in any case."""
    from consumers.runtime.learner_process import RemoteLearner, forks_learners  # lazy: it imports torch

    members, features, specs = _feature_sets(leader)
    here = [m for m in members if not isinstance(m.pipeline.learner.port, RemoteLearner)]
    forked = forks_learners()
    movable = sorted(here, key=lambda m: (-_step_cost(m) if forked else _step_cost(m), m is leader))[:-1]
    moving = {m.name for m in movable[:max(0, free_cores[0])]}
    free_cores[0] -= len(moving)
    started = []
    for m in members:
        checked = m.pipeline.learner  # FiniteLoss: its port is the configuration's own
        port = checked.port
        index = specs.index(features[m.name])
        if isinstance(port, RemoteLearner):
            checked.port = _PreparedRemote(port, current, index)
        elif m.name in moving:
            # a fork of this process (torch imported already: ready in milliseconds; with more than one torch thread
            # a new interpreter, seconds of imports): the batches queue up meanwhile, not blocking this process
            try:
                remote = RemoteLearner(m.cfg, wait_ready=False, queue_bytes=REPLAY_QUEUE_BYTES, fork=True)
            except Exception as exc:  # noqa: BLE001 - the replay's choice, for speed: its own learner trains here
                print(f"crossdistil backtest: warning: could not start a learner process for {m.name!r} "
                      f"({type(exc).__name__}: {exc}); it trains in this process (the same numbers, slower)",
                      file=sys.stderr)
                port.encode = _Prepared(current, index, m.pipeline.tasks)
                continue
            started.append(remote)
            checked.port = _PreparedRemote(remote, current, index)
        else:
            port.encode = _Prepared(current, index, m.pipeline.tasks)
    return specs, started


# Encoded batches a replay may have sent a learner process and not had answered (~85 KB a KuaiRand-Pure batch of
# 256: ~3,000 batches): this process trains on while the learner process starts (seconds, unless forked) or trails.
REPLAY_QUEUE_BYTES = 256 << 20


def _step_cost(run_: ConfigRun) -> int:
    """A configuration's step cost, to order a group's configurations (``_intake_ports``): the elements of the
    parameters its dense optimizer updates (crossdistil's teacher towers: ~116k against mtl's ~95k in the default
    model, whose step costs ~1.4x mtl's). The embedding tables and the wide part are left out: a group's
    configurations read the same features, and their sparse updates touch the same rows. 0 for a learner without
    a dense optimizer (river's)."""
    port = run_.pipeline.learner.port  # FiniteLoss's
    optimizer = getattr(getattr(port, "learner", None), "dense_optimizer", None)
    if optimizer is None:
        return 0
    return sum(p.numel() for group in optimizer.param_groups for p in group["params"])


def _replay_with_intake(records: Any, runs: dict[str, ConfigRun], leaders: list[ConfigRun], advance: Any,
                        progress_unit: str, replay_cache: Any, replay_cache_limit: int,
                        examples: list[str], failures: Failures
                        ) -> tuple[int, int, str, dict[str, Any], dict[str, Any] | None]:
    """Train the batches an intake process (``consumers.tools.intake``) reads, joins, cuts and encodes, or a replay
    cache holds; the join's final state, dead letters (with the first ones described, into ``examples``) and stream
    counters are the intake's. (records, events, the intake: "process" or "cache", ``BacktestResult.processes``,
    ``BacktestResult.damaged``: what the intake skipped of a log read with skip_damaged).
    Once every configuration has failed the intake is stopped (and no cache entry is kept: it would be cut short)."""
    # lazy: numpy
    from consumers.tools.intake import IntakeProcess, ReplayCache

    groups = [_intake_group(leader) for leader in leaders]
    cache = None if replay_cache is None else ReplayCache(replay_cache, records, groups, DENSE_TRAIN_EVERY,
                                                          replay_cache_limit)
    cached = cache is not None and cache.hit
    # cores for learner processes, where all but one of a group's configurations train: those beyond this process's
    # (and the intake process's), and on two cores one even beside a running intake process: three busy processes
    # on two cores measured faster than two (mtl,crossdistil from KuaiRand-Pure, four pairs of one-off runs:
    # 17.4-20.4 s against 19.8-21.6 s), the learner process taking the cheaper step and its batches queued ahead
    cores = os.cpu_count() or 1
    free_cores = [max(cores - (1 if cached else 2), min(cores - 1, 1))]
    currents, remotes = [], []
    for leader in leaders:
        current: dict[str, Any] = {"samples": None, "columns": []}
        remotes += _intake_ports(leader, current, free_cores)[1]
        currents.append(current)
    counts = {"records": 0, "events": 0, "bytes": 0, "intake_cpu_s": 0.0, "dead_letter_examples": examples}
    spool = cache.spool() if cache is not None and not cached else None
    try:
        source: Any = cache.reader() if cached else IntakeProcess(records, groups, DENSE_TRAIN_EVERY, spool)
        with source:
            for message in source.messages():
                _on_intake_message(message, leaders, currents, counts, advance, progress_unit)
                if failures.all_failed:
                    break  # nothing left to train; the intake process is stopped (its entry would be cut short)
        for run_ in runs.values():
            if run_.failure is None:
                with failures.guard(run_):
                    run_.pipeline.collect(wait=True)  # the learner processes' last answers
    finally:
        if spool is not None:
            spool.discard()  # a replay that failed or was interrupted leaves no entry (a kept one stays)
        for remote in remotes:
            remote.close()
    processes = {"learner_processes": len(remotes), "intake_cpu_s": 0.0 if cached else round(counts["intake_cpu_s"], 3)}
    if not cached:  # seconds this process waited for the intake process's next message: where its input was the bound
        processes["intake_wait_s"] = round(source.waited_s, 3)
    if cache is not None:
        processes["replay_cache"] = _cache_upkeep(cache, cached, spool)
    return counts["records"], counts["events"], "cache" if cached else "process", processes, counts.get("damaged")


def _cache_upkeep(cache: ReplayCache, cached: bool, spool: Any) -> dict[str, Any]:
    """After a replay that read (``cached``) or wrote its cache entry: the entry made the most recent, the folder
    kept within its limit; what ``BacktestResult.processes["replay_cache"]`` says (file, hit, bytes, evicted,
    error)."""
    # lazy: numpy
    from consumers.tools.intake import format_size

    info: dict[str, Any] = {"file": str(cache.path), "hit": cached, "limit_bytes": cache.limit}
    if spool is not None and spool.error:
        info["error"] = spool.error
        return info
    try:
        size = cache.path.stat().st_size
        if cached:
            cache.touch()
        evicted = cache.evict()
    except OSError as exc:  # e.g. another replay sharing the folder removed this entry meanwhile
        info["error"] = f"not kept up: {exc}"
        return info
    info["bytes"] = size
    if evicted["files"]:
        info["evicted"] = {"files": evicted["files"], "bytes": evicted["bytes"]}
    if evicted["this"]:
        info["error"] = (f"not kept: this entry's {format_size(size)} are more than the cache's limit of "
                         f"{format_size(cache.limit)} (--replay-cache-limit)")
    return info


def _on_intake_message(message: dict[str, Any], leaders: list[ConfigRun], currents: list[dict[str, Any]],
                       counts: dict[str, Any], advance: Any, progress_unit: str) -> None:
    """One message of an intake: progress, a batch to train, or the end of the stream."""
    # lazy: numpy
    from consumers.core.pipeline import SampleColumns

    op = message["op"]
    if op == "read":
        advance(message["records"] - counts["records"] if progress_unit == "records"
                else message["bytes"] - counts["bytes"])
        counts.update(records=message["records"], events=message["events"], bytes=message["bytes"])
    elif op == "batch":
        index = message["group"]
        samples = SampleColumns(message["ids"], message["users"], message["ts"], message["user_codes"])
        currents[index].update(samples=samples, columns=message["columns"])
        with _own_time(leaders[index]):
            leaders[index].stream.train_batch(samples)
    elif op == "done":
        counts["intake_cpu_s"] = message["cpu_s"]
        counts["damaged"] = message.get("damaged")
        counts["dead_letter_examples"] += message.get("dead_letter_examples", [])
        for leader, final in zip(leaders, message["groups"]):
            _take_stream_state(leader, final)


def _take_stream_state(leader: ConfigRun, final: dict[str, Any]) -> None:
    """The intake process's end of a group's stream into the group's stream pipeline (its configurations share its
    join)."""
    pipeline = leader.stream
    pipeline.join.load_state_dict(final["join_state"])
    pipeline.events_ingested = final["events_ingested"]
    pipeline.dead_letters = sum(final["dead_letters"].values())
    for reason, n in final["dead_letters"].items():
        for _ in range(n):
            pipeline.metrics.dead_letter(reason)
    for topic, n in final["consumed"].items():
        pipeline.metrics.events_consumed(topic, n)
    pipeline.metrics.samples_emitted(final["emitted"])
    for member in pipeline.learner.members:
        member.pipeline.metrics.join_counters(pipeline.join.counters)
        member.pipeline.metrics.watermark(pipeline.join.watermark_ms)


@contextlib.contextmanager
def _own_time(leader: ConfigRun) -> Iterator[None]:
    """Adds the block's seconds (the group's stream: its join and batching) to a group leader's, less the seconds
    its ``Forwarding`` spent training the group's configurations (each one's are its own)."""
    forwarding = leader.stream.learner
    started, forwarded = time.perf_counter(), forwarding.forwarded_s
    yield
    leader.seconds += time.perf_counter() - started - (forwarding.forwarded_s - forwarded)


def _grouped_runs(configs: dict[str, Config], batching: str, sample_every: int | None, *,
                  failures: Failures | None = None, kafka: bool = False
                  ) -> tuple[dict[str, ConfigRun], dict[Any, ConfigRun]]:
    """One ``ConfigRun`` per configuration, and per group of equal ``stream_key`` its leader (see run_backtest): the
    group's first configuration, which holds the group's stream pipeline (``ConfigRun.stream``: the join and the
    batcher, and a ``Forwarding`` that hands each batch to every configuration of the group). ``failures``: where a
    configuration that raises is dropped (``Failures``; a new one by default). ``kafka``: a Kafka range's replay
    (``join.max_future_s`` is part of the key). A configuration whose build raises (allocating its model, starting
    its learner process, an option only its model's constructor rejects) is dropped at once (reason ``build``; its
    ``pipeline`` is None, its ``leader`` the group it would have trained in): the group's first configuration that
    was built leads the group, so the others replay as they do without it."""
    # lazy: numpy
    from prometheus_client import CollectorRegistry

    # lazy: torch, numpy and the models load only when a replay runs (crossdistil --help stays fast)
    from consumers.core.pipeline import EventClock, InProcessLearner, Pipeline
    from consumers.runtime.assembly import build_pipeline
    from consumers.runtime.telemetry import TrainerMetrics
    from consumers.tools.failures import Failures, FiniteLoss

    failures = failures if failures is not None else Failures()
    runs: dict[str, ConfigRun] = {}
    leaders: dict[Any, ConfigRun] = {}  # stream key -> the run whose join and batcher cut its group's batches
    encodings: dict[Any, SharedEncoding] = {}
    unbuilt: dict[str, Any] = {}  # configurations whose build raised -> their stream key
    for name, cfg in configs.items():
        clock = EventClock()
        every = sample_every if sample_every is not None else default_sample_every(cfg)
        key = stream_key(cfg, batching, kafka=kafka)
        try:  # allocating the model, starting a learner process: a failure here is this configuration's alone
            metrics = TrainerMetrics.from_config(cfg, registry=CollectorRegistry(), clock=clock)
            # the users feed GAUC only, which a backtest does not show
            pipeline = build_pipeline(cfg, clock=clock, metrics=metrics, dense=batching == "dense",
                                      metrics_users=False)
        except Exception as exc:  # noqa: BLE001 - dropped as a failure part-way is (reason "build")
            runs[name] = run_ = ConfigRun(name, cfg, None, every)  # type: ignore[arg-type]
            failures.runs.append(run_)
            failures.drop(run_, exc)
            unbuilt[name] = key
            continue
        run_ = ConfigRun(name, cfg, pipeline, every, _next_point=every)
        pipeline.on_batch = run_.on_batch
        runs[name] = run_
        failures.runs.append(run_)
        port = pipeline.learner
        if isinstance(port, InProcessLearner) and port.encode is None:
            features = port.learner.config.features
            port.encode = encodings.setdefault((key, features), SharedEncoding(features, pipeline.tasks))
        pipeline.learner = FiniteLoss(port)
        leader = leaders.get(key)
        if leader is None:
            leaders[key] = leader = run_
            # the group's stream: this configuration's join, batcher, clock and metrics (its dead letters, events
            # and join counters), training nothing itself; each of the group's configurations trains every batch
            # in its own pipeline (Forwarding), so one that raises is dropped without touching the stream
            run_.stream = Pipeline(Forwarding(failures), pipeline.join, pipeline.batcher, tasks=pipeline.tasks,
                                   scored_tasks=pipeline.scored_tasks, clock=clock, metrics=metrics,
                                   metrics_users=False)
        else:  # the leader's join is this configuration's: its counters and watermark, and its replay clock
            run_.leader = leader.name
            pipeline.join = clock.join = leader.pipeline.join
        leader.stream.learner.members.append(run_)
    for name, key in unbuilt.items():  # in the group it would have trained with (summary.json's replayed.groups)
        runs[name].leader = leaders[key].name if key in leaders else None
    return runs, leaders


def stream_key(cfg: Config, batching: str, *, kafka: bool = False) -> tuple:
    """What decides the batches a configuration's pipeline cuts from a replay: the join's settings, the tasks,
    ``batch_size``, (event-time batching) ``max_batch_delay_s`` and (``kafka``: a Kafka range, whose records'
    timestamps bound their events' time) ``join.max_future_s``. Equal keys, equal batches from equal records.

    >>> from consumers.runtime.config import load_config
    >>> a = load_config(None, env={}, overrides=["model.options={rung = 'mtl'}"])
    >>> b = load_config(None, env={}, overrides=["model.options={rung = 'crossdistil'}", "join.max_future_s=60"])
    >>> stream_key(a, "dense") == stream_key(b, "dense"), stream_key(a, "dense", kafka=True) == stream_key(
    ...     b, "dense", kafka=True)
    (True, False)
    """
    from consumers.runtime.assembly import join_config  # lazy: assembly imports the pipeline and torch

    join = dataclasses.asdict(join_config(cfg, live=False))
    join["attribution_window_s"] = tuple(sorted(join["attribution_window_s"].items()))
    delay = None if batching == "dense" else cfg.batching.max_batch_delay_s
    key = (tuple(sorted(join.items())), tuple(cfg.model.tasks), cfg.batching.batch_size, delay)
    return (*key, cfg.join.max_future_s) if kafka else key


class Forwarding:
    """The learner port of a group's stream pipeline (``ConfigRun.stream``, ``run_backtest``): each batch submitted
    to it is trained by every configuration of the group (``members``, each ``Pipeline.train_batch`` in its own
    pipeline: step, metrics, ``on_batch``), in order, at the same point of the replay. A configuration that raises
    while it trains is dropped there (``Failures.guard``) and the others go on with the same batches; one that
    failed is skipped from then on.

    It trains nothing itself, so it never has answers. ``forwarded_s`` adds up the seconds the configurations took
    (each one's ``ConfigRun.seconds`` has its own), so the group leader's time is its own too. ``batches``: the
    batches handed out so far (a failure names the one it came in).
    """

    steps = 0
    in_flight = 0

    def __init__(self, failures: Failures | None = None) -> None:
        # lazy: numpy
        from consumers.tools.failures import Failures

        self.members: list[ConfigRun] = []
        self.failures = failures if failures is not None else Failures()
        self.forwarded_s = 0.0
        self.batches = 0

    def submit(self, samples: list, context: Any) -> None:
        self.batches += 1
        for member in self.members:
            if member.failure is not None:
                continue
            t0 = time.perf_counter()
            with self.failures.guard(member, samples, self.batches):
                member.pipeline.train_batch(samples)
            seconds = time.perf_counter() - t0
            member.seconds += seconds
            self.forwarded_s += seconds

    def answers(self, wait: bool = False) -> Iterator[tuple[Any, Any]]:
        return iter(())

    def check_alive(self) -> None:
        """Always: each configuration's learner is checked as it trains."""

    def close(self) -> None:
        """Nothing to stop (each configuration's pipeline closes its own learner)."""


class SharedEncoding:
    """``InProcessLearner.encode`` shared by the configurations of a group that read the same features: the batch
    they all train on (the same list, ``Forwarding``) is encoded by the first and reused by the others.

    Learners do not write into a batch's tensors, so sharing them changes no number (the tests compare a group's
    predictions with each configuration replayed alone).
    """

    def __init__(self, features: Any, tasks: Sequence[str]) -> None:
        # lazy: the pipeline and the models load only when a replay runs (crossdistil --help stays fast)
        # lazy: numpy
        from consumers.core.pipeline import encode_samples
        from models.features import batch_from_columns

        self.features, self.tasks = features, tuple(tasks)
        self._encode = lambda samples: batch_from_columns(encode_samples(samples, features, self.tasks), self.tasks)
        self._samples: list | None = None
        self._batch: Any = None

    def __call__(self, samples: list) -> Any:
        if samples is not self._samples:  # held here, so no other list can have its identity
            self._samples, self._batch = samples, self._encode(samples)
        return self._batch


def default_sample_every(cfg: Config) -> int:
    """Samples between two series points when ``--sample-every`` is not given: a quarter of the smallest metrics
    window (each point sorts every window for its exact AUC; consecutive points of one window overlap by 3/4).

    >>> from consumers.runtime.config import load_config
    >>> default_sample_every(load_config(None, env={}, overrides=["metrics.windows=[10000, 50000]"]))
    2500
    """
    return max(1, min(int(w) for w in cfg.metrics.windows) // 4)


def batch_statistics(sizes: Sequence[int]) -> dict[str, Any]:
    """Number of batches and the mean, median and 90th percentile (nearest rank) of their sizes.

    >>> batch_statistics([1, 2, 2, 3, 256])
    {'batches': 5, 'mean': 52.8, 'p50': 2, 'p90': 256}
    """
    if not sizes:
        return {"batches": 0, "mean": None, "p50": None, "p90": None}
    ordered = sorted(sizes)

    def rank(q: float) -> int:
        return int(ordered[max(0, math.ceil(q * len(ordered)) - 1)])

    return {"batches": len(ordered), "mean": round(sum(ordered) / len(ordered), 2), "p50": rank(0.5),
            "p90": rank(0.9)}


def small_batch_warning(name: str, mode: str, stats: dict[str, Any], batch_size: int,
                        max_batch_delay_s: float | None) -> str | None:
    """The report's warning when the mean batch is below ``SMALL_BATCH_SHARE`` of ``batch_size``, naming what
    changes it; None otherwise.

    >>> small_batch_warning("mtl", "dense", {"batches": 3, "mean": 200.0}, 256, None) is None
    True
    """
    if not stats["batches"] or stats["mean"] >= SMALL_BATCH_SHARE * batch_size:
        return None
    said = (f"{name}: the mean batch is {stats['mean']:g} samples, {stats['mean'] / batch_size:.1%} of "
            f"batching.batch_size ({batch_size}), over {stats['batches']:,} steps")
    if mode == "event-time":
        return (f"{said}: max_batch_delay_s ({max_batch_delay_s:g} s) runs on the log's event time and cuts a batch "
                "whenever its oldest sample has waited that long, as a live trainer would at the data's own rate. "
                "--batching dense cuts batches by batch_size only (or raise it with --set "
                "batching.max_batch_delay_s=SECONDS)")
    return f"{said}: the replay trained too few samples to fill a batch; lower it with --set batching.batch_size=N"


def batching_summary(run_: ConfigRun, mode: str) -> dict[str, Any]:
    """The batching of one configuration's replay: its mode, what cut batches, and the batch sizes."""
    batching = run_.cfg.batching
    delay = None if mode == "dense" else batching.max_batch_delay_s
    stats = batch_statistics(run_.batch_sizes)
    return {"mode": mode, "batch_size": batching.batch_size, "max_batch_delay_s": delay, **stats,
            "warning": small_batch_warning(run_.name, mode, stats, batching.batch_size, delay)}


def batching_warnings(result: BacktestResult) -> list[str]:
    """Every configuration's small-batch warning (``small_batch_warning``), in configuration order."""
    warnings = (batching_summary(run_, result.batching)["warning"] for run_ in result.runs.values())
    return [w for w in warnings if w]


def replay_cache_hint(result: BacktestResult, replay_cache: Any) -> str | None:
    """After a replay whose intake process did work a replay cache would have saved (none given), the sentence
    that says how much and how to keep it; else None."""
    if replay_cache is not None or result.intake != "process":
        return None
    cpu_s = float(result.processes.get("intake_cpu_s") or 0.0)
    wait_s = float(result.processes.get("intake_wait_s") or 0.0)
    waited = (f" (the training waited {wait_s:.1f} s of the {result.seconds:.1f} s replay for it)"
              if wait_s >= max(0.5, 0.05 * result.seconds) else "")
    return (f"the intake process spent {cpu_s:.1f} CPU seconds reading, validating, joining and encoding the log"
            f"{waited}; --replay-cache DIR keeps what it made (about 40% of the log's size) so that replaying this "
            "log again, with any model settings that keep the join, batching and features, skips that work")


class _progress:
    """A rich progress bar on stderr (or nothing); ``advance(n)`` moves it."""

    def __init__(self, enabled: bool, total: int | None, unit: str) -> None:
        self.enabled, self.total, self.unit = enabled, total, unit
        self._progress = None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(TextColumn("backtest"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True))
        self._progress.start()
        task = self._progress.add_task("replay", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            for task in self._progress.tasks:
                self._progress.update(task.id, completed=task.total or task.completed)
            self._progress.stop()


# ----------------------------------------------------------------------------------------------- outputs


def summary(result: BacktestResult, input_desc: dict[str, Any],
            seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The deterministic summary (no wall-clock field): inputs, what was replayed, per configuration its final numbers
    and, with several, each against the first (``comparison``: ``consumers.tools.comparison.compare_runs``).
    ``seconds``, if given, gets the comparison's wall seconds (``"comparison"``)."""
    from consumers.runtime.assembly import model_config  # lazy: the models load only when a replay ran

    configurations: dict[str, Any] = {}
    for name, run_ in result.runs.items():
        pipeline = run_.pipeline
        final = {row["task"]: {k: v for k, v in row.items() if k not in ("task",)}
                 for row in run_.series[-len(pipeline.scored_tasks):]}
        configurations[name] = {
            "config_hash": stable_hash(model_config(run_.cfg).to_dict()),  # the model's, as in the trainer's manifests
            "model_options": run_.cfg.model.options,
            "tasks": list(pipeline.scored_tasks),  # those it predicts
            **({"served_tasks": run_.cfg.model.served_tasks}  # ranked by; the others are auxiliary
               if run_.cfg.model.served_tasks != list(pipeline.scored_tasks) else {}),
            **({"counted_tasks": list(pipeline.counted_tasks)} if pipeline.counted_tasks else {}),  # inputs only
            "trained_samples": pipeline.trained_samples,
            "steps": pipeline.learner.steps,
            "batching": batching_summary(run_, result.batching),
            "dead_letters": pipeline.dead_letters,
            # a follower's stream is its group leader's (they share one join)
            "dead_letters_by_reason": _dead_letters_by_reason(result, run_),
            "join": pipeline.join.counters,
            "watermark_ms": pipeline.join.watermark_ms,
            "prequential_auc": run_.prequential_auc(),
            f"prequential_auc_last_{int(LAST_FRACTION * 100)}pct": run_.prequential_auc(LAST_FRACTION),
            "ranking": run_.ranking_metrics(),
            f"ranking_last_{int(LAST_FRACTION * 100)}pct": run_.ranking_metrics(LAST_FRACTION),
            "final": final,
            "drift_detections": run_.detections,
        }
        gate = pipeline.metrics.kd_gate_summary()  # a gated configuration's distillation
        if gate:
            configurations[name]["kd_gate"] = gate
    kafka = input_desc.get("kind") == "kafka"
    warnings = damage_warnings(result) + batching_warnings(result) + replay_stream_warnings(result, kafka=kafka)
    out = {"format": SUMMARY_FORMAT, "input": {k: v for k, v in input_desc.items() if k != "bytes"},
           "records": result.records, "events": result.events, "batching": result.batching,
           "warnings": warnings, "dead_letter_examples": result.dead_letter_examples,
           "configurations": configurations, "replayed": replayed(result)}
    if result.damaged is not None:  # --skip-damaged: what it skipped, even nothing (a strict replay's has no key)
        out["skipped_records"] = result.damaged
    if result.failed:  # only then: a summary of a replay where nothing failed is as it always was
        out["failed"] = {name: {**run_.failure, "traceback": f"traceback_{_slug(name)}.txt"}
                         for name, run_ in result.failed.items()}
    if len(result.names) > 1:
        started = time.perf_counter()
        out["comparison"] = comparison_of(result)
        if seconds is not None:
            seconds["comparison"] = time.perf_counter() - started
    return out


def damage_warnings(result: BacktestResult) -> list[str]:
    """The warning of a log read with ``--skip-damaged`` that had damaged records: how many, of what kind, where."""
    if not result.damaged or not result.damaged["records"]:
        return []
    said = DamagedRecords.from_dict(result.damaged).describe()
    return [f"--skip-damaged: {said}: this replay ran on the rest of the log, in no figure of it; summary.json's "
            "skipped_records names the first ones (record: its index in the file)"]


def comparison_of(result: BacktestResult) -> dict[str, Any]:
    """summary.json's ``comparison``: each configuration against the first (``compare_runs``). One that failed is
    ``not comparable`` (its predictions stop part-way); when the first failed, every other one is (there is no
    baseline: a comparison against another configuration would answer another question than the one asked)."""
    # lazy: numpy
    from consumers.tools.comparison import adjust, compare_runs
    from consumers.tools.comparison import method as comparison_method

    names, runs = result.names, result.runs
    base = names[0]
    if base in runs and len(runs) > 1:
        out = compare_runs(runs, {n: list(r.pipeline.scored_tasks) for n, r in runs.items()},
                           {n: list(r.cfg.model.served_tasks) for n, r in runs.items()}, LAST_FRACTION)
    else:
        out = {"baseline": base, "method": {**comparison_method(), "adjustment": adjust([])}, "configurations": {}}
    compared = out["configurations"]
    out["configurations"] = {}
    for name in names[1:]:
        if name in result.failed:
            at = _failed_at(result.failed[name].failure)
            out["configurations"][name] = _not_compared(f"`{name}` failed ({at}): its predictions stop there")
        elif base in result.failed:
            at = _failed_at(result.failed[base].failure)
            out["configurations"][name] = _not_compared(
                f"the baseline `{base}` failed ({at}): there is nothing to compare with; replay without it to "
                "compare the others")
        else:
            out["configurations"][name] = compared[name]
    return out


def _not_compared(why: str) -> dict[str, Any]:
    """A comparison entry for a configuration that cannot be compared at all (the shape of ``compare_runs``')."""
    return {"samples": 0, "only_baseline": 0, "only_this": 0, "tasks": {}, "verdict": "not comparable", "why": why,
            "summary": f"not comparable: {why}"}


def _failed_at(failure: dict[str, Any]) -> str:
    """``non_finite_loss at batch 12`` (or ``... at the end of the replay``, ``build before the replay``)."""
    if failure["reason"] == "build":
        return f"build ({failure.get('cause', 'error')}) before the replay"
    at = f"batch {failure['batch']:,}" if failure.get("batch") is not None else "the end of the replay"
    return f"{failure['reason']} at {at}"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that ran, as a shell would take it again: the ``CROSSDISTIL__*`` environment (configuration
    overrides, ``load_config``) first, then ``crossdistil backtest`` and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    args = argv[2:] if argv[1:2] == ["backtest"] else argv[1:]
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("CROSSDISTIL__")]
    return " ".join([*env, "crossdistil backtest", shlex.join(args)]).strip()


def code_version(outputs: Path | None = None, root: Path | None = None) -> dict[str, Any]:
    """The checkout this code runs from (``root``: another checkout): its commit and how many tracked files differ
    from it (``None``: not a git checkout, or git is missing), not counting those inside ``outputs`` (the run's own
    folder: a report kept in the repository is modified by the run that remakes it)."""
    root = Path(__file__).resolve().parents[2] if root is None else root
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "-z"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "modified_files": None}
    # -z: "XY path\0", a rename "XY new\0old\0"; the paths are relative to the repository's top
    entries, paths = status.split("\0"), []
    while entries and entries[0]:
        entry = entries.pop(0)
        paths.append(entry[3:])
        if entry[:1] in ("R", "C") and entries:
            entries.pop(0)
    inside = outputs.resolve() if outputs is not None else None
    modified = [path for path in paths if inside is None or not (root / path).resolve().is_relative_to(inside)]
    return {"commit": commit, "modified_files": len(modified)}


def replayed(result: BacktestResult) -> dict[str, Any]:
    """What was replayed besides the input's description: the event time of the first and last trained impression,
    the configurations' groups (those of a group trained the same batches) and each configuration's effective
    settings that differ from the first's."""
    # lazy: numpy
    from consumers.tools.comparison import config_differences

    times = [t for run_ in result.runs.values() for t in (min(run_.event_ts_ms, default=None),
                                                           max(run_.event_ts_ms, default=None)) if t is not None]
    groups: dict[str, list[str]] = {}
    every = result.all_runs()  # a configuration that failed was replayed too (its settings may say why it failed)
    for name, run_ in every.items():
        groups.setdefault(run_.leader or name, []).append(name)
    return {"event_time_ms": {"first": min(times, default=None), "last": max(times, default=None)},
            "groups": list(groups.values()),
            "config_differences": config_differences({n: r.cfg.to_dict() for n, r in every.items()})}


def _dead_letters_by_reason(result: BacktestResult, run_: ConfigRun) -> dict[str, int]:
    """A configuration's dead letters by reason: its group leader's, whose stream it shares (one join)."""
    metrics = (result.all_runs()[run_.leader] if run_.leader is not None else run_).pipeline.metrics
    return {sample.labels["reason"]: int(sample.value) for sample in metrics.dead_letters_total.collect()[0].samples
            if sample.name.endswith("_total")}


def replay_stream_warnings(result: BacktestResult, *, kafka: bool = False) -> list[str]:
    """``stream_warnings`` of every configuration (``kafka``: of a Kafka range, not an event log), each said once
    (configurations sharing a join give the same), and each task a configuration predicts that had no positive label
    in the whole replay: a task named otherwise than in the log's feedback (``clik``) trains on labels that are all
    0, and its AUC reads "n/a". That warning names the log's task names the configuration does not have, each with
    the task it most likely misspells (``consumers.core.join.describe_unknown_tasks``)."""
    warnings: list[str] = []
    where = "the feedback topic's events" if kafka else "the log's feedback events"
    for run_ in result.runs.values():
        join = run_.pipeline.join.counters
        said = stream_warnings(join, _dead_letters_by_reason(result, run_), kafka=kafka)
        warnings += [w for w in said if w not in warnings]
        never = [task for task in run_.pipeline.scored_tasks
                 if len(labels := run_.arrays(task)[0]) and not labels.any()]
        if never:
            report = run_.pipeline.join.task_labels.report(join)
            names = describe_unknown_tasks(report["unknown"], report["unknown_other"], run_.pipeline.tasks)
            warnings.append(f"{run_.name}: no positive label in {run_.pipeline.trained_samples:,} samples for "
                            f"{', '.join(map(repr, never))}: is each named as in {where}? "
                            f"({join.get('unknown_task_feedback', 0) + join.get('ignored_task_feedback', 0):,} "
                            "feedback events were for tasks it does not "
                            f"learn{': ' + names if names else ''})")
    return warnings


STREAM_WARNING_SHARE = 0.01  # as the trainer's alerts (CrossdistilLateFeedback, CrossdistilDeadLetterRate)


def stream_warnings(join: dict[str, int], dead_letters: dict[str, int], *, kafka: bool = False) -> list[str]:
    """What the input did to a replay that its figures do not show: events dead-lettered (any), and more than
    ``STREAM_WARNING_SHARE`` of impressions or feedback late or orphaned, which a log out of event-time order (or one
    event far ahead of the others) gives: its samples are trained with the labels that had reached them, mostly none.
    ``kafka``: the input was a Kafka range, whose partitions are merged by event time (``kafka_records``), so what
    can be out of order is a partition, and a range's start cuts impressions off their feedback.

    >>> stream_warnings({"impressions": 100, "late_impressions": 0, "feedback": 500, "orphan_feedback": 1}, {})
    []
    >>> stream_warnings({"impressions": 100, "late_impressions": 60}, {"out_of_range": 2})[1][:62]
    '60 of 100 impressions (60.0%) arrived after the event-time wat'
    """
    warnings = []
    if dead_letters:
        reasons = ", ".join(f"{reason} {n:,}" for reason, n in dead_letters.items())
        n = sum(dead_letters.values())
        warnings.append(f"{n:,} {'event was' if n == 1 else 'events were'} dead-lettered ({reasons}): in no figure of "
                        "this replay; summary.json's dead_letter_examples describes the first ones")
    impressions, feedback = join.get("impressions", 0), join.get("feedback", 0)
    late, late_feedback, orphans = (join.get("late_impressions", 0), join.get("late_feedback", 0),
                                    join.get("orphan_feedback", 0))
    # a log replays in its own order; a Kafka range merges its partitions by event time, each in offset order
    why = "a producer that retried, buffered or backfilled late, or stamped some events far ahead of the rest"
    disorder = f"a partition written out of event-time order ({why})" if kafka else "a log out of event-time order"
    cut = "written before the range's start, --from-offset/--from-time" if kafka else "outside --from-time/--to-time"
    if late > STREAM_WARNING_SHARE * impressions:
        question = (f"were some partitions written out of event-time order ({why})? The range's partitions are merged "
                    "by event time, but each replays in its offset order" if kafka
                    else "is the log in event-time order (docs/event-log.md)?")
        warnings.append(f"{late:,} of {impressions:,} impressions ({late / impressions:.1%}) arrived after the "
                        "event-time watermark had passed them and were trained at once with the labels that had "
                        f"reached them: {question}")
    if late_feedback > STREAM_WARNING_SHARE * feedback:
        warnings.append(f"{late_feedback:,} of {feedback:,} feedback events ({late_feedback / feedback:.1%}) came "
                        f"after their impression's window had closed in event time and were dropped: {disorder}, or "
                        "attribution windows (join.attribution_window_s) too short for it")
    if orphans > STREAM_WARNING_SHARE * feedback:
        source = "the topics" if kafka else "the log"
        warnings.append(f"{orphans:,} of {feedback:,} feedback events ({orphans / feedback:.1%}) matched no "
                        f"impression and were dropped: impressions missing from {source} (or {cut}), feedback "
                        f"before its impression in {disorder}, or feedback so long after its impression's window "
                        "(join.attribution_window_s) that the join had forgotten it")
    return warnings


def write_outputs(result: BacktestResult, out: Path, input_desc: dict[str, Any], *,
                  plots: bool = True, command: str | None = None) -> tuple[list[Path], dict[str, Any]]:
    """summary.json, series_<config>.csv, timing.json, auc_<task>.png and report.md into ``out``; the paths written and
    the summary (``summary``: its ``warnings`` are what the command says on stderr, computed once). ``command``: the
    command line that ran, for timing.json and the report's header (with the code's commit, ``code_version``)."""
    # lazy: numpy
    from consumers.tools.failures import describe_failure

    out.mkdir(parents=True, exist_ok=True)
    written = []
    seconds: dict[str, float] = {}
    data = summary(result, input_desc, seconds)
    path = out / "summary.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False, default=_json_default) + "\n")
    written.append(path)
    for name, run_ in result.runs.items():
        path = out / f"series_{_slug(name)}.csv"
        path.write_text(series_csv(run_.series))
        written.append(path)
    for name, run_ in result.failed.items():  # the whole traceback, which summary.json's one line shortens
        path = out / f"traceback_{_slug(name)}.txt"
        path.write_text(f"configuration {name!r} failed {describe_failure(run_.failure)}\n\n"
                        f"{run_.failure_traceback or ''}")
        written.append(path)
    # the command and the code's state: not results, and the command names --out, so not in summary.json
    timing = {"seconds": round(result.seconds, 3), "records_per_s": round(result.records / max(result.seconds, 1e-9)),
              "command": command, "directory": os.getcwd(), "code": code_version(out),
              "comparison_seconds": round(seconds.get("comparison", 0.0), 3),
              "intake": result.intake, **result.processes,
              "configurations": {name: {"seconds": round(r.seconds, 3),
                                        "samples_per_s": round((r.pipeline.trained_samples if r.pipeline else 0)
                                                               / max(r.seconds, 1e-9)),
                                        **({"failed": True} if r.failure is not None else {})}
                                 for name, r in result.all_runs().items()}}
    path = out / "timing.json"
    path.write_text(json.dumps(timing, indent=2, sort_keys=True) + "\n")
    written.append(path)
    images = plot_auc(result, out) if plots else []
    written += images
    path = out / "report.md"
    path.write_text(render_report(data, timing, [p.name for p in images]))
    written.append(path)
    remove_stale_outputs(out, written)
    return written, data


# The outputs named per configuration or task (write_outputs): an earlier backtest into the same --out leaves its own
STALE_KINDS = ("series_*.csv", "traceback_*.txt", "auc_*.png")


def remove_stale_outputs(out: Path, written: Sequence[Path]) -> list[Path]:
    """Remove from ``out`` the files of the kinds a backtest names per configuration or task (``STALE_KINDS``) that
    this one did not write (``written``), so that ``out`` holds exactly its outputs: an earlier backtest's
    series_mtl.csv beside this one's series_default.csv would read as a result of this one. Any other file in
    ``out`` is left alone. Returns the files removed."""
    keep = {path.name for path in written}
    stale = [path for kind in STALE_KINDS for path in sorted(out.glob(kind)) if path.name not in keep
             and path.is_file()]
    for path in stale:
        path.unlink()
    return stale


def series_csv(rows: list[dict[str, Any]]) -> str:
    """The series as CSV text; floats in Python's shortest round-trip form, so equal numbers give equal bytes."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(
            ["" if row.get(c) is None else repr(row[c]) if isinstance(row[c], float) else row[c] for c in columns])
    return buffer.getvalue()


def plot_auc(result: BacktestResult, out: Path) -> list[Path]:
    """auc_<task>.png: windowed AUC over event time, one line per configuration, drift detections as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(t for r in result.runs.values() for t in r.pipeline.scored_tasks))
    paths = []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for task in tasks:
        fig, (ax_auc, ax_drift) = plt.subplots(2, 1, figsize=(10, 6), sharex=True,
                                               gridspec_kw={"height_ratios": [3, 1.4]})
        for i, (name, run_) in enumerate(result.runs.items()):
            color = colors[i % len(colors)]
            window = str(run_.pipeline.metrics.windows[0])
            rows = [r for r in run_.series if r["task"] == task]
            times = [_dt(r["event_time_ms"]) for r in rows]
            marker = PLOT_MARKERS[i % len(PLOT_MARKERS)]  # equal lines (identical configurations) stay visible
            ax_auc.plot(times, [_nan(r.get(f"auc@{window}")) for r in rows], color=color, marker=marker,
                        markersize=6, fillstyle="none", markevery=max(1, len(rows) // 40),
                        label=f"{name}: AUC over the last {int(window):,} samples")
            drift_key = f"auc_drift@{window}/baseline"
            ax_drift.plot(times, [_nan(r.get(drift_key)) for r in rows], color=color, marker=marker, markersize=6,
                          fillstyle="none", markevery=max(1, len(rows) // 40))
            marked = False
            for d in run_.detections:
                if d["task"] != task:
                    continue
                for ax in (ax_auc, ax_drift):
                    ax.axvline(_dt(d["event_time_ms"]), color=color,
                               linestyle=DETECTION_STYLES.get(d["detector"], ":"), linewidth=1.0, alpha=0.8,
                               label=None if marked or ax is ax_drift else f"{name} drift detection")
                marked = True
        ax_auc.set_ylabel(f"{task} AUC (higher is better)")
        ax_auc.set_title(f"{task}: prequential AUC over event time (detections: dashed ADWIN, dotted Page-Hinkley, "
                         "solid AUC drop)")
        ax_auc.grid(alpha=0.3)
        ax_auc.legend(loc="lower left", fontsize=8)
        ax_drift.axhline(0.0, color="grey", linewidth=0.8)
        metrics = next(iter(result.runs.values())).pipeline.metrics
        ax_drift.set_ylabel(f"AUC (last {metrics.windows[0]:,})\nminus AUC (last\n{metrics.baseline_window:,})",
                            fontsize=8)
        ax_drift.set_xlabel("event time (UTC)")
        ax_drift.grid(alpha=0.3)
        ax_drift.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        fig.autofmt_xdate()
        fig.tight_layout()
        path = out / f"auc_{_slug(task)}.png"
        fig.savefig(path, dpi=100, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths


def render_report(data: dict[str, Any], timing: dict[str, Any], images: Sequence[str]) -> str:
    """A short Markdown report: the input, a per-task table per configuration, detections, plots."""
    inp = data["input"]
    source = inp.get("log") or f"Kafka topics {', '.join(inp.get('topics', []))}"
    bound = (" An event stamped more than `join.max_future_s` after its Kafka record's timestamp is a dead letter "
             "(`future`), as the live trainer finds it reading the record at that time." if inp.get("kind") == "kafka"
             else "")
    lines = ["# Backtest report", "",
             f"Input: {source}; {data['records']:,} records, {data['events']:,} events. Replayed through the trainer's "
             "pipeline (consumers.core.pipeline) on event time; every prediction was made before the model learnt from "
             f"its sample (prequential).{bound}", "", *_failed_lines(data), *_provenance_lines(data, timing),
             *_comparison_lines(data), *_batching_lines(data)]
    last_key = f"prequential_auc_last_{int(LAST_FRACTION * 100)}pct"
    ranking_last_key = f"ranking_last_{int(LAST_FRACTION * 100)}pct"
    tasks = list(dict.fromkeys(t for c in data["configurations"].values() for t in c["tasks"]))
    lines += ["| configuration | task | prequential AUC (all) | AUC (last 20%) | NDCG@10 (all) | NDCG@10 (last 20%) | "
              "final windowed AUC | final log loss | drift detections |",
              "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for name, c in data["configurations"].items():
            if task not in c["tasks"]:
                continue
            final = c["final"].get(task, {})
            window = next((k for k in final if k.startswith("auc@") and k != "auc@lifetime"), None)
            loss_key = window.replace("auc@", "log_loss@") if window else None
            n_det = ("not watched" if "detections" in final and final["detections"] is None  # not a drift task
                     else sum(1 for d in c["drift_detections"] if d["task"] == task))
            ndcg_all = c.get("ranking", {}).get("ndcg10", {}).get(task)  # absent in summaries written before it
            ndcg_last = c.get(ranking_last_key, {}).get("ndcg10", {}).get(task)
            label = task if task in c.get("served_tasks", c["tasks"]) else f"{task} (auxiliary)"
            # a window longer than the replay holds every sample: say so, or it reads as a recent figure
            unfilled = (f", window not full: all {c['trained_samples']:,} samples" if window and
                        c["trained_samples"] < int(window.split("@", 1)[1]) else "")
            lines.append(f"| {name} | {label} | {_fmt(c['prequential_auc'][task])} | {_fmt(c[last_key][task])} | "
                         f"{_fmt(ndcg_all)} | {_fmt(ndcg_last)} | "
                         f"{_fmt(final.get(window))} ({window}{unfilled}) | {_fmt(final.get(loss_key))} | {n_det} |")
    lines += ["", "NDCG@10: mean over users (those with at least 2 predictions of different relevance) of the NDCG of "
              "the task's prequential scores in the user's top 10, relevance 2·y_task + y_partner (partner: the next "
              "served task, cyclically). Combined score: the product of the served tasks' probabilities (auxiliary "
              "tasks, `model.options.aux_tasks`, are left out); its AUC is against \"every served task positive\", "
              "its NDCG@10 uses the number of positive tasks as relevance.", *_counted_lines(data), "",
              "| configuration | combined AUC (all) | combined AUC (last 20%) | combined NDCG@10 (all) | "
              "combined NDCG@10 (last 20%) |", "|---|---|---|---|---|"]
    for name, c in data["configurations"].items():
        every, last = c.get("ranking", {}).get("combined", {}), c.get(ranking_last_key, {}).get("combined", {})
        lines.append(f"| {name} | {_fmt(every.get('auc'))} | {_fmt(last.get('auc'))} | {_fmt(every.get('ndcg10'))} | "
                     f"{_fmt(last.get('ndcg10'))} |")
    lines += ["", "| configuration | samples | steps | dead letters | late impressions | late feedback | "
              "orphan feedback | evicted |", "|---|---|---|---|---|---|---|---|"]
    for name, c in data["configurations"].items():
        j = c["join"]
        reasons = c.get("dead_letters_by_reason") or {}  # absent in summaries written before it
        by_reason = f" ({', '.join(f'{r} {n:,}' for r, n in reasons.items())})" if reasons else ""
        lines.append(f"| {name} | {c['trained_samples']:,} | {c['steps']:,} | {c['dead_letters']:,}{by_reason} | "
                     f"{j.get('late_impressions', 0):,} | {j.get('late_feedback', 0):,} | "
                     f"{j.get('orphan_feedback', 0):,} | {j.get('evicted_impressions', 0):,} |")
    lines += _gate_lines(data)
    for name, c in data["configurations"].items():
        firsts = {}
        for d in c["drift_detections"]:
            firsts.setdefault((d["task"], d["detector"]), d)
        if firsts:
            lines += ["", f"First drift detections of {name}: " + "; ".join(
                f"{t}/{det} at sample {d['samples']:,} ({_dt(d['event_time_ms']).strftime('%Y-%m-%d %H:%M:%S')} UTC)"
                for (t, det), d in sorted(firsts.items()))]
    cache = timing.get("replay_cache") or {}
    intake = {"process": "; input read, joined and encoded by an intake process while this one trained"
                         + ("; kept in the replay cache" if cache and not cache.get("error") else ""),
              "cache": "; input read from the replay cache", "inline": ""}.get(timing.get("intake", "inline"), "")
    lines += ["", f"Wall time {timing['seconds']} s ({timing['records_per_s']:,} records/s{intake}; timing.json)."]
    lines += _glossary_lines(data, images)
    for image in images:
        lines += ["", f"![{image}]({image})"]
    return "\n".join(lines) + "\n"


def _provenance_lines(data: dict[str, Any], timing: dict[str, Any]) -> list[str]:
    """What was replayed and how to replay it again: the event time of the trained impressions, the code's commit,
    the command, and each configuration's settings that differ from the first's."""
    lines = []
    span = data.get("replayed", {}).get("event_time_ms", {})
    if span.get("first") is not None:
        first, last = _dt(span["first"]), _dt(span["last"])
        lines.append(f"Event time of the trained impressions: {first:%Y-%m-%d %H:%M:%S} to {last:%Y-%m-%d %H:%M:%S} "
                     f"UTC ({(span['last'] - span['first']) / 3_600_000:,.1f} h).")
    code = timing.get("code") or {}
    if code.get("commit"):
        modified = code.get("modified_files") or 0
        lines.append(f"Code: commit `{code['commit'][:12]}`" + (
            f", with {modified} tracked file(s) modified: the commit alone does not reproduce these numbers."
            if modified else " (no tracked file modified)."))
    if timing.get("command"):
        lines += [f"Command (run in `{timing.get('directory', '.')}`):", "", f"    {timing['command']}"]
    # the first configuration given (the comparison's baseline), which may have failed
    first = (data.get("comparison") or {}).get("baseline") or next(iter(data["configurations"]), None)
    differences = data.get("replayed", {}).get("config_differences", {})
    if differences:
        lines += ["", f"Settings of each configuration that differ from the first's (`{first}`), of the "
                  "effective configuration (file, environment and `--set`):", "",
                  f"| configuration | setting | {first} | this one |", "|---|---|---|---|"]
        for name, changed in differences.items():
            lines += [f"| {name} | `{key}` | {_setting(a)} | {_setting(b)} |" for key, (a, b) in changed.items()]
            if not changed:
                lines.append(f"| {name} | (none: the same configuration) | | |")
    groups = data.get("replayed", {}).get("groups", [])
    if len(groups) > 1:
        lines += ["", "Replayed apart (their join or batching settings differ): " + "; ".join(
            ", ".join(g) for g in groups) + ". Each group has its own samples and labels; the comparison below "
            "pairs the samples both trained and says where the labels differ."]
    return [*lines, ""] if lines else []


def _failed_lines(data: dict[str, Any]) -> list[str]:
    """The report's first section when a configuration failed: which, where in the replay, after how much, and why."""
    # lazy: numpy
    from consumers.tools.failures import describe_failure

    failed = data.get("failed")
    if not failed:
        return []
    every = not data["configurations"]
    stopped = ("No configuration could be built, so nothing was replayed." if data["records"] == 0 else
               f"The replay stopped after {data['records']:,} records, when the last one failed.")
    lines = ["## Failed configurations", "",
             (f"**Every configuration failed: there is no result.** {stopped}" if every else
              "These configurations failed part-way (or when they were built, before the replay) and were dropped "
              "from the replay there; the others went on to the end with the same batches (their numbers below are "
              "whole). A failed configuration is in no table below."), ""]
    for name, failure in failed.items():
        lines.append(f"- **`{name}`** failed {describe_failure(failure)}. The whole traceback: "
                     f"`{failure.get('traceback', '')}`.")
    return [*lines, ""]


def _setting(value: Any) -> str:
    return "(not set: the default)" if value is None else f"`{json.dumps(value, default=_json_default)}`"


def _comparison_lines(data: dict[str, Any]) -> list[str]:
    """The paired comparison: a verdict line per configuration against the first, and per task the difference with
    its interval, raw and Holm-adjusted p-values and verdict over every prediction and over the last 20%, for the AUC
    and for the per-user NDCG@10 (``consumers.tools.comparison``)."""
    comparison = data.get("comparison")
    if not comparison:
        return []
    base, method = comparison["baseline"], comparison["method"]
    last = f"last {int(LAST_FRACTION * 100)}%"
    level = f"{method['level']:.0%}"
    adjustment = method.get("adjustment")  # absent in summaries written before it
    tests = adjustment["comparisons"] if adjustment else 0
    family = "the one comparison" if tests == 1 else f"all {tests} comparisons"
    holm = (f"Each difference's p-value (two-sided, normal approximation with the bootstrap's standard error) is "
            f"given raw (p) and adjusted by Holm's step-down method across {family} of this report that are tests "
            f"(p (Holm): AUC and NDCG@10, every task and the combined score, all and {last}; identical and not "
            f"comparable ones are no tests). **better** / **worse** only where the whole "
            f"{level} interval (raw, for that comparison alone) is on one side of 0 **and** the Holm-adjusted p is "
            f"at most {1 - method['level']:.2f}, so the chance that any verdict of the report calls noise a win "
            "stays at most 5%; otherwise *within noise*, however large the difference looks."
            if tests else "No difference of this report is a test: every comparison is identical (the same "
            "predictions) or not comparable, so there is no p-value to adjust and no verdict but those."
            if adjustment else "Each interval is for one task: no correction for multiple comparisons.")
    lines = ["## Which configuration is better", "",
             f"Against `{base}` (the first configuration). Each difference is a configuration's prequential AUC minus "
             f"`{base}`'s on the same samples, paired sample by sample; its {level} interval is from a "
             f"paired block bootstrap ({method['resamples']:,} resamples of {method['blocks']} contiguous blocks of "
             f"the training order, seed {method['seed']}; each resample's AUC to first order, DeLong's placement "
             f"values). {holm} \"all\" includes each model's warm-up from untrained; \"{last}\" is nearer its "
             "steady state.", ""]
    for name, entry in comparison["configurations"].items():
        left = (f" (left out: {entry['only_baseline']:,} samples only `{base}` trained, {entry['only_this']:,} only "
                f"`{name}`)" if entry["only_baseline"] or entry["only_this"] else "")
        lines += [f"- **`{name}` vs `{base}`** on {entry['samples']:,} samples{left}: {entry['summary']}."]
    cells = f"difference ({{}}) | {level} interval | p | p (Holm) | verdict"
    lines += ["", f"| configuration | task | `{base}` AUC | AUC | {cells.format('all')} | {cells.format(last)} |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ndcg = []
    for name, entry in comparison["configurations"].items():
        rows = {**entry["tasks"], **({"combined score": entry["combined"]} if "combined" in entry else {})}
        for task, row in rows.items():
            if "last" not in row:  # not comparable: the labels differ
                lines.append(f"| {name} | {task} | | | | | | | not comparable: {row['why']} | | | | | |")
                continue
            lines.append(f"| {name} | {task} | {_fmt(row['base'])} | {_fmt(row['other'])} | "
                         f"{_difference_cells(row)} | {_difference_cells(row['last'])} |")
            if "ndcg10" in row:
                n = row["ndcg10"]
                ndcg.append(f"| {name} | {task} | {_fmt(n['base'])} | {_fmt(n['other'])} | {n['users']:,} | "
                            f"{_difference_cells(n)} | {_difference_cells(n['last'])} |")
    if ndcg:
        lines += ["", f"Per-user NDCG@10 (relevance as in the tables below): the configuration's minus `{base}`'s, per "
                  "user, averaged over the users that count; its interval is normal over those users (the mean "
                  "difference ± z × the per-user differences' standard deviation / √users); p and the verdict as "
                  "above, in the same Holm family.", "",
                  f"| configuration | task | `{base}` NDCG@10 | NDCG@10 | users | {cells.format('all')} | "
                  f"{cells.format(last)} |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|", *ndcg]
    return [*lines, ""]


def _difference_cells(row: dict[str, Any]) -> str:
    """``+0.0123 | +0.0040 .. +0.0201 | 0.0031 | 0.0124 | **better**`` (five cells: the difference, its interval,
    the raw and the Holm-adjusted p-values, the verdict)."""
    if row.get("difference") is None:
        return f"n/a | | | | {row['verdict']}: {row.get('why', '')}"
    low, high = row["interval"]
    shown = f"**{row['verdict']}**" if row["verdict"] in ("better", "worse") else row["verdict"]
    if row.get("verdict_unadjusted") not in (None, row["verdict"]):  # a raw win the adjustment took back
        shown += f" (raw: {row['verdict_unadjusted']})"
    p_raw, p_holm = row.get("p_value"), row.get("p_holm")
    return (f"{row['difference']:+.4f} | {low:+.4f} .. {high:+.4f} | {_p(p_raw)} | {_p(p_holm)} | {shown}")


def _p(value: float | None) -> str:
    """A p-value in a table: 4 decimals, ``<0.0001`` below, blank where there is none."""
    if value is None:
        return ""
    return "<0.0001" if value < 0.0001 else f"{value:.4f}"


def _glossary_lines(data: dict[str, Any], images: Sequence[str]) -> list[str]:
    """What the series' and plots' names mean, so the report reads without the code."""
    windows = sorted({k.split("@", 1)[1] for c in data["configurations"].values() for row in c["final"].values()
                      for k in row if k.startswith("auc@") and k != "auc@lifetime"}, key=int)
    if not windows:
        return []
    shown = ", ".join(f"{int(w):,}" for w in windows)
    return ["", "Reading the series (`series_<configuration>.csv`) and the plots: `samples` is the number of samples "
            "trained so far, `event_time_ms` the newest trained impression's event time (unix ms, UTC), `steps` the "
            f"optimizer steps. `auc@N` and `log_loss@N` (N = {shown}) are over the last N trained samples' prequential "
            "predictions (before N samples, over all of them: the window is not full yet); `@lifetime` over every "
            "sample so far (the AUC from 65,536 score bins); `auc_drift@N/baseline` is `auc@N` minus the AUC over the "
            "trainer's baseline window (ten times the largest window, `TrainerMetrics.baseline_window`): below 0, "
            "the recent predictions rank worse than the long run's. `detections` counts the drift detectors' alarms "
            "so far (empty: the task is not in `metrics.drift_tasks`)."
            + (" In the plots, each configuration's line has its own marker at each series point." if images else "")]


def _counted_lines(data: dict[str, Any]) -> list[str]:
    """A sentence naming each configuration's counted tasks (``model.options.counted_tasks``), if any has some."""
    counted = {name: c["counted_tasks"] for name, c in data["configurations"].items() if c.get("counted_tasks")}
    if not counted:
        return []
    named = "; ".join(f"`{name}`: {', '.join(tasks)}" for name, tasks in counted.items())
    return ["", f"Counted, not predicted (`model.options.counted_tasks`: each user's and item's rate of their label is "
                f"an input of the model; they have no tower and no row above): {named}."]


def _gate_lines(data: dict[str, Any]) -> list[str]:
    """The trust gate of each gated configuration (models.trust_gate): per task, the steps that distilled, and the
    teacher's and the student's AUC at its last decision; a sentence where a gate never opened."""
    rows, never = [], []
    for name, c in data["configurations"].items():
        for task, gate in c.get("kd_gate", {}).items():
            steps = gate["distilled_steps"] + gate["skipped_steps"]
            rows.append(f"| {name} | {task} | {gate['distilled_steps']:,} of {steps:,} | "
                        f"{_fmt(gate['teacher_auc'])} | {_fmt(gate['student_auc'])} |")
            if steps and not gate["distilled_steps"]:
                never.append(f"{name}/{task}")
    if not rows:
        return []
    lines = ["", "Trust gate (distillation only while the teacher ranks better than the student, over the gate's "
             "window of prequential scores):", "",
             "| configuration | task | steps distilling | teacher AUC | student AUC (at the last decision) |",
             "|---|---|---|---|---|", *rows]
    if never:
        lines += ["", f"The gate never opened for {', '.join(never)}: the teacher never ranked better than the "
                      "student there, so no distillation reached the student (the teacher and its auxiliary "
                      "ranking loss still trained); see docs/method.md for the gate's window and margin."]
    return lines


def _batching_lines(data: dict[str, Any]) -> list[str]:
    """The report's batching header: the mode, per configuration the batch sizes and steps, and the warnings."""
    mode = data.get("batching")
    if mode is None:  # a summary written before the modes existed
        return []
    if mode == "dense":
        said = ("**dense**: batches are cut by `batch_size` only (`max_batch_delay_s` is not used), so the replay "
                "runs as fast as the machine trains; a live trainer at the log's own rate would cut smaller batches "
                "(`--batching event-time`).")
    else:
        said = ("**event-time**: `max_batch_delay_s` runs on the log's event time, so the batches are those a live "
                "trainer makes when the events arrive at the log's own rate (`--batching dense`: batches of "
                "`batch_size` only).")
    lines = [f"Batching: {said} The attribution windows run on event time in both modes.", "",
             "| configuration | batch_size | max_batch_delay_s | steps | mean batch | p50 | p90 |",
             "|---|---|---|---|---|---|---|"]
    for name, c in data["configurations"].items():
        b = c["batching"]
        delay = "not used" if b["max_batch_delay_s"] is None else f"{b['max_batch_delay_s']:g} s (event time)"
        mean = "n/a" if b["mean"] is None else f"{b['mean']:g}"
        lines.append(f"| {name} | {b['batch_size']} | {delay} | {b['batches']:,} | {mean} | {b['p50']} | {b['p90']} |")
    lines.append("")
    for warning in data.get("warnings", []):
        lines += [f"> **Warning**: {warning}.", ""]
    return lines


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def _finite(value: float) -> float | None:
    """None for nan (summary.json has no NaN), else the float."""
    return None if math.isnan(value) else float(value)


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")

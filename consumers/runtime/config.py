"""Configuration of the daemons: one TOML file, then environment overrides, then flag overrides.

The schema is a tree of dataclasses; every field has a type, a default and a one-line help text, so that
``crossdistil train --check-config`` can print the effective configuration and the README can carry a reference
generated from the schema (:func:`reference_markdown`).

Precedence, lowest first:

1. the defaults below;
2. the file (``--config FILE``, TOML; sections as in the schema, e.g. ``[join]``);
3. environment variables ``CROSSDISTIL__SECTION__KEY=value`` (double underscores; values parsed as TOML
   values where they parse, else taken as strings), e.g. ``CROSSDISTIL__KAFKA__BOOTSTRAP=broker:9092``;
4. flags ``--set section.key=value`` (same value syntax), e.g. ``--set batching.batch_size=512``.

>>> cfg = load_config(None, env={}, overrides=["batching.batch_size=512"])
>>> cfg.batching.batch_size
512
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer.kafka_settings import COMPRESSIONS, MECHANISMS, PROTOCOLS, SecurityError, client_security

ENV_PREFIX = "CROSSDISTIL__"
WARM_START_STREAMS = ("resume", "fresh")  # checkpoint.warm_start_stream
# Several ranks warm-start the model only: a one-trainer checkpoint's cut holds every partition's join state in one
# (checked before the ranks start, crossdistil train, and by each rank, consumers.trainer.checkpointing).
WARM_START_RANKS_RESUME = ("checkpoint.warm_start with several ranks starts the model from the checkpoint's weights "
                           "only: set checkpoint.warm_start_stream = \"fresh\" (every rank's partitions start from "
                           "their beginning, or from --from-time); resuming a stream cut is for one trainer")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class KafkaConfig:
    bootstrap: str = _f("127.0.0.1:9092", "Kafka bootstrap servers, comma-separated host:port (an IPv6 address in "
                                          "brackets: [::1]:9092)")
    group_id: str = _f("crossdistil-trainer", "consumer group of the trainer (offsets are also committed here for lag "
                                              "monitoring)")
    impressions_topic: str = _f("impressions", "topic of impression events")
    feedback_topic: str = _f("feedback", "topic of feedback events")
    model_topic: str = _f("model-updates", "serving topic the trainer publishes checkpoints to (compacted)")
    dead_letter_topic: str = _f("dead-letters", "topic that receives every event failing decoding or validation")
    # 30.0 is streamer.topics.DEAD_LETTER_RETENTION_DAYS (not imported: the configuration loads without kafka-python)
    dead_letter_retention_days: float = _f(30.0, "the trainer makes a missing kafka.dead_letter_topic at start with "
                                                 "its input topics' partition count and this retention (Kafka's "
                                                 "default is 7 days); -1 = forever. An existing topic is left as it is")
    poll_timeout_ms: int = _f(200, "poll timeout; short so the stop flag is checked often")
    max_poll_records: int = _f(2000, "records per poll; bounded so one poll plus one step stays far below "
                                     "max_poll_interval_ms")
    max_poll_interval_ms: int = _f(300000, "kafka-python max_poll_interval_ms")
    group_instance_id: str = _f("auto", "static group membership (KIP-345): a restarted trainer gets its partitions "
                                        "back at once instead of after the session timeout (45 s by default); auto = "
                                        "'<group_id>-trainer', empty = dynamic membership. A second trainer started "
                                        "with the same id takes over and the first exits with status 5")
    stall_exit_s: float = _f(300.0, "the trainer checkpoints and exits with status 4 when it has had no partition "
                                    "assigned for this long (a stuck group join, a broker gone for good), so a "
                                    "supervisor restarts it; 0 = wait forever")
    compression: str = _f("lz4", "compression of the record batches the trainer produces (published checkpoints, "
                                 "dead letters): none, gzip, snappy, lz4 or zstd; lz4 about halves a default "
                                 "model's publication (its count and wide tables are mostly zeros) for ~0.1 s of CPU "
                                 "(docs/serving.md)")
    client_options: dict = _f({}, "extra kafka-python client settings passed through as is (e.g. ssl_certfile, "
                                  "sasl_kerberos_service_name)")
    security_protocol: str = _f("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, for every client of the "
                                             "daemon")
    sasl_mechanism: str = _f("PLAIN", "SASL mechanism: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str = _f("", "SASL user name (the password comes from the environment variable password_env)")
    password_env: str = _f("CROSSDISTIL_KAFKA_PASSWORD", "environment variable holding the SASL password; a "
                                                          "password is never read from a file")
    ssl_cafile: str = _f("", "PEM file of the CA that signed the brokers' certificates (empty: the system's CAs)")


@dataclass
class JoinSection:
    attribution_window_s: dict = _f({}, "per-task attribution window in event-time seconds, e.g. {click = 60, "
                                        "long_view = 3600}; tasks not listed use default_window_s. It may name "
                                        "tasks outside model.tasks (one table for a data set's outcomes) only if it "
                                        "names every task of model.tasks (else a misspelt task is refused): their "
                                        "feedback is left out on purpose (counted as ignored_task_feedback, not as "
                                        "unknown)")
    default_window_s: float = _f(3600.0, "window of tasks not listed in attribution_window_s")
    allowed_lateness_s: float = _f(0.0, "how far behind the newest event time the watermark trails")
    max_pending: int = _f(1_000_000, "bound on pending impressions; beyond it the oldest are emitted early and counted")
    idle_timeout_s: float = _f(30.0, "a partition the consumer has read to its end and that delivered nothing for "
                                     "this long stops holding the watermark back (0 = never)")
    max_future_s: float = _f(3600.0, "trainer: an event stamped more than this many seconds after the trainer's wall "
                                     "clock is a dead letter (reason future): one producer with a clock ahead (or a "
                                     "time zone taken for UTC) would otherwise move the watermark and close every "
                                     "pending impression's windows without its labels; 0 = no bound (a backtest "
                                     "of a topic range bounds by each record's Kafka timestamp; of an event log, "
                                     "by none)")
    max_skew_s: float = _f(0.0, "trainer: a partition more than this many event-time seconds ahead of the watermark "
                                "is paused until the others catch up, so a backlog is read evenly in event time and "
                                "the join holds little early feedback (flat memory replaying envelopes; ~40% fewer "
                                "events/s with single-event messages, docs/performance.md); -1 = the longest "
                                "attribution window, 0 = never pause")


@dataclass
class BatchingConfig:
    batch_size: int = _f(256, "samples per training step")
    max_batch_delay_s: float = _f(5.0, "a partial batch is trained once its oldest sample has waited this long (the "
                                       "live trainer cuts it earlier by its recent step time, so the step is done "
                                       "within it)")


@dataclass
class CheckpointConfig:
    dir: str = _f("runs/trainer/checkpoints", "where checkpoints are written (atomically)")
    every_steps: int = _f(500, "checkpoint every N training steps (0 = off)")
    every_s: float = _f(300.0, "checkpoint every T seconds of wall time (0 = off)")
    keep_last: int = _f(3, "how many checkpoints to keep on disk")
    warm_start: str = _f("", "a new model (checkpoint.dir holds no checkpoint yet) starts from the weights of this "
                             "checkpoint file, or of the newest verified checkpoint in this folder, wherever they "
                             "still fit (tasks and features kept, the backbone, ...: a structural change of "
                             "model.options, docs/operations.md); optimizers start fresh; ignored once "
                             "checkpoint.dir holds a checkpoint; empty = a new model from scratch (crossdistil train "
                             "--warm-start PATH)")
    warm_start_stream: str = _f("resume", "where a warm-started trainer reads the topics from: resume = on from the "
                                          "old checkpoint's cut (its positions, pending impressions and partial "
                                          "batch: no event lost or trained twice; the same topics); fresh = as a new "
                                          "trainer, every partition from its beginning or from --from-time")


@dataclass
class PublishConfig:
    enabled: bool = _f(True, "publish the serving view of each checkpoint to the serving topic")
    chunk_bytes: int = _f(900_000, "chunk size of a published checkpoint (below the topic's max.message.bytes; "
                                   "16384 to 16711680)")
    onnx: bool = _f(False, "also publish the students as an ONNX graph (models.onnx_export, docs/features.md): "
                           "the model runs in onnxruntime without this code; about doubles the published bytes")


@dataclass
class MetricsConfig:
    bind: str = _f("127.0.0.1", "address of the /metrics and /healthz HTTP endpoints")
    port: int = _f(9400, "port of the /metrics and /healthz HTTP endpoints (0 = off)")
    windows: list = _f([10_000, 100_000], "sample windows of the windowed AUC")
    drift_ph_threshold: float = _f(400.0, "Page-Hinkley: cumulative excess per-sample log loss (nats) that counts as "
                                          "a drift; lower detects milder drifts sooner, with more false alarms (on a "
                                          "stationary stream, per million samples: 400 -> 0-1, 200 -> 1-3, 100 -> "
                                          "4-15)")
    drift_adwin_delta: float = _f(0.0002, "ADWIN confidence delta on the per-sample log loss; larger detects milder "
                                          "changes, with more false alarms (0.002 fired once on KuaiRand-Pure, "
                                          "docs/monitoring.md)")
    drift_ph_delta: float = _f(0.1, "Page-Hinkley: rise of the loss (nats, over means of 8 samples) tolerated before "
                                    "it accumulates toward drift_ph_threshold; a drift that raises the loss by less "
                                    "never fires, so lower it (with drift_ph_threshold) to catch mild drifts, at the "
                                    "cost of more false alarms")
    drift_auc_drop: float = _f(0.05, "AUC-drop detector: fires when a task's AUC over the last drift_auc_window "
                                     "samples is this many AUC points below its AUC over the drift_auc_reference "
                                     "samples before them (and the fall exceeds drift_auc_z standard errors); lower "
                                     "catches smaller drops, with more false alarms (docs/monitoring.md)")
    drift_auc_window: int = _f(5_000, "AUC-drop detector: samples of the recent window (whole thousands); shorter "
                                      "detects sooner, with more noise")
    drift_auc_reference: int = _f(20_000, "AUC-drop detector: samples before the recent window that it is compared "
                                          "with (whole thousands)")
    drift_auc_z: float = _f(4.0, "AUC-drop detector: noise guard, in standard errors of the difference of the two "
                                 "AUCs; a rare task's AUC is noisy, so its fall must be larger (0 = off)")
    drift_tasks: list = _f([], "tasks the drift detectors watch (empty = every task of model.tasks but those of "
                               "model.options.aux_tasks: a very rare task's detectors fire on noise)")


@dataclass
class ModelSection:
    tasks: list = _f(["click", "long_view"], "tasks to learn, by the name used in feedback events")
    options: dict = _f({}, "model options passed to models.config.ModelConfig (backbone, rung, sizes, learning rates, "
                           "...)")
    device: str = _f("auto", "torch device: auto (cuda when available), cpu or cuda[:N]")
    seed: int = _f(0, "seed of the model and of every sampling step")
    separate_process: bool = _f(False, "train in a learner process of its own, overlapping with Kafka intake and the "
                                       "join (docs/performance.md)")
    cuda_graphs: bool = _f(False, "on a CUDA device, replay the step of every full-size batch as one CUDA graph "
                                  "(models/graphs.py); partial batches run as plain steps; one trainer only")

    @property
    def served_tasks(self) -> list[str]:
        """``tasks`` less ``options.aux_tasks`` (``models.config.ModelConfig.served_tasks``, read without a model)."""
        aux = self._option_names("aux_tasks")
        return [t for t in self.tasks if t not in aux]

    @property
    def learnt_tasks(self) -> list[str]:
        """``tasks`` less ``options.counted_tasks`` (``models.config.ModelConfig.learnt_tasks``): the tasks the model
        predicts, so the ones its metrics, ledger and reports show."""
        counted = self._option_names("counted_tasks")
        return [t for t in self.tasks if t not in counted]

    @property
    def counted_tasks(self) -> list[str]:
        """The tasks of ``options.counted_tasks``, in task order: joined and counted, never predicted."""
        counted = self._option_names("counted_tasks")
        return [t for t in self.tasks if t in counted]

    def _option_names(self, key: str) -> set[str]:
        """An option naming tasks, as a list or a command line's comma string (``models.config._names``)."""
        names = self.options.get(key) or ()
        return {a.strip() for a in names.split(",")} if isinstance(names, str) else set(names)


@dataclass
class DistributedSection:
    mode: str = _f("sync", "several trainer ranks (torchrun, docs/scaling.md): sync = every rank steps together, "
                           "gradients averaged (replicas identical); average = each rank steps alone, parameters "
                           "averaged every average_every_steps steps or average_every_s seconds")
    average_every_steps: int = _f(16, "average mode: average the replicas after this many steps of any rank (0 = off)")
    average_every_s: float = _f(5.0, "average mode: average the replicas at least this often (0 = off)")
    global_batch: bool = _f(False, "sync mode: true = batching.batch_size is the batch of all ranks together (each "
                                   "rank cuts batch_size / ranks: one trainer's steps, and no faster on CPU); false = "
                                   "each rank cuts a whole batch_size (docs/scaling.md compares them)")
    timeout_s: float = _f(120.0, "a rank that cannot reach the others for this long exits (status 8) instead of "
                                 "hanging; `crossdistil train --world-size` then restarts the group (docs/scaling.md)")
    poll_timeout_ms: int = _f(20, "poll timeout of each rank: the ranks meet once per poll, so a rank with nothing to "
                                  "read holds the others back at most this long")
    backend: str = _f("auto", "torch.distributed backend: auto (nccl for a CUDA model, else gloo), gloo or nccl")


@dataclass
class ServingSection:
    bind: str = _f("127.0.0.1", "address of the serving daemon's HTTP endpoints (/score, /healthz, /metrics)")
    port: int = _f(9401, "port of the serving daemon's HTTP endpoints (0 = a free port, printed on start)")
    max_request_bytes: int = _f(4_194_304, "largest POST /score body in bytes; larger requests get 413")
    max_items: int = _f(10_000, "most impressions in one POST /score; more get 413")
    torch_threads: int = _f(1, "torch intra-op threads for scoring (0 = torch's choice); 1 is fastest with concurrent "
                               "requests on few cores")
    max_checkpoint_bytes: int = _f(1 << 30, "largest checkpoint payload accepted from the serving topic (memory bound "
                                            "of reassembly)")
    device: str = _f("cpu", "torch device that scores: cpu, cuda[:N] or auto")
    batch_window_ms: float = _f(2.0, "concurrent /score requests arriving within this many ms are scored in one "
                                     "forward pass (the wait happens only while other requests are being read)")
    max_queued: int = _f(64, "/score requests read or waiting to be scored; beyond, 503 with Retry-After")
    max_connections: int = _f(512, "open HTTP connections; a request on one beyond gets 503 with Retry-After")
    backlog: int = _f(1024, "listen backlog of the HTTP socket (capped by net.core.somaxconn)")
    header_timeout_s: float = _f(10.0, "request line and headers must arrive within this (408 otherwise)")
    body_timeout_s: float = _f(30.0, "a request body must arrive within this after its headers (408 otherwise)")
    keep_alive_s: float = _f(5.0, "an idle keep-alive connection is closed after this")
    write_timeout_s: float = _f(10.0, "a connection whose client does not take its answer within this is dropped")
    workers: int = _f(1, "serving processes on one port (SO_REUSEPORT), each following the topic with its own model "
                         "copy (docs/serving.md, 'Workers')")


@dataclass
class Config:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    join: JoinSection = field(default_factory=JoinSection)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    model: ModelSection = field(default_factory=ModelSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    serving: ServingSection = field(default_factory=ServingSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the effective configuration (published in checkpoint manifests)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _parse_scalar(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(path: str, value: Any, typ: Any) -> Any:
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if origin is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{path}: expected a table, got {value!r}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):  # "a,b" from an env var or flag
            return [_parse_scalar(v.strip()) for v in value.split(",") if v.strip()]
        raise ConfigError(f"{path}: expected a list, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, data: Mapping[str, Any], prefix: str = "") -> None:
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{path}: unknown key (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{path}: expected a table [{path}], got {value!r}")
            _apply(current, value, prefix=f"{path}.")
        elif isinstance(current, dict) and isinstance(value, Mapping):
            # Tables merge key by key, so CROSSDISTIL__KAFKA__CLIENT_OPTIONS__SASL_PLAIN_PASSWORD adds the secret
            # to the file's client options instead of replacing them all.
            setattr(obj, key, {**current, **_coerce(path, value, hints[key])})
        else:
            setattr(obj, key, _coerce(path, value, hints[key]))


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"{dotted}: expected section.key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a table")
    node[parts[-1]] = value


def _validate(cfg: Config) -> None:
    if not cfg.model.tasks:
        raise ConfigError("model.tasks: at least one task is needed")
    _check_finite(cfg)
    _check_ranges(cfg)
    _check_windows(cfg)
    _check_bootstrap(cfg.kafka.bootstrap)
    if not cfg.checkpoint.dir.strip():
        raise ConfigError("checkpoint.dir: empty; name the folder checkpoints are written to")
    if cfg.checkpoint.warm_start_stream not in WARM_START_STREAMS:
        raise ConfigError(f"checkpoint.warm_start_stream: one of {', '.join(WARM_START_STREAMS)}, got "
                          f"{cfg.checkpoint.warm_start_stream!r}")
    if not 0 < cfg.metrics.drift_auc_drop < 1 or cfg.metrics.drift_auc_z < 0:
        raise ConfigError(f"metrics.drift_auc_drop: must be in (0, 1) AUC points (and drift_auc_z >= 0), got "
                          f"{cfg.metrics.drift_auc_drop} (z {cfg.metrics.drift_auc_z})")
    if min(cfg.metrics.drift_auc_window, cfg.metrics.drift_auc_reference) < 1000:
        raise ConfigError("metrics.drift_auc_window and metrics.drift_auc_reference: at least 1000 samples, got "
                          f"{cfg.metrics.drift_auc_window} and {cfg.metrics.drift_auc_reference}")
    unknown = [t for t in cfg.metrics.drift_tasks if t not in cfg.model.learnt_tasks]
    if unknown:
        raise ConfigError(f"metrics.drift_tasks: {unknown} are not tasks of model.tasks {list(cfg.model.tasks)} that "
                          "the model predicts (model.options.counted_tasks predict nothing)")
    if not 0 < cfg.metrics.drift_adwin_delta < 1:
        raise ConfigError(f"metrics.drift_adwin_delta: must be between 0 and 1, got {cfg.metrics.drift_adwin_delta}")
    if cfg.kafka.compression not in COMPRESSIONS:
        raise ConfigError(f"kafka.compression: one of {', '.join(COMPRESSIONS)}, got {cfg.kafka.compression!r}")
    if cfg.kafka.security_protocol.upper() not in PROTOCOLS:
        raise ConfigError(f"kafka.security_protocol: one of {', '.join(PROTOCOLS)}, "
                          f"got {cfg.kafka.security_protocol!r}")
    if cfg.kafka.sasl_mechanism.upper() not in MECHANISMS:
        raise ConfigError(f"kafka.sasl_mechanism: one of {', '.join(MECHANISMS)}, got {cfg.kafka.sasl_mechanism!r}")
    d = cfg.distributed
    if d.mode not in ("sync", "average"):
        raise ConfigError(f"distributed.mode: sync or average, got {d.mode!r}")
    if d.backend not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"distributed.backend: auto, gloo or nccl, got {d.backend!r}")


def _check_finite(cfg: Config) -> None:
    """No setting is NaN or infinite (``nan < 0`` is false, so a range check alone lets NaN through)."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}: must be a finite number, got {value}")


# The bytes of a published chunk: each is one Kafka record with ~300 bytes of header (docs/wire-format.md), so tiny
# chunks multiply records for nothing; the trainer's producer sends at most 16 MiB a request (kafka_io.connect).
CHUNK_BYTES = (16 * 1024, 16 * 1024 * 1024 - 64 * 1024)


def _check_ranges(cfg: Config) -> None:
    """Every number within its range (each key's help text says what 0 means where 0 is allowed)."""
    k, j, c, m, d = cfg.kafka, cfg.join, cfg.checkpoint, cfg.metrics, cfg.distributed
    positive = {
        "batching.batch_size": cfg.batching.batch_size, "join.max_pending": j.max_pending,
        "checkpoint.keep_last": c.keep_last, "kafka.max_poll_records": k.max_poll_records,
        "kafka.max_poll_interval_ms": k.max_poll_interval_ms, "metrics.drift_ph_threshold": m.drift_ph_threshold,
        "distributed.timeout_s": d.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    zero_or_more = {  # key: (value, what 0 means where it means something of its own)
        "kafka.poll_timeout_ms": (k.poll_timeout_ms, ""), "kafka.stall_exit_s": (k.stall_exit_s, "0 = never"),
        "join.default_window_s": (j.default_window_s, ""), "join.allowed_lateness_s": (j.allowed_lateness_s, ""),
        "join.idle_timeout_s": (j.idle_timeout_s, "0 = never"), "join.max_future_s": (j.max_future_s, "0 = no bound"),
        "batching.max_batch_delay_s": (cfg.batching.max_batch_delay_s, ""),
        "checkpoint.every_steps": (c.every_steps, "0 = off"), "checkpoint.every_s": (c.every_s, "0 = off"),
        "metrics.drift_ph_delta": (m.drift_ph_delta, ""), "distributed.poll_timeout_ms": (d.poll_timeout_ms, ""),
        "distributed.average_every_steps": (d.average_every_steps, "0 = off"),
        "distributed.average_every_s": (d.average_every_s, "0 = off"),
    }
    for key, (value, zero) in zero_or_more.items():
        if value < 0:
            raise ConfigError(f"{key}: must be >= 0{f' ({zero})' if zero else ''}, got {value}")
    if k.dead_letter_retention_days <= 0 and k.dead_letter_retention_days != -1:
        raise ConfigError(f"kafka.dead_letter_retention_days: expected days > 0 or -1 (forever), got "
                          f"{k.dead_letter_retention_days}")
    if j.max_skew_s < 0 and j.max_skew_s != -1:
        raise ConfigError(f"join.max_skew_s: expected seconds >= 0 or -1, got {j.max_skew_s}")
    if not CHUNK_BYTES[0] <= cfg.publish.chunk_bytes <= CHUNK_BYTES[1]:
        raise ConfigError(f"publish.chunk_bytes: must be {CHUNK_BYTES[0]}..{CHUNK_BYTES[1]} bytes (each chunk is one "
                          f"Kafka record of at most 16 MiB), got {cfg.publish.chunk_bytes}")
    if not 0 <= m.port <= 65535:
        raise ConfigError(f"metrics.port: must be 0..65535 (0 = off), got {m.port}")
    if not m.windows or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in m.windows):
        raise ConfigError(f"metrics.windows: a list of sample counts > 0, got {m.windows!r}")


def _check_windows(cfg: Config) -> None:
    """Every attribution window is seconds >= 0. A table may name tasks outside ``model.tasks`` (one table for all
    the outcomes of a data set, ``model.tasks`` picking some), but only when it gives each task of ``model.tasks`` a
    window of its own: otherwise a name outside the tasks is most likely a misspelt one, whose task silently falls
    back to ``default_window_s``. Auxiliary and counted tasks (``model.options``) are tasks of ``model.tasks``."""
    windows, tasks = cfg.join.attribution_window_s, list(cfg.model.tasks)
    for task, window in windows.items():
        if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window < math.inf:
            raise ConfigError(f"join.attribution_window_s.{task}: expected seconds >= 0, got {window!r}")
    unknown = [t for t in windows if t not in tasks]
    without = [t for t in tasks if t not in windows]
    if unknown and without:
        raise ConfigError(f"join.attribution_window_s: {unknown} are not tasks of model.tasks {tasks}, and "
                          f"{without} have no window of their own (they use join.default_window_s = "
                          f"{cfg.join.default_window_s:g} s): a misspelt task? Name each task of model.tasks, or "
                          "leave out the others")


def _check_bootstrap(bootstrap: str) -> None:
    """``kafka.bootstrap``: comma-separated HOST:PORT with a port of 1..65535; an IPv6 address in brackets
    (``[::1]:9092``); a ``PROTOCOL://`` prefix is allowed (kafka-python drops it)."""
    example = "e.g. 127.0.0.1:9092 or broker1:9092,broker2:9092 ([::1]:9092 for IPv6)"
    if not bootstrap.strip():
        raise ConfigError(f"kafka.bootstrap: empty; expected HOST:PORT, {example}")
    for server in bootstrap.split(","):
        address = re.sub(r"^[A-Za-z_]+://", "", server.strip())
        if address.startswith("["):
            host, bracket, port = address[1:].partition("]")
            port = port[1:] if bracket and port.startswith(":") else ""
        else:
            host, _, port = address.rpartition(":")
            if ":" in host:
                raise ConfigError(f"kafka.bootstrap: {server.strip()!r}: an IPv6 address goes in brackets, "
                                  f"[{host}]:{port}")
        if not host or not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"kafka.bootstrap: {server.strip()!r} is not HOST:PORT with a port of 1..65535, "
                              f"{example}")


# What a daemon's "Kafka is not reachable" message suggests besides the broker's own address (connection_failure).
BOOTSTRAP_HINT = "or set kafka.bootstrap (--set kafka.bootstrap=HOST:PORT)"


def kafka_client_options(k: KafkaConfig, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every setting a kafka-python client of the daemon gets besides its own: ``client_options``, then the
    security settings (``streamer.kafka_settings``, the password from ``password_env``). Raises ConfigError
    saying what is missing (a SASL user, the password variable, the CA file)."""
    try:
        security = client_security(k.security_protocol, k.sasl_mechanism, k.sasl_username, k.ssl_cafile,
                                   k.password_env, env)
    except SecurityError as exc:
        raise ConfigError(f"[kafka] security: {exc}") from None
    # Bootstrap fails within seconds (a wrong password, a wrong listener) instead of kafka-python's 30 s.
    return {"bootstrap_timeout_ms": 10_000, **k.client_options, **security}


def add_config_arguments(parser: Any, example_file: str, set_example: str) -> None:
    """The configuration flags every daemon takes: ``--config FILE``, ``--set SECTION.KEY=VALUE`` (repeatable,
    into ``overrides``) and ``--check-config``; ``parser`` is an ``argparse.ArgumentParser``."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML configuration (see {example_file})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one configuration value (repeatable), e.g. --set {set_example}")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print the effective one as TOML and exit")


def load_config(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
) -> Config:
    """Build the effective configuration: defaults < file < environment < ``--set`` overrides."""
    cfg = Config()
    if path is not None:
        try:
            _apply(cfg, _read_file(Path(path)))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path})") from None
    layered: dict[str, Any] = {}
    sources: dict[str, str] = {}  # dotted key -> where it was set, for errors
    for key, raw in (os.environ if env is None else env).items():
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            sources[dotted] = f"environment variable {key}"
            _set_path(layered, dotted, _parse_scalar(raw))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        sources[dotted.strip()] = f"--set {item}"
        _set_path(layered, dotted.strip(), _parse_scalar(raw.strip()))
    try:
        _apply(cfg, layered)
    except ConfigError as exc:
        raise ConfigError(_with_source(str(exc), sources)) from None
    _validate(cfg)
    return cfg


def _with_source(message: str, sources: Mapping[str, str]) -> str:
    """A ConfigError's ``message`` ("<key>: ...") naming where that key was set: the environment variables and
    ``--set`` overrides (``sources``, dotted key -> source) of it, of a table holding it or of keys inside it.

    >>> _with_source("batchin: unknown key", {"batchin.batch_size": "environment variable CROSSDISTIL__BATCHIN__..."})
    'batchin: unknown key (set by environment variable CROSSDISTIL__BATCHIN__...)'
    """
    key = message.split(":", 1)[0]
    found = [source for dotted, source in sources.items()
             if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".")]
    return f"{message} (set by {'; '.join(found)})" if found else message


def _read_file(p: Path) -> dict[str, Any]:
    """The TOML table of the configuration file ``p``; a ConfigError naming it when it cannot be one."""
    if p.is_dir():
        raise ConfigError(f"configuration file {p} is a directory, not a TOML file")
    if not p.exists():
        raise ConfigError(f"configuration file {p} does not exist")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale says
    except UnicodeDecodeError as exc:
        raise ConfigError(f"configuration file {p} is not UTF-8 (at byte offset {exc.start}: "
                          f"{exc.object[exc.start]:#04x}); TOML files are UTF-8: convert it, e.g. with iconv -t UTF-8"
                          ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"configuration file {p} cannot be read: {exc.strerror}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """The configuration ``Config.to_dict()`` describes (validated again): how a child process gets it."""
    cfg = Config()
    _apply(cfg, data)
    _validate(cfg)
    return cfg


def toml_value(value: Any) -> str:
    """A TOML literal of a plain value (inline tables for dicts; keys quoted unless bare).

    >>> toml_value({"rung": "river_lr", "river.l2": 0.5, "dims": [8, 4], "on": True})
    '{rung = "river_lr", "river.l2" = 0.5, dims = [8, 4], on = true}'
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def _toml_key(key: str) -> str:
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else json.dumps(key)


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML (what ``--check-config`` prints; it loads back to the same values)."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            lines.append(f"{f.name} = {toml_value(getattr(getattr(cfg, section.name), f.name))}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """A Markdown table of every key, its type, default and meaning, generated from the schema."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    cfg = Config()
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            typ = getattr(hints[f.name], "__name__", str(hints[f.name]))
            default = toml_value(getattr(obj, f.name))
            rows.append(f"| `{section.name}.{f.name}` | {typ} | `{default}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def model_options_markdown() -> str:
    """A Markdown table of the ``[model.options]`` keys: the fields of ``models.config.ModelConfig``."""
    from models.config import ModelConfig, retunable  # lazy: torch loads only when the reference is printed

    rows = ["| `model.options` key | default | on restart (docs/operations.md) |", "|---|---|---|"]
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("tasks", "seed"):  # set by model.tasks and model.seed
            continue
        value = getattr(defaults, f.name)
        shown = value.to_dict() if hasattr(value, "to_dict") else list(value) if isinstance(value, tuple) else value
        rows.append(f"| `{f.name}` | `{toml_value(shown)}` | {'retunable' if retunable(f.name) else 'structural'} |")
    rows.append("| `rung = \"river_lr\" \\| \"river_fm\"` | the river online baseline instead of CrossDistil; "
                "its options as `\"river.KEY\" = value` | structural |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m consumers.runtime.config: the reference of README.md#configuration-reference
    print(reference_markdown())
    print()
    print(model_options_markdown())

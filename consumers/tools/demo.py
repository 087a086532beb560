"""``crossdistil demo``: the whole pipeline on this machine, with a live terminal view.

What it runs, each in its own process group, everything under one run folder (``runs/demo-<timestamp>/`` by
default, ``--out``)::

    Kafka (a fresh single-node broker, data in RUN/kafka, a free port)
    crossdistil train  --config RUN/trainer.toml    (checkpoints in RUN/checkpoints, /metrics on a free port)
    crossdistil serve  --config RUN/serving.toml    (one replica, /metrics on a free port)
    prometheus         --config.file RUN/prometheus.yml   (when the binary is installed; alert rules included)
    crossdistil stream --dataset kuairand|synthetic --to kafka://... --speed FACTOR

Every second it scrapes the trainer's and the serving replica's ``/metrics`` and shows per-task windowed AUC,
AUC drift, throughput, lag and the model versions (``rich.live.Live`` on a terminal; a plain line every few
seconds otherwise); with trust-gated distillation also, per task, whether the student learns from its teacher
now and the gate's teacher and student AUC. It ends on Ctrl-C / SIGTERM, or by itself at the end of the stream
once the trainer has read everything (consumer lag 0 and no new event for a few seconds). Then it stops the
streamer, the trainer (SIGTERM: it writes and publishes a final checkpoint), serving, Prometheus and the broker
(unless ``--keep-kafka``), each with a deadline and SIGKILL after it, and prints where the checkpoints, logs
and metrics are. Children are stopped on every exit path: ``finally``, ``atexit``, signal handlers, and on Linux
the kernel's parent-death signal if the demo itself is killed.

The run folder::

    demo.json            pids, ports and paths of everything the demo started (rewritten as it changes)
    trainer.toml, serving.toml, prometheus.yml     the generated configurations
    logs/                stream.log, trainer.log, serving.log, prometheus.log
    checkpoints/         the trainer's checkpoints
    kafka/               the broker's data dir (broker.log, broker.pid)
    prometheus/          Prometheus' TSDB
    metrics/             the last scrape of each daemon (trainer.prom, serving.prom)

Exit status: 0 when the demo ended (end of stream, Ctrl-C or SIGTERM) and everything stopped; 1 when a part
failed (its log is quoted); 2 for a usage error found before anything started (e.g. a missing ``--source``).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from consumers.runtime.config import load_config, to_toml
from consumers.runtime.processes import die_with_parent
from streamer.stream import StreamError, parse_speed

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_KUAIRAND = REPO_ROOT.parent / "shared" / "data" / "kuairand"
DEMO_CONFIG_DIR = REPO_ROOT / "deploy" / "demo"
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"

# KuaiRand spans 14 days (2022-04-07 15:44 to 04-21 15:51 UTC): at 4000x that is ~5 minutes. The synthetic
# stream has 100 impressions per second of event time: at 5x that is 500 impressions/s (4 minutes for 120,000),
# slow enough that the drift's fall and recovery last tens of seconds on screen and in Prometheus.
DEFAULT_SPEED = {"kuairand": "4000", "synthetic": "5"}
DEFAULT_SYNTHETIC_EVENTS = 120_000
# The synthetic demo's world and drift (streamer/datasets/synthetic.py): few users and items and strong factors, so
# the model reaches AUC ~0.73 before the drift; a drift of magnitude 0.75 then drops the click AUC to ~0.5, which
# every detector and both quality alerts catch within 20k samples (tests/integration/test_drift_detection.py).
SYNTHETIC_WORLD = {"tasks": "click,like", "n_users": "200", "n_items": "500", "scale": "6",
                   "delay_median_s": "2,10", "max_delay_s": "120"}
DEFAULT_DRIFT = {"type": "abrupt", "magnitude": 0.75, "tasks": "click"}
DRIFT_TYPES = ("abrupt", "gradual", "recurring", "none")
# The demo compresses time: its Prometheus evaluates the quality alerts (group crossdistil-quality) with every
# duration divided by this, so "10 minutes below -0.05" becomes 10 s (5,000 samples at the synthetic default).
# The pipeline alerts keep their durations: a replayed stream's event time is old, which they would flag.
DEMO_ALERT_TIME_SCALE = 60
DEMO_SCALED_GROUPS = ("crossdistil-quality",)
QUALITY_ALERTS = ("CrossdistilAucDrop", "CrossdistilDriftDetected")  # shown in the view's timeline
STOP_TIMEOUT_S = {"stream": 10.0, "trainer": 60.0, "serving": 15.0, "prometheus": 15.0}
CAUGHT_UP_QUIET_S = 3.0      # end of stream: no new event for this long and consumer lag 0 -> the trainer is done
DRAIN_TIMEOUT_S = 180.0      # ... or give up waiting after this long and stop it anyway
PLAIN_EVERY_S = 5.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class DemoError(RuntimeError):
    """A part of the demo failed; the message says which and where its log is."""


class StopRequested(BaseException):
    """Ctrl-C / SIGTERM while the demo was starting up (a BaseException, like KeyboardInterrupt)."""


# ----------------------------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crossdistil demo`` flags."""
    parser.add_argument("--dataset", default="kuairand", choices=("kuairand", "synthetic"),
                        help="what to stream: KuaiRand, or the synthetic stream with an abrupt drift of one task "
                             "halfway through (default: %(default)s)")
    parser.add_argument("--source", default=None,
                        help=f"KuaiRand file or folder (default: {DEFAULT_KUAIRAND}); ignored for synthetic")
    parser.add_argument("--speed", default=None,
                        help="event time runs FACTOR times faster than wall time, 'realtime' (1x), or 'max' "
                             f"(unpaced) (default: {DEFAULT_SPEED['kuairand']} for KuaiRand, ~5 minutes for its 14 "
                             f"days; {DEFAULT_SPEED['synthetic']} for synthetic)")
    parser.add_argument("--limit", type=int, default=None,
                        help=f"stop after N impressions (synthetic default: {DEFAULT_SYNTHETIC_EVENTS:,})")
    parser.add_argument("--drift-type", default=DEFAULT_DRIFT["type"], choices=DRIFT_TYPES,
                        help="synthetic: abrupt or gradual (over 10,000 impressions) halfway through, recurring "
                             "(drifts at 1/3 and back at 2/3), or none (default: %(default)s)")
    parser.add_argument("--drift-magnitude", type=float, default=DEFAULT_DRIFT["magnitude"], metavar="M",
                        help="synthetic: how far the drifted tasks' concept moves, 0..1: 0.1 barely visible, 0.5 a "
                             "new unrelated concept, 1 the ranking reversed (default: %(default)s)")
    parser.add_argument("--drift-tasks", default=DEFAULT_DRIFT["tasks"], metavar="TASK[,TASK]",
                        help="synthetic: the tasks that drift, of click and like (default: %(default)s)")
    parser.add_argument("--ranks", type=int, default=1, metavar="N",
                        help="train with N trainer ranks of one model (torchrun, gloo on CPU; docs/scaling.md): rank r "
                             "serves /metrics on the trainer's port + r, Prometheus scrapes them all, the view shows "
                             "rank 0 (default 1: one trainer)")
    parser.add_argument("--out", default=None, help="run folder (default: runs/demo-<timestamp> in the repository)")
    parser.add_argument("--kafka-data-dir", default=None,
                        help="the broker's data dir (default: RUN/kafka, a fresh broker on a free port)")
    parser.add_argument("--keep-kafka", action="store_true", help="leave the broker running at the end")
    parser.add_argument("--no-prometheus", action="store_true", help="do not start Prometheus even if installed")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads of the trainer (default 1: the demo's other processes need cores too)")
    parser.add_argument("--refresh", type=float, default=1.0,
                        help="seconds between scrapes of /metrics (default: %(default)s)")
    parser.add_argument("--plain", action="store_true",
                        help="plain status lines instead of the live view (the default when stdout is no terminal)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (0 clean end, 1 a part failed, 2 usage error)."""
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"crossdistil demo: {exc}", file=sys.stderr)
        return 2
    demo = Demo(plan)
    return demo.run()


# ------------------------------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    """Everything decided before any process starts: what to stream, where, on which ports."""

    dataset: str
    source: str | None
    speed: str
    limit: int | None
    stream_options: dict[str, str]
    run_dir: Path
    kafka_data_dir: Path
    keep_kafka: bool
    prometheus: str | None          # path of the binary, None when absent or --no-prometheus
    prometheus_wanted: bool
    torch_threads: int
    refresh_s: float
    live: bool
    ranks: int = 1
    ports: dict[str, int] = field(default_factory=dict)
    windows: list[str] = field(default_factory=list)   # the trainer's [metrics] windows, as metric labels


def make_plan(args: argparse.Namespace) -> Plan:
    """Check the flags and decide paths, speed and stream options; ``ValueError`` says what to change."""

    speed = args.speed or DEFAULT_SPEED[args.dataset]
    try:
        parse_speed(speed)
    except StreamError as exc:
        raise ValueError(str(exc)) from None
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit} must be >= 1")
    if args.refresh <= 0:
        raise ValueError(f"--refresh {args.refresh} must be > 0")
    # lazy: the Kafka client loads only when the demo runs (crossdistil demo --help stays fast)
    from streamer.topics import DEFAULT_PARTITIONS

    ranks = getattr(args, "ranks", 1)
    if not 1 <= ranks <= DEFAULT_PARTITIONS:
        raise ValueError(f"--ranks {ranks}: between 1 and {DEFAULT_PARTITIONS} (the demo's topics have "
                         f"{DEFAULT_PARTITIONS} partitions, and each rank owns at least one)")
    source: str | None = None
    options: dict[str, str] = {}
    if args.dataset == "kuairand":
        source = str(Path(args.source).expanduser().resolve()) if args.source else str(DEFAULT_KUAIRAND)
        if not Path(source).exists():
            hint = "pass --source" if args.source else "the data sets live in ../shared/data; pass --source"
            raise ValueError(f"KuaiRand not found at {source} ({hint}, or use --dataset synthetic)")
    else:
        # Feedback delays short enough (seconds of event time, capped at 2 min) that, with the trainer's
        # attribution windows (deploy/demo/trainer-synthetic.toml), samples close within seconds of wall time.
        options = synthetic_options(args.limit or DEFAULT_SYNTHETIC_EVENTS, getattr(args, "drift_type", "abrupt"),
                                    getattr(args, "drift_magnitude", DEFAULT_DRIFT["magnitude"]),
                                    getattr(args, "drift_tasks", DEFAULT_DRIFT["tasks"]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.out).expanduser().resolve() if args.out else REPO_ROOT / "runs" / f"demo-{stamp}"
    kafka_dir = Path(args.kafka_data_dir).expanduser().resolve() if args.kafka_data_dir else run_dir / "kafka"
    prometheus = None if args.no_prometheus else shutil.which("prometheus")
    live = not args.plain and sys.stdout.isatty()
    return Plan(dataset=args.dataset, source=source, speed=speed, limit=args.limit, stream_options=options,
                run_dir=run_dir, kafka_data_dir=kafka_dir, keep_kafka=args.keep_kafka, prometheus=prometheus,
                prometheus_wanted=not args.no_prometheus, torch_threads=args.torch_threads,
                refresh_s=args.refresh, live=live, ranks=ranks)


def synthetic_options(n_events: int, drift_type: str = DEFAULT_DRIFT["type"],
                      magnitude: float = DEFAULT_DRIFT["magnitude"],
                      tasks: str = DEFAULT_DRIFT["tasks"]) -> dict[str, str]:
    """The synthetic stream's options (``--option`` of ``crossdistil stream``) for the demo's drift flags."""
    if drift_type not in DRIFT_TYPES:
        raise ValueError(f"--drift-type {drift_type!r}: one of {', '.join(DRIFT_TYPES)}")
    if not 0 <= magnitude <= 1:
        raise ValueError(f"--drift-magnitude {magnitude}: between 0 (no change) and 1 (the ranking reversed)")
    names = SYNTHETIC_WORLD["tasks"].split(",")
    drifting = [t.strip() for t in tasks.split(",") if t.strip()]
    if not drifting or any(t not in names for t in drifting):
        raise ValueError(f"--drift-tasks {tasks!r}: comma-separated tasks of {', '.join(names)}")
    options = {**SYNTHETIC_WORLD, "n_events": str(n_events), "drift": drift_type}
    if drift_type != "none":
        points = [n_events // 3, 2 * n_events // 3] if drift_type == "recurring" else [n_events // 2]
        options.update({"drift_at": ",".join(map(str, points)), "drift_task": ",".join(drifting),
                        "drift_magnitude": f"{magnitude:g}", "drift_bias": "0", "drift_width": "10000"})
    return options


def drift_summary(options: Mapping[str, str]) -> str | None:
    """One line saying where the synthetic stream drifts, for the view (None without a drift)."""
    if options.get("drift", "none") == "none":
        return None
    points = ", ".join(f"{int(p):,}" for p in options["drift_at"].split(","))
    return (f"drift injected: {options['drift_task']} at impression {points} ({options['drift']}, magnitude "
            f"{options['drift_magnitude']})")


def demo_alert_rules(text: str, scale: int = DEMO_ALERT_TIME_SCALE, groups: Iterable[str] = DEMO_SCALED_GROUPS) -> str:
    """deploy/prometheus/alerts.yml with the durations (``for:`` and range selectors) of ``groups`` divided by
    ``scale`` (10m -> 10s at 60): the demo runs minutes, not days."""
    import re

    def scaled(match: re.Match[str]) -> str:
        seconds = int(match.group(2)) * {"s": 1, "m": 60, "h": 3600}[match.group(3)]
        return f"{match.group(1)}{max(1, round(seconds / scale))}s"

    out, scaling = [], False
    for line in text.splitlines(keepends=True):
        name = re.match(r"\s*- name:\s*(\S+)", line)
        if name:
            scaling = name.group(1) in set(groups)
        if scaling:
            line = re.sub(r"(for:\s*|\[)(\d+)([smh])(?=\s*$|\])", scaled, line)
        out.append(line)
    return "".join(out)


# ------------------------------------------------------------------------------------------ configurations


def write_trainer_config(plan: Plan, bootstrap: str) -> Path:
    """RUN/trainer.toml: deploy/demo/trainer-<dataset>.toml with this run's broker, checkpoint dir and port."""

    cfg = load_config(DEMO_CONFIG_DIR / f"trainer-{plan.dataset}.toml", env={})
    cfg.kafka.bootstrap = bootstrap
    cfg.checkpoint.dir = str(plan.run_dir / "checkpoints")
    cfg.metrics.port = plan.ports["trainer"]
    plan.windows = [str(int(w)) for w in cfg.metrics.windows]
    path = plan.run_dir / "trainer.toml"
    path.write_text(f"# Written by crossdistil demo from {DEMO_CONFIG_DIR.name}/trainer-{plan.dataset}.toml.\n"
                    + to_toml(cfg))
    return path


def write_serving_config(plan: Plan, bootstrap: str) -> Path:
    """RUN/serving.toml: deploy/demo/serving.toml with this run's broker and HTTP port."""

    cfg = load_config(DEMO_CONFIG_DIR / "serving.toml", env={})
    cfg.kafka.bootstrap = bootstrap
    cfg.serving.port = plan.ports["serving"]
    path = plan.run_dir / "serving.toml"
    path.write_text("# Written by crossdistil demo from deploy/demo/serving.toml.\n" + to_toml(cfg))
    return path


def write_prometheus_config(plan: Plan) -> Path:
    """RUN/prometheus.yml: deploy/demo/prometheus.yml with this run's ports, and RUN/alerts.yml: the alert rules
    with the quality alerts' durations compressed for the demo (``demo_alert_rules``)."""
    rules = plan.run_dir / "alerts.yml"
    rules.write_text(f"# Written by crossdistil demo from {ALERT_RULES.relative_to(REPO_ROOT)}: durations of "
                     f"{', '.join(DEMO_SCALED_GROUPS)} divided by {DEMO_ALERT_TIME_SCALE}.\n"
                     + demo_alert_rules(ALERT_RULES.read_text()))
    text = (DEMO_CONFIG_DIR / "prometheus.yml").read_text()
    trainers = '", "'.join(f"127.0.0.1:{plan.ports['trainer'] + rank}" for rank in range(plan.ranks))
    text = (text.replace("@TRAINER@", trainers)
                .replace("@SERVING@", f"127.0.0.1:{plan.ports['serving']}")
                .replace("@ALERTS@", str(rules)))
    path = plan.run_dir / "prometheus.yml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- child processes


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports nothing listens on now (the trainer's ranks: port + rank)."""
    # lazy: the Kafka client loads only when the demo runs (crossdistil demo --help stays fast)
    from consumers.runtime.local_kafka import free_port, port_bindable

    for _ in range(100):
        first = free_port()
        if all(port_bindable(first + i) for i in range(1, count)):
            return first
    raise DemoError(f"found no {count} consecutive free ports for the trainer's ranks")


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when the demo dies, even by SIGKILL."""
    # The demo blocks SIGINT/SIGTERM around fork so a signal cannot interrupt the start of a child it would then
    # not know about; the child must not inherit that mask.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    die_with_parent()  # not Linux: finally/atexit/signal handlers still stop the children


class Child:
    """One child process in its own process group, output to a log file; stopped as a group."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path, env: Mapping[str, str]) -> None:
        self.name, self.argv, self.log_path, self.cwd, self.env = name, argv, log_path, cwd, dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped_by_us = False

    def start(self) -> None:
        """Start the process; it gets a new session (own process group, no terminal: Ctrl-C reaches only us)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"# {' '.join(self.argv)}\n".encode())
            log.flush()
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                self.process = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                    env=self.env, start_new_session=True, close_fds=True, preexec_fn=_die_with_parent,
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a pending Ctrl-C is delivered here

    @property
    def pid(self) -> int | None:
        """The process id (also its process group id), or None before start."""
        return self.process.pid if self.process is not None else None

    def poll(self) -> int | None:
        """The exit status, or None while it runs (or before start)."""
        return self.process.poll() if self.process is not None else None

    def running(self) -> bool:
        """Whether it was started and has not exited."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float, hurry: Callable[[], bool] = lambda: False) -> str:
        """SIGTERM the group, wait up to ``timeout_s`` (less if ``hurry()``), then SIGKILL; say how it ended."""
        if self.process is None:
            return "not started"
        if self.process.poll() is None:
            self.stopped_by_us = True
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while self.process.poll() is None and time.monotonic() < deadline and not hurry():
                try:
                    self.process.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
            if self.process.poll() is None:
                self._signal_group(signal.SIGKILL)
                self.process.wait(timeout=10)
                self._kill_stragglers()
                return "killed (did not stop within %.0f s)" % timeout_s
        self._kill_stragglers()
        code = self.process.returncode
        return f"exit {code}" if code is None or code >= 0 else f"exit by signal {signal.Signals(-code).name}"

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _kill_stragglers(self) -> None:
        """Grandchildren left in the group after the leader exited (e.g. a worker it forked) get SIGKILL."""
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ------------------------------------------------------------------------------------------------ scraping


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str, timeout_s: float = 2.0) -> tuple[Samples | None, str | None]:
    """``(samples by name, raw text)`` of a Prometheus text endpoint, or ``(None, None)`` if it does not answer.

    Sample names keep their suffixes (``crossdistil_samples_trained_total``), as the text format writes them.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None, None
    return parse_samples(text), text


def prometheus_alerts(port: int, timeout_s: float = 1.0) -> list[dict[str, Any]] | None:
    """The alerts of the Prometheus at ``port`` (``/api/v1/alerts``: labels, state), or None if it does not answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=timeout_s) as response:
            return list(json.loads(response.read().decode())["data"]["alerts"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError):
        return None


def parse_samples(text: str) -> Samples | None:
    """The samples by name of a Prometheus text exposition, or None if it does not parse."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except ValueError:
        return None
    return samples


def value(samples: Samples | None, name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` whose labels include ``labels``; None if there is none or all are NaN."""
    if not samples or name not in samples:
        return None
    found = [v for lab, v in samples[name] if all(lab.get(k) == w for k, w in labels.items()) and not math.isnan(v)]
    return sum(found) if found else None


def label_values(samples: Samples | None, name: str, label: str) -> list[str]:
    """The distinct values of ``label`` across the samples of ``name``, in first-seen order."""
    if not samples or name not in samples:
        return []
    return list(dict.fromkeys(lab[label] for lab, _ in samples[name] if label in lab))


class Rate:
    """Per-second rate of a counter over the last ``span_s`` seconds of scrapes (resets start it afresh)."""

    def __init__(self, span_s: float = 5.0) -> None:
        self.span_s = span_s
        self.points: deque[tuple[float, float]] = deque()

    def add(self, t: float, counter: float | None) -> None:
        """Record the counter's value at time ``t`` (None: the endpoint did not answer; skipped)."""
        if counter is None:
            return
        if self.points and counter < self.points[-1][1]:
            self.points.clear()  # a restarted daemon: its counters began again at 0
        self.points.append((t, counter))
        while len(self.points) > 2 and t - self.points[1][0] >= self.span_s:
            self.points.popleft()

    def get(self) -> float | None:
        """Events per second, or None before two points."""
        if len(self.points) < 2 or self.points[-1][0] <= self.points[0][0]:
            return None
        (t0, v0), (t1, v1) = self.points[0], self.points[-1]
        return (v1 - v0) / (t1 - t0)


# ------------------------------------------------------------------------------------------------- view


@dataclass
class Status:
    """What the live view shows, from the latest scrapes."""

    trainer: Samples | None = None
    serving: Samples | None = None
    events_rate: Rate = field(default_factory=Rate)
    samples_rate: Rate = field(default_factory=Rate)
    event_time_rate: Rate = field(default_factory=Rate)
    phase: str = "starting"
    started_at: float = field(default_factory=time.monotonic)
    configured_windows: list[str] = field(default_factory=list)
    drift_note: str | None = None        # where the synthetic stream drifts (shown above the timeline)
    # The replay clock (the demo's data sets are old: the wall clock's lag against them is their age, not a delay):
    # the stream's --speed factor (None: max, no clock), and when the stream ended (the clock stops there).
    replay_speed: float | None = None
    replay_ended_at: float | None = None
    replay_lag_s: float | None = None    # event-time seconds the watermark is behind the replay clock
    _replay_anchor: tuple[float, float] | None = None   # (scrape time, watermark) of the first watermark seen
    # When each detector fired and each quality alert started firing, in the order seen: (seconds since the
    # start, text); ``_counts`` holds the detection counters of the previous scrape, ``_firing`` the alerts.
    timeline: list[tuple[float, str]] = field(default_factory=list)
    _counts: dict[tuple[str, str], float] = field(default_factory=dict)
    _firing: set[tuple[str, ...]] = field(default_factory=set)

    def update(self, trainer: Samples | None, serving: Samples | None, now: float) -> None:
        """Take new scrapes (None keeps the previous one: a busy daemon may miss a scrape)."""
        if trainer is not None:
            self._note_detections(trainer, now)
            self.trainer = trainer
            self.events_rate.add(now, value(trainer, "crossdistil_events_consumed_total"))
            self.samples_rate.add(now, value(trainer, "crossdistil_samples_trained_total"))
            watermark = value(trainer, "crossdistil_watermark_timestamp_seconds")
            self.event_time_rate.add(now, watermark)
            self._note_replay_lag(watermark, now)
        if serving is not None:
            self.serving = serving

    def _note_replay_lag(self, watermark: float | None, now: float) -> None:
        """How far the join's watermark is behind the replay clock: the event time the paced stream has reached,
        counted from the first watermark seen at ``replay_speed`` times the wall clock (stopped when the stream
        ended). The anchor cancels the watermark's constant offset (the join's allowed lateness); the delivery
        delay before that first watermark is not counted."""
        if watermark is None or self.replay_speed is None:
            return
        if self._replay_anchor is None:
            self._replay_anchor = (now, watermark)
        anchored_at, start = self._replay_anchor
        until = now if self.replay_ended_at is None else min(now, self.replay_ended_at)
        self.replay_lag_s = max(0.0, start + (until - anchored_at) * self.replay_speed - watermark)

    def _note_detections(self, trainer: Samples, now: float) -> None:
        """Add a timeline entry for every detector whose detection counter rose since the last scrape."""
        for labels, count in trainer.get("crossdistil_drift_detections_total", []):
            key = (labels.get("task", ""), labels.get("detector", ""))
            before = self._counts.get(key, 0.0)
            self._counts[key] = count
            if count > before:
                samples = value(trainer, "crossdistil_quality_samples_total", task=key[0], role="student")
                self.timeline.append((now - self.started_at, f"{key[0]}: drift detector {key[1]} fired "
                                      f"(at {_fmt(samples, ',.0f')} samples scored)"))

    def update_alerts(self, alerts: Iterable[Mapping[str, Any]] | None, now: float) -> None:
        """Take Prometheus' alerts (``/api/v1/alerts``): a timeline entry when a quality alert starts firing."""
        if alerts is None:
            return
        firing = set()
        for alert in alerts:
            labels = alert.get("labels", {})
            if alert.get("state") != "firing" or labels.get("alertname") not in QUALITY_ALERTS:
                continue
            key = (labels["alertname"], labels.get("task", ""), labels.get("reference") or labels.get("detector", ""))
            firing.add(key)
            if key not in self._firing:
                samples = value(self.trainer, "crossdistil_quality_samples_total", task=key[1], role="student")
                self.timeline.append((now - self.started_at, f"{key[1]}: alert {key[0]} firing ({key[2]}, at "
                                      f"{_fmt(samples, ',.0f')} samples scored)"))
        self._firing = firing

    def firing(self) -> list[str]:
        """Quality alerts firing now, as ``ALERT(task)``."""
        return sorted({f"{name}({task})" for name, task, _ in self._firing})

    def tasks(self) -> list[str]:
        """Tasks the trainer reports quality for."""
        return label_values(self.trainer, "crossdistil_auc", "task")

    def windows(self) -> list[str]:
        """AUC windows, shortest first, then the lifetime one (the slow baseline window is left out)."""
        found = label_values(self.trainer, "crossdistil_auc", "window")
        numeric = sorted((w for w in found if w.isdigit()), key=int)
        if self.configured_windows:
            numeric = [w for w in numeric if w in self.configured_windows]
        return numeric + [w for w in found if not w.isdigit()]

    def auc(self, task: str, window: str) -> float | None:
        """The student's AUC of ``task`` over ``window``."""
        return value(self.trainer, "crossdistil_auc", task=task, role="student", window=window)

    def drift(self, task: str, window: str, reference: str) -> float | None:
        """The student's windowed AUC minus the ``reference`` AUC."""
        return value(self.trainer, "crossdistil_auc_drift", task=task, role="student", window=window,
                     reference=reference)

    def kd_gate(self, task: str) -> float | None:
        """The trust gate of ``task``'s distillation (1 open, 0 closed); None for a model without gating."""
        return value(self.trainer, "crossdistil_kd_gate_open", task=task)

    def kd_gate_auc(self, task: str, role: str) -> float | None:
        """The gate's windowed prequential AUC of the ``role`` ("teacher" or "student") of ``task``."""
        return value(self.trainer, "crossdistil_kd_gate_auc", task=task, role=role)

    def distilled_share(self, task: str) -> float | None:
        """Share of ``task``'s training steps so far with the gate open; None before the first gated step."""
        distilled = value(self.trainer, "crossdistil_kd_gate_steps_total", task=task, outcome="distilled") or 0.0
        steps = value(self.trainer, "crossdistil_kd_gate_steps_total", task=task)
        return distilled / steps if steps else None

    def gated(self) -> bool:
        """Whether the trainer reports a trust gate (a model without gating exports none of its metrics)."""
        return bool(self.trainer and "crossdistil_kd_gate_open" in self.trainer)

    def has_auc(self) -> bool:
        """Whether any per-task AUC is defined yet."""
        return any(self.auc(t, w) is not None for t in self.tasks() for w in self.windows())

    def consumer_lag(self) -> float | None:
        """Messages behind the end of the trainer's partitions, all topics together."""
        return value(self.trainer, "crossdistil_consumer_lag_messages")

    def versions(self) -> tuple[float | None, float | None]:
        """(version the trainer published last, version the serving replica has loaded)."""
        return (value(self.trainer, "crossdistil_published_model_version"),
                value(self.serving, "crossdistil_serving_model_version"))


def speed_label(speed: str) -> str:
    """``--speed`` as the header says it: ``4000x``, ``realtime``, ``max``."""
    return speed if speed in ("max", "realtime") else f"{speed}x"


def _fmt(x: float | None, spec: str = ".3f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _fmt_drift(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def _fmt_gate(gate: float | None) -> str:
    """``"on"`` / ``"off"`` for a trust gate (a KD warm-up's factor after "on" while it ramps); "-" if unknown."""
    if gate is None:
        return "-"
    if gate <= 0:
        return "off"
    return "on" if gate >= 1 else f"on x{gate:.2f}"


def _fmt_version(x: float | None) -> str:
    return "none yet" if x is None else f"v{int(x)}"


def _event_time(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(ts))


def _human_seconds(s: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.0f} s"


def pipeline_facts(status: Status) -> list[tuple[str, str]]:
    """(label, value) pairs of throughput, lag and model versions, in display order (shared by both views)."""
    published, loaded = status.versions()
    lag = status.consumer_lag()
    speedup = status.event_time_rate.get()
    return [
        ("events/s", _fmt(status.events_rate.get(), ",.0f")),
        ("samples/s", _fmt(status.samples_rate.get(), ",.0f")),
        ("trained", _fmt(value(status.trainer, "crossdistil_samples_trained_total"), ",.0f")),
        ("consumer lag", "-" if lag is None else f"{lag:,.0f} msgs"),
        ("event time", _event_time(value(status.trainer, "crossdistil_watermark_timestamp_seconds"))),
        # Against the replay clock, not the wall clock (crossdistil_event_time_lag_seconds): in a replay the
        # watermark is the data's own time, and its lag behind the wall clock is the data's age, not a delay.
        ("lag vs replay clock", _replay_lag(status)),
        ("speed", "-" if not speedup else f"{speedup:,.0f}x"),
        ("model", f"published {_fmt_version(published)}, serving {_fmt_version(loaded)}"),
        ("late labels", _late_share(status)),
    ]


def _replay_lag(status: Status) -> str:
    """The watermark's lag behind the replay clock in event time; none at --speed max (no clock to lag behind)."""
    if status.replay_speed is None:
        return "none (--speed max)"
    return "-" if status.replay_lag_s is None else _human_seconds(status.replay_lag_s)


def _late_share(status: Status) -> str:
    """The share of feedback the join dropped as late (its impression's window had closed), as the alert reads it."""
    late = value(status.trainer, "crossdistil_join_events_total", outcome="late_feedback")
    feedback = value(status.trainer, "crossdistil_join_events_total", outcome="feedback")
    if not feedback or late is None:
        return "-"
    return f"{late / feedback:.1%} of feedback" + (" (CrossdistilLateFeedback)" if late / feedback > 0.01 else "")


def plain_line(status: Status) -> str:
    """One status line for logs and pipes."""
    parts = [f"[demo {time.monotonic() - status.started_at:5.0f}s] {status.phase}"]
    windows = status.windows()
    short = windows[0] if windows else None
    for task in status.tasks():
        part = (f"{task} auc={_fmt(status.auc(task, short) if short else None)} "
                f"drift={_fmt_drift(status.drift(task, short, 'published') if short else None)}")
        if status.kd_gate(task) is not None:
            part += (f" kd={_fmt_gate(status.kd_gate(task))} teacher/student="
                     f"{_fmt(status.kd_gate_auc(task, 'teacher'))}/{_fmt(status.kd_gate_auc(task, 'student'))}")
        parts.append(part)
    facts = dict(pipeline_facts(status))
    parts += [f"{k}={facts[k]}" for k in ("events/s", "samples/s", "consumer lag", "model")]
    if status.firing():
        parts.append("alerts=" + ",".join(status.firing()))
    return " | ".join(parts)


def render(status: Status, header: str, children: Iterable[Child], footer: list[str]) -> Any:
    """The rich renderable of the live view."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    windows = status.windows()
    numeric = [w for w in windows if w.isdigit()]
    caption = ("AUC over the last N samples, each scored before the model learned from it. "
               + (f"Drift: AUC over the last {_short(numeric[0])} minus the same AUC when the served model was "
                  "published (pub), or over the slow baseline window (base); red below -0.05. " if numeric else "")
               + "Alarms: drift detections (ADWIN / PageHinkley on the loss, auc_drop on the AUC); when: below.")
    quality = Table(title="model quality per task", caption=caption, expand=True, title_justify="left",
                    caption_justify="left")
    quality.add_column("task")
    for w in windows:
        quality.add_column(f"AUC {_short(w)}" if w.isdigit() else f"AUC {w}", justify="right")
    if numeric:
        quality.add_column("drift pub", justify="right")
        quality.add_column("drift base", justify="right")
    quality.add_column("alarms", justify="right")
    quality.add_column("scored", justify="right")
    for task in status.tasks():
        cells = [_fmt(status.auc(task, w)) for w in windows]
        if numeric:
            for reference in ("published", "baseline"):
                d = status.drift(task, numeric[0], reference)
                style = "red" if d is not None and d < -0.05 else ""
                cells.append(f"[{style}]{_fmt_drift(d)}[/]" if style else _fmt_drift(d))
        alarms = value(status.trainer, "crossdistil_drift_detections_total", task=task)
        cells.append(_fmt(alarms, ",.0f", none="0"))
        cells.append(_fmt(value(status.trainer, "crossdistil_quality_samples_total", task=task, role="student"),
                          ",.0f"))
        quality.add_row(task, *cells)
    if not status.tasks():
        quality.add_row(Text("waiting for the first trained batch ...", style="dim"))

    facts = pipeline_facts(status)
    lines = []
    # rows: throughput and lag; event time; model versions (each fits an 80-column terminal)
    for row in (facts[0:4], facts[4:7], facts[7:8]):
        line = Text(no_wrap=True, overflow="ellipsis")
        for i, (label, text) in enumerate(row):
            line.append(("   " if i else "") + label + " ", style="dim")
            line.append(text, style="bold")
        lines.append(line)
    pipeline = Group(*lines)

    procs = Table(expand=True, show_edge=False, box=None)
    for name in ("process", "pid", "state", "log"):
        procs.add_column(name, style="dim" if name == "log" else "")
    for child in children:
        code = child.poll()
        state = ("[green]running[/]" if child.running() else
                 "not started" if child.pid is None else
                 "[green]done[/]" if code == 0 else f"[red]exit {code}[/]")
        procs.add_row(child.name, str(child.pid or "-"), state, _relative(child.log_path))
    elapsed = time.monotonic() - status.started_at
    return Group(
        Text(f"{header}  |  {status.phase}, {elapsed:.0f} s", style="bold"),
        quality,
        *([drift_panel(status)] if status.drift_note or status.timeline else []),
        *([distillation_table(status)] if status.gated() else []),
        Panel(pipeline, title="pipeline", title_align="left"),
        procs,
        Text("\n".join(footer), style="dim"),
    )


def drift_panel(status: Status, last: int = 8) -> Any:
    """Where the stream drifts, and when each detector fired and each quality alert started firing."""
    from rich.panel import Panel
    from rich.text import Text

    lines = Text()
    if status.drift_note:
        lines.append(status.drift_note + "\n", style="dim")
    for seconds, what in status.timeline[-last:]:
        lines.append(f"{seconds:5.0f} s  ", style="dim")
        lines.append(what + "\n", style="red" if "alert" in what else "yellow")
    if not status.timeline:
        lines.append("no drift detected so far", style="dim")
    if status.firing():
        lines.append("firing now: " + ", ".join(status.firing()), style="bold red")
    return Panel(lines, title="drift: detections and alerts", title_align="left")


def distillation_table(status: Status) -> Any:
    """Per task: whether the trust gate lets the student learn from its teacher, and the AUCs it compares."""
    from rich.table import Table

    table = Table(title="distillation per task (trust gate)", expand=True, title_justify="left",
                  caption_justify="left",
                  caption="A student learns from its teacher only while the teacher's AUC over the gate's recent "
                          "window beats its own. A gate that stays off: that teacher is not worth learning from "
                          "on this stream.")
    table.add_column("task")
    for name in ("distilling", "steps distilled", "teacher AUC", "student AUC"):
        table.add_column(name, justify="right")
    for task in status.tasks():
        gate, share = status.kd_gate(task), status.distilled_share(task)
        table.add_row(task, f"[green]{_fmt_gate(gate)}[/]" if gate else _fmt_gate(gate),
                      _fmt(share, ".0%"), _fmt(status.kd_gate_auc(task, "teacher")),
                      _fmt(status.kd_gate_auc(task, "student")))
    return table


def _short(window: str) -> str:
    """``"20000"`` -> ``"20k"``."""
    n = int(window)
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else f"{n:,}"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------------------------- the demo


class Demo:
    """Starts, watches and stops everything of one demo run."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.children: dict[str, Child] = {}
        self.broker: Any = None           # consumers.runtime.local_kafka.LocalKafka once started
        self.broker_started = False
        self.kafka_pid: int | None = None
        self.stop_reason: str | None = None
        self.signals = 0
        self.raise_on_signal = True       # during start-up a signal aborts the step in progress
        self.status = Status()
        self.outcomes: dict[str, str] = {}
        self._stopped = False
        self._last_trainer_text: str | None = None
        self._last_serving_text: str | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Start everything, watch until the end or a signal, stop everything; the exit status."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in _STOP_SIGNALS}
        atexit.register(self.stop_all)
        code = 0
        try:
            self._start()
            self.raise_on_signal = False
            code = self._watch()
        except StopRequested:
            print(f"\n[demo] {self.stop_reason}: stopping during start-up", file=sys.stderr)
        except DemoError as exc:
            print(f"crossdistil demo: {exc}", file=sys.stderr)
            code = 1
        except Exception as exc:  # anything else still stops every child, then shows the error
            import traceback

            traceback.print_exc()
            print(f"crossdistil demo: unexpected error: {exc}", file=sys.stderr)
            code = 1
        finally:
            self.raise_on_signal = False
            self.stop_all()
            atexit.unregister(self.stop_all)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self._print_where()
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        if self.stop_reason is None:
            self.stop_reason = f"{signal.Signals(signum).name} received"
        if self.raise_on_signal:
            self.raise_on_signal = False
            raise StopRequested(self.stop_reason)

    def _hurry(self) -> bool:
        """A second Ctrl-C while stopping: stop waiting for clean exits (SIGKILL now)."""
        return self.signals >= 2

    def _start(self) -> None:
        # lazy: the Kafka client loads only when the demo runs (crossdistil --help stays fast)
        from consumers.runtime.local_kafka import LocalKafka, LocalKafkaError, free_port
        from streamer.topics import TopicError, ensure_topics

        plan = self.plan
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        (plan.run_dir / "logs").mkdir(exist_ok=True)
        print(f"[demo] run folder {plan.run_dir}", file=sys.stderr)
        plan.ports = {"trainer": free_ports(plan.ranks), "serving": free_port()}
        if plan.prometheus:
            plan.ports["prometheus"] = free_port()
        kafka_port = None if (plan.kafka_data_dir / "local-kafka.json").exists() else free_port()
        self.broker = LocalKafka(port=kafka_port, data_dir=plan.kafka_data_dir)
        plan.ports["kafka"] = self.broker.port
        self._record()
        print(f"[demo] starting Kafka at {self.broker.bootstrap} (data {plan.kafka_data_dir}) ...", file=sys.stderr)
        try:
            self.broker_started = self.broker.start(timeout_s=180, preexec_fn=_die_with_parent)
            self._record()
            ensure_topics(self.broker.bootstrap)
        except (LocalKafkaError, TopicError) as exc:
            raise DemoError(f"the local Kafka broker did not start: {exc}") from None
        bootstrap = self.broker.bootstrap
        trainer_cfg = write_trainer_config(plan, bootstrap)
        serving_cfg = write_serving_config(plan, bootstrap)
        cli = [sys.executable, "-m", "consumers.cli"]
        ranks = ["--world-size", str(plan.ranks)] if plan.ranks > 1 else []
        self._spawn("trainer",
                    [*cli, "train", "--config", str(trainer_cfg), "--torch-threads", str(plan.torch_threads), *ranks])
        self._spawn("serving", [*cli, "serve", "--config", str(serving_cfg)])
        if plan.prometheus:
            prom_cfg = write_prometheus_config(plan)
            self._spawn("prometheus", [plan.prometheus, f"--config.file={prom_cfg}",
                                       f"--storage.tsdb.path={plan.run_dir / 'prometheus'}",
                                       f"--web.listen-address=127.0.0.1:{plan.ports['prometheus']}"])
        elif plan.prometheus_wanted:
            print("[demo] Prometheus is not installed, so no dashboards or alerts this time; install it with "
                  "'apt-get install prometheus' (Debian/Ubuntu) and run the demo again", file=sys.stderr)
        stream = [*cli, "stream", "--dataset", plan.dataset, "--to", f"kafka://{bootstrap}", "--speed", plan.speed]
        if plan.source:
            stream += ["--source", plan.source]
        if plan.limit is not None:
            stream += ["--limit", str(plan.limit)]
        for key, val in plan.stream_options.items():
            stream += ["--option", f"{key}={val}"]
        # Many events per Kafka message: one event per message costs the producer more CPU than the trainer
        # spends per sample. A part-filled envelope waits at most 1 s (streamer.sinks), so pacing still shows.
        stream += ["--envelope", "100"]
        self._spawn("stream", stream)

    def _spawn(self, name: str, argv: list[str]) -> None:
        env = dict(os.environ)
        # The children import this checkout's packages even when it is not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.setdefault("PYTHONUNBUFFERED", "1")
        child = Child(name, argv, self.plan.run_dir / "logs" / f"{name}.log", self.plan.run_dir, env)
        self.children[name] = child
        child.start()
        self._record()

    def _record(self) -> None:
        """RUN/demo.json: pids, ports and paths, for the user, the tests and a later clean-up."""
        plan = self.plan
        pids = {name: c.pid for name, c in self.children.items() if c.pid is not None}
        if self.broker is not None and self.kafka_pid is None:
            self.kafka_pid = self.broker.status().pid
        if self.kafka_pid is not None:
            pids["kafka"] = self.kafka_pid  # kept after the stop: the record says what ran, not what runs
        info = {
            "pids": pids,
            "ports": plan.ports,
            "urls": {name: f"http://127.0.0.1:{port}" for name, port in plan.ports.items() if name != "kafka"},
            "bootstrap": self.broker.bootstrap if self.broker is not None else None,
            "logs": {name: str(c.log_path) for name, c in self.children.items()},
            "checkpoints": str(plan.run_dir / "checkpoints"),
            "kafka_data_dir": str(plan.kafka_data_dir),
            "dataset": plan.dataset,
            "speed": plan.speed,
            "phase": self.status.phase,
        }
        tmp = plan.run_dir / "demo.json.tmp"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(plan.run_dir / "demo.json")

    # -- watching ----------------------------------------------------------------------------------------------
    def _watch(self) -> int:
        plan = self.plan
        header = (f"crossdistil demo: {plan.dataset} at {speed_label(plan.speed)} speed"
                  f"  |  run folder {_relative(plan.run_dir)}")
        footer = [f"trainer  http://127.0.0.1:{plan.ports['trainer']}/metrics"]
        if plan.ranks > 1:
            footer = ["trainer ranks (the view shows rank 0): " + ", ".join(
                f"http://127.0.0.1:{plan.ports['trainer'] + rank}/metrics" for rank in range(plan.ranks))]
        if "serving" in self.children:
            footer.append(f"serving  http://127.0.0.1:{plan.ports['serving']}/metrics")
        if plan.prometheus:
            footer.append(f"Prometheus  http://127.0.0.1:{plan.ports['prometheus']}  (alert rules loaded)")
        elif plan.prometheus_wanted:
            footer.append("Prometheus not installed: apt-get install prometheus")
        footer.append("Ctrl-C stops everything")
        self.status.phase = "streaming"
        self.status.configured_windows = plan.windows
        self.status.drift_note = drift_summary(plan.stream_options)
        self.status.replay_speed = parse_speed(plan.speed)
        self._record()
        if plan.live:
            from rich.live import Live

            with Live(render(self.status, header, self.children.values(), footer), refresh_per_second=4,
                      transient=False, redirect_stderr=False) as live:
                return self._loop(lambda: live.update(render(self.status, header, self.children.values(), footer)))
        print("[demo] " + "; ".join(footer), flush=True)
        if self.status.drift_note:
            print(f"[demo] {self.status.drift_note}", flush=True)
        last_line = [0.0]
        shown = [0]

        def plain() -> None:
            for seconds, what in self.status.timeline[shown[0]:]:
                print(f"[demo {seconds:5.0f}s] {what}", flush=True)
            shown[0] = len(self.status.timeline)
            now = time.monotonic()
            if now - last_line[0] >= PLAIN_EVERY_S:
                last_line[0] = now
                print(plain_line(self.status), flush=True)

        return self._loop(plain)

    def _loop(self, show: Callable[[], None]) -> int:
        plan = self.plan
        trainer_url = f"http://127.0.0.1:{plan.ports['trainer']}/metrics"
        serving_url = f"http://127.0.0.1:{plan.ports['serving']}/metrics"
        drain_started: float | None = None
        quiet_since: float | None = None
        last_events: float | None = None
        announced_auc = False
        while self.stop_reason is None:
            tick = time.monotonic()
            trainer, trainer_text = scrape(trainer_url)
            serving, serving_text = scrape(serving_url)
            self._last_trainer_text = trainer_text or self._last_trainer_text
            self._last_serving_text = serving_text or self._last_serving_text
            self.status.update(trainer, serving, tick)
            if plan.prometheus:
                self.status.update_alerts(prometheus_alerts(plan.ports["prometheus"]), tick)
            if not announced_auc and self.status.has_auc():
                announced_auc = True
                if not plan.live:
                    print(f"[demo] first per-task AUC after {tick - self.status.started_at:.0f} s", flush=True)
            self._check_children()
            stream = self.children["stream"]
            if stream.poll() == 0:
                if drain_started is None:
                    drain_started = self.status.replay_ended_at = tick
                    self.status.phase = "stream ended; trainer catching up"
                    self._record()
                events = value(self.status.trainer, "crossdistil_events_consumed_total")
                if events != last_events:
                    last_events, quiet_since = events, tick
                lag = self.status.consumer_lag()
                if lag == 0 and quiet_since is not None and tick - quiet_since >= CAUGHT_UP_QUIET_S:
                    self.stop_reason = "end of the stream: the trainer has read every event"
                elif tick - drain_started > DRAIN_TIMEOUT_S:
                    self.stop_reason = (f"end of the stream; the trainer did not catch up within "
                                        f"{DRAIN_TIMEOUT_S:.0f} s (consumer lag {lag})")
            show()
            # Sleep in small steps so a signal ends the wait quickly.
            while self.stop_reason is None and time.monotonic() - tick < plan.refresh_s:
                time.sleep(0.05)
        self.status.phase = f"stopping ({self.stop_reason})"
        show()
        print(f"\n[demo] {self.stop_reason}: stopping", file=sys.stderr)
        return 0

    def _check_children(self) -> None:
        """Raise DemoError, quoting the log, if a daemon exited or the streamer failed."""
        from consumers.runtime.local_kafka import tail  # lazy: the Kafka client loads only when the demo runs

        for name, child in self.children.items():
            code = child.poll()
            if code is None or (name == "stream" and code == 0):
                continue
            raise DemoError(f"{name} exited with status {code} (command: {' '.join(child.argv[1:])}).\n"
                            f"Last lines of {child.log_path}:\n{tail(child.log_path, 15)}")
        if self.broker is not None and self.broker_started and not self.broker.status().running:
            raise DemoError(f"Kafka stopped unexpectedly; see {self.broker.log_file}:\n"
                            f"{tail(self.broker.log_file, 15)}")

    # -- stopping ----------------------------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Stop every child (streamer first, broker last); idempotent, safe from atexit and after errors."""
        if self._stopped:
            return
        self._stopped = True
        # Producers first, so the trainer's final checkpoint covers everything that reached Kafka; serving
        # after the trainer, so it can still load the final publication.
        for name in ("stream", "trainer", "serving", "prometheus"):
            child = self.children.get(name)
            if child is None:
                continue
            if name == "serving" and self.outcomes.get("trainer") == "exit 0":
                self._wait_for_final_model(child, timeout_s=10.0)
            self.outcomes[name] = child.stop(STOP_TIMEOUT_S[name], hurry=self._hurry)
            if name == "trainer":
                self._save_scrape()
        for child in self.children.values():  # anything started outside the list above
            if child.running():
                self.outcomes[child.name] = child.stop(5.0, hurry=self._hurry)
        if self.broker is not None and (self.broker_started or self.broker.status().running):
            if self.plan.keep_kafka:
                self.outcomes["kafka"] = f"kept running at {self.broker.bootstrap}"
            else:
                try:
                    self.broker.stop(timeout_s=5.0 if self._hurry() else 30.0)
                    self.outcomes["kafka"] = "stopped"
                except Exception as exc:  # report it; the other children are already stopped
                    self.outcomes["kafka"] = f"could not be stopped: {exc}"
        self.status.phase = "stopped"
        try:
            self._record()
        except OSError:
            pass

    def last_published_version(self) -> int | None:
        """The last version the trainer logged as published (its final one is published after the last scrape)."""
        import re

        trainer = self.children.get("trainer")
        if trainer is None or not trainer.log_path.exists():
            return None
        found = re.findall(r"published version (\d+)", trainer.log_path.read_text(errors="replace"))
        return int(found[-1]) if found else None

    def _wait_for_final_model(self, serving: Child, timeout_s: float) -> None:
        """After the trainer's final publication, give serving a moment to load it (the demo's last version)."""
        published = self.last_published_version()
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{self.plan.ports['serving']}/metrics"
        while serving.running() and time.monotonic() < deadline and not self._hurry():
            samples, text = scrape(url, timeout_s=1.0)
            if samples is not None:
                self.status.serving, self._last_serving_text = samples, text
                loaded = value(samples, "crossdistil_serving_model_version")
                if published is None or (loaded is not None and loaded >= published):
                    return
            time.sleep(0.3)

    def _save_scrape(self) -> None:
        """RUN/metrics/*.prom: the last scrape of each daemon, kept for after the demo."""
        directory = self.plan.run_dir / "metrics"
        for name, text in (("trainer", self._last_trainer_text), ("serving", self._last_serving_text)):
            if text:
                directory.mkdir(exist_ok=True)
                (directory / f"{name}.prom").write_text(text)

    def _print_where(self) -> None:
        self._save_scrape()
        published = self.last_published_version() or self.status.versions()[0]
        lines = closing_lines(self.plan, self.status, self.outcomes, published, list(self.children),
                              self.broker.bootstrap if self.broker is not None else None)
        print("\n".join(lines), file=sys.stderr, flush=True)


def closing_lines(plan: Plan, status: Status, outcomes: Mapping[str, str], published: float | None,
                  started: Iterable[str], kafka_bootstrap: str | None) -> list[str]:
    """The demo's closing summary: how each part stopped, the last AUC, the model, and where everything is
    (``started``: the names of the children it started, whose logs exist)."""
    lines = ["", "[demo] stopped: " + ", ".join(f"{k} ({v})" for k, v in outcomes.items())]
    auc = auc_line(status)
    if auc:
        lines.append(auc)
    if status.drift_note or status.timeline:
        lines.append(f"[demo] {status.drift_note or 'drift'}; detections and alerts:"
                     + "".join(f"\n[demo]   {seconds:5.0f} s  {what}" for seconds, what in status.timeline)
                     + ("" if status.timeline else " none"))
    loaded = status.versions()[1]
    if published is not None or loaded is not None:
        lines.append(f"[demo] model: published {_fmt_version(published)}, serving loaded {_fmt_version(loaded)}")
    checkpoints = plan.run_dir / "checkpoints"
    # checkpoint files only: the folder also holds the trainer's lock and published.json
    count = len(list(checkpoints.glob("*.cdckpt"))) if checkpoints.is_dir() else 0
    logs = [name for name in ("stream", "trainer", "serving", "prometheus") if name in set(started)]
    lines += [
        f"[demo] run folder   {plan.run_dir}",
        f"[demo] checkpoints  {checkpoints} ({count} checkpoint{'' if count == 1 else 's'})",
        f"[demo] logs         {plan.run_dir / 'logs'} ({', '.join(logs) or 'none'}); "
        f"Kafka: {plan.kafka_data_dir / 'broker.log'}",
        f"[demo] metrics      {plan.run_dir / 'metrics'} (last scrape of each daemon)",
    ]
    if plan.prometheus and (plan.run_dir / "prometheus").exists():
        lines.append(f"[demo] Prometheus   data in {plan.run_dir / 'prometheus'}; browse it again with: "
                     f"prometheus --config.file={plan.run_dir / 'prometheus.yml'} "
                     f"--storage.tsdb.path={plan.run_dir / 'prometheus'}")
    if plan.keep_kafka and kafka_bootstrap is not None:
        lines.append(f"[demo] Kafka keeps running at {kafka_bootstrap}; stop it with "
                     f"'crossdistil kafka down --data-dir {plan.kafka_data_dir}'")
    return lines


def auc_line(status: Status) -> str | None:
    """The closing line of each task's last AUC over the shortest window, with the number of samples it is over:
    the window's size, or fewer when fewer were scored (None before any AUC)."""
    windows, tasks = status.windows(), status.tasks()
    if not windows or not tasks:
        return None
    window = windows[0]
    if not window.isdigit():
        return "[demo] AUC: " + ", ".join(f"{t} {_fmt(status.auc(t, window))}" for t in tasks)
    over = {}
    for task in tasks:
        scored = value(status.trainer, "crossdistil_quality_samples_total", task=task, role="student")
        over[task] = int(window) if scored is None else int(min(int(window), scored))
    if len(set(over.values())) == 1:
        return (f"[demo] last AUC over {over[tasks[0]]:,} samples: "
                + ", ".join(f"{t} {_fmt(status.auc(t, window))}" for t in tasks))
    return "[demo] last AUC: " + ", ".join(f"{t} {_fmt(status.auc(t, window))} over {over[t]:,} samples"
                                          for t in tasks)

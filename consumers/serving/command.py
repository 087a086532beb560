"""``crossdistil serve``: flags, configuration checks and signals; the daemon is ``consumers.serving.daemon``.

Exit status: 0 after SIGTERM/SIGINT, 2 for a configuration error or a port that cannot be bound, 3 when Kafka
cannot be reached at start. With ``serving.workers = N > 1`` this process starts N worker processes (each a
whole daemon: its own follower and model, one shared port through SO_REUSEPORT), passes SIGTERM/SIGINT on to
them, and exits with the first non-zero status of a worker (stopping the others), else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading

from consumers.runtime import logs
from consumers.runtime.config import (
    Config,
    ConfigError,
    add_config_arguments,
    kafka_client_options,
    load_config,
    to_toml,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil serve``."""
    add_config_arguments(parser, "deploy/serving.example.toml", "serving.port=9501")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=logs.LEVELS,
                        help="logging level: DEBUG, INFO (default), WARNING or ERROR")


def check_serving_config(cfg: Config) -> None:
    """Raise ConfigError if a ``[serving]`` value is out of range."""
    s = cfg.serving
    for name in ("max_request_bytes", "max_items", "max_checkpoint_bytes", "max_queued", "max_connections", "backlog",
                 "header_timeout_s", "body_timeout_s", "keep_alive_s", "write_timeout_s", "workers"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"serving.{name}: must be > 0, got {getattr(s, name)}")
    if not 0 <= s.port <= 65535:
        raise ConfigError(f"serving.port: must be 0..65535, got {s.port}")
    if s.torch_threads < 0:
        raise ConfigError(f"serving.torch_threads: must be >= 0, got {s.torch_threads}")
    if not 0 <= s.batch_window_ms <= 2:
        raise ConfigError(f"serving.batch_window_ms: must be 0..2, got {s.batch_window_ms}")
    if s.workers > 1 and s.port == 0:
        raise ConfigError("serving.workers > 1 needs a fixed serving.port (the workers share it)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil serve``; returns the exit status (0 on SIGTERM/SIGINT)."""
    logs.configure(str(args.log_level))  # the Kafka client's repeated complaints during an outage are folded
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        check_serving_config(cfg)
        kafka_client_options(cfg.kafka)  # a missing SASL password or CA file is said now, not at the first poll
    except ConfigError as exc:
        print(f"crossdistil serve: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(to_toml(cfg))
        return 0
    if cfg.serving.workers > 1:
        return run_workers(args, cfg.serving.workers)
    # lazy: torch and kafka load only when the daemon runs (crossdistil --help stays fast)
    import torch

    from consumers.runtime.processes import freeze_startup_objects, unfreeze
    from consumers.serving.daemon import ServingDaemon
    from models.learner import resolve_device

    try:
        resolve_device(cfg.serving.device)  # a GPU asked for where there is none: said now, not at the first model
    except ValueError as exc:
        print(f"crossdistil serve: configuration error in [serving]: {exc}", file=sys.stderr)
        return 2
    if cfg.serving.torch_threads:
        torch.set_num_threads(cfg.serving.torch_threads)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    freeze_startup_objects()  # full collections skip what the imports made (see its docstring)
    first_model = threading.Event()

    def freeze_again(served: object) -> None:
        # The HTTP server, the Kafka client and loading a model import ~140,000 more objects lazily (modules'
        # functions, tuples, dicts): unfrozen, each full collection under load scanned them (~100 ms on 2 busy
        # cores, every request in flight waiting: /score's p99 at 16 clients). Once is enough: later swaps
        # import nothing new.
        if not first_model.is_set():
            first_model.set()
            freeze_startup_objects()

    try:
        status = ServingDaemon(cfg, on_swap=freeze_again, reuse_port=bool(os.environ.get(WORKER_ENV))).run(stop)
    except OSError as exc:
        print(f"crossdistil serve: {exc}", file=sys.stderr)
        return 2
    finally:
        unfreeze()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        print("crossdistil serve: stopped", flush=True)
    return status


WORKER_ENV = "CROSSDISTIL_SERVING_WORKER"  # set in a worker's environment: bind with SO_REUSEPORT


def run_workers(args: argparse.Namespace, workers: int) -> int:
    """Start ``workers`` serving processes on one port and supervise them (see the module docstring)."""
    command = [sys.executable, "-m", "consumers.cli", "serve", "--log-level", str(args.log_level)]
    if args.config:
        command += ["--config", args.config]
    for override in args.overrides:
        command += ["--set", override]
    command += ["--set", "serving.workers=1"]
    children = [subprocess.Popen(command, env={**os.environ, WORKER_ENV: str(n)}) for n in range(workers)]
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while not stop.is_set() and status == 0:
            for child in children:
                if child.poll() is not None:
                    status = child.returncode or 0
                    if status == 0:  # a worker that stopped by itself is not serving: say so, stop the rest
                        print(f"crossdistil serve: worker {child.pid} exited; stopping the others", file=sys.stderr)
                        status = 1
            stop.wait(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status == 0:
        print("crossdistil serve: stopped", flush=True)
    return status

"""``crossdistil train``: its flags and exit statuses; the daemon itself is ``consumers.trainer.daemon``.

Exit status: 0 after a stop or the end of a finite stream; 2 for a configuration error (or a checkpoint
directory written by something else); 3 when Kafka cannot be reached at start; 4 when no partition was
assigned for ``kafka.stall_exit_s``; 5 when another trainer with the same ``group_instance_id`` took the
partitions over; 6 when the learner process failed or died; 7 when a record batch cannot be decoded (a codec
that is not installed, a corrupt batch: its topic, partition and offset are named) (``consumers.trainer.daemon``
says why each).
"""

from __future__ import annotations

import argparse
import signal
import sys

from consumers.runtime import logs
from consumers.runtime.config import ConfigError, add_config_arguments, kafka_client_options, load_config, to_toml
from consumers.runtime.timeparse import parse_time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``crossdistil train``."""
    add_config_arguments(parser, "deploy/trainer.example.toml", "batching.batch_size=512")
    parser.add_argument("--device", help="torch device, overrides model.device (auto, cpu, cuda, cuda:1)")
    parser.add_argument("--exit-when-idle", type=float, metavar="SECONDS", default=None,
                        help="finite streams: when no event arrived for SECONDS and every partition is at its end "
                             "offset, flush the join and the batcher, checkpoint, publish and exit 0")
    parser.add_argument("--ledger", metavar="DIR", default=None,
                        help="write a trained-sample ledger (impression ids, labels, predictions) next to the "
                             "checkpoints, made durable with them (audits, exactly-once tests)")
    parser.add_argument("--from-time", metavar="TIME", default=None,
                        help="a trainer without a checkpoint position for a partition starts it at the first record "
                             "stamped at or after TIME (unix ms or ISO 8601, e.g. 2026-11-01T00:00Z) instead of its "
                             "beginning; positions in the checkpoint always win, so restarts stay exactly-once")
    parser.add_argument("--torch-threads", type=int, default=None, metavar="N",
                        help="torch intra-op threads on CPU (default: torch's choice, one per core). On a shared or "
                             "busy machine 1 is often much faster: idle threads spin while waiting for cores")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``crossdistil train``; returns the exit status."""
    logs.configure(str(args.log_level))  # the Kafka client's repeated complaints during an outage are folded
    try:
        cfg = load_config(args.config, overrides=args.overrides)
        kafka_client_options(cfg.kafka)  # a missing SASL password or CA file is said now, not at the first poll
    except ConfigError as exc:
        print(f"crossdistil train: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        cfg.model.device = args.device
    if args.check_config:
        # lazy: torch loads only when the configuration is checked or the daemon runs (crossdistil --help stays fast)
        from consumers.runtime.assembly import model_config

        try:
            model_config(cfg)
        except (TypeError, ValueError) as exc:
            print(f"crossdistil train: configuration error in [model]: {exc}", file=sys.stderr)
            return 2
        print(to_toml(cfg))
        return 0
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    try:
        start_ms = parse_time(args.from_time)
    except ValueError as exc:
        print(f"crossdistil train: --from-time: {exc}", file=sys.stderr)
        return 2
    # lazy: torch and kafka load only when the daemon runs (crossdistil --help stays fast)
    import torch

    from consumers.runtime.learner_process import LearnerProcessError
    from consumers.state.checkpoints import CheckpointError
    from consumers.trainer.daemon import Trainer

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        trainer = Trainer(cfg, exit_when_idle_s=args.exit_when_idle, ledger_dir=args.ledger, start_ms=start_ms)
        return trainer.run()
    except LearnerProcessError as exc:
        print(f"crossdistil train: {exc}\nexiting with status 6 without a checkpoint (the last one is consistent: a "
              "restart resumes from it)", file=sys.stderr)
        return 6
    except CheckpointError as exc:
        print(f"crossdistil train: {exc}", file=sys.stderr)
        return 2

"""``crossdistil demo``: the whole pipeline on this machine.

Until the trainer (issue 4) and serving (issue 6) daemons exist, the demo starts the local Kafka broker, streams
a data set into it (KuaiRand by default, or the synthetic stream) and prints the streamer's summary, then says
where the broker runs and how to stop it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KUAIRAND = REPO_ROOT.parent / "shared" / "data" / "kuairand"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crossdistil demo`` flags."""
    parser.add_argument("--dataset", default="kuairand", choices=("kuairand", "synthetic"),
                        help="what to stream (default: %(default)s)")
    parser.add_argument("--source", default=None, help=f"KuaiRand file or folder (default: {DEFAULT_KUAIRAND})")
    parser.add_argument("--speed", default="max", help="max (default), realtime, or a speed-up factor")
    parser.add_argument("--limit", type=int, default=None, help="stop after N impressions")
    parser.add_argument("--port", type=int, default=None, help="port of the local broker (default 9092)")
    parser.add_argument("--data-dir", default=None, help="the local broker's data dir")
    parser.add_argument("--stop-kafka", action="store_true", help="stop the local broker at the end")


def run(args: argparse.Namespace) -> int:
    """Start Kafka, stream the data set into it, print the summary."""
    from consumers.local_kafka import LocalKafka, LocalKafkaError, ensure_topics
    from streamer.stream import print_summary, stream_dataset

    source = args.source
    options: dict[str, str] = {}
    if args.dataset == "kuairand" and source is None:
        source = str(DEFAULT_KUAIRAND)
        if not Path(source).exists():
            print(f"crossdistil demo: KuaiRand not found at {source}; pass --source or use --dataset synthetic",
                  file=sys.stderr)
            return 2
    if args.dataset == "synthetic":
        options = {"n_events": str(args.limit or 200_000)}

    broker = LocalKafka(port=args.port, data_dir=args.data_dir)
    try:
        print(f"[demo] starting Kafka at {broker.bootstrap} (log: {broker.log_file}) ...", file=sys.stderr)
        broker.start(timeout_s=120)
        ensure_topics(broker.bootstrap)
        print(f"[demo] streaming {args.dataset} into kafka://{broker.bootstrap} at speed {args.speed} ...",
              file=sys.stderr)
        summary = stream_dataset(args.dataset, source, f"kafka://{broker.bootstrap}", options=options,
                                 speed=args.speed, limit=args.limit, progress=sys.stderr.isatty())
        print_summary(summary)
        print("[demo] the trainer and serving daemons are not implemented yet (issues 4 and 6); the events wait "
              f"in Kafka at {broker.bootstrap}.")
    except LocalKafkaError as exc:
        print(f"crossdistil demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.stop_kafka:
            broker.stop()
            print("[demo] Kafka stopped", file=sys.stderr)
        else:
            print(f"[demo] Kafka keeps running ({broker.status().describe()}); stop it with 'crossdistil kafka down'",
                  file=sys.stderr)
    return 0

"""Load on ``POST /score`` of ``crossdistil serve``: throughput and latency percentiles; prints one JSON object.

    python bench/serving_load.py                          # own broker + serving process, example model
    python bench/serving_load.py --url http://127.0.0.1:9401 --clients 4 --items 100

Unless ``--url`` names a running daemon, the script starts a broker, publishes one checkpoint of the example
model (bench/serving_pickup.py: 3 tasks, MMoE, 2**20 x 16 embeddings) and runs ``crossdistil serve`` as a child
process with ``serving.torch_threads = --torch-threads``. Then ``--clients`` threads, each on its own keep-alive
loopback connection, send requests of ``--items`` impressions back to back (bodies prepared in advance), until
each has sent ``--requests`` or ``--duration`` seconds have passed; ``--warmup`` requests per client are not
counted. Latency is measured on the client, from sending the request to reading the whole response.

``breakdown_ms`` times the parts of one request inside this process, one request at a time (no contention):
JSON parsing, validation (consumers.serving.api.parse_score_request after its json.loads: streamer.events.check_event
in place, validate() when anything fails it), encode_rows, the model's
forward, and building and encoding the JSON response as the daemon does, so that a missed target says where
the time goes. Target (issue 6): p99 <= 20 ms at 4 clients x 100
impressions.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving_pickup's helpers
import serving_pickup as pickup

REPO_ROOT = pickup.REPO_ROOT


def progress(message: str) -> None:
    print(f"[serving_load] {message}", file=sys.stderr, flush=True)


def make_bodies(count: int, items: int, seed: int = 0) -> list[bytes]:
    """``count`` request bodies of ``items`` impressions with realistic ids and features (KuaiRand-like)."""
    import random

    rng = random.Random(seed)
    bodies = []
    for r in range(count):
        events = [{"impression_id": f"r{r}-{i}", "ts_ms": 1_700_000_000_000 + r * 1000 + i,
                   "user_id": str(rng.randrange(27_000)), "item_id": str(rng.randrange(8_000_000)),
                   "features": {"hour": str(rng.randrange(24)), "weekday": str(rng.randrange(7)),
                                "duration_ms": rng.randrange(1_000, 600_000)}} for i in range(items)]
        bodies.append(json.dumps(events).encode())
    return bodies


def client(host: str, port: int, bodies: list[bytes], requests: int, warmup: int, deadline: float,
           latencies: list[float], errors: list[str]) -> None:
    """One client: a keep-alive connection, requests back to back until ``requests`` are done or the deadline."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    headers = {"Content-Type": "application/json"}
    for n in range(warmup + requests):
        if time.monotonic() > deadline:
            break
        body = bodies[n % len(bodies)]
        started = time.perf_counter()
        try:
            connection.request("POST", "/score", body, headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as exc:
            errors.append(repr(exc))
            connection.close()
            connection = http.client.HTTPConnection(host, port, timeout=30)
            continue
        elapsed = time.perf_counter() - started
        if response.status != 200:
            errors.append(f"{response.status}: {payload[:200]!r}")
        elif n >= warmup:
            latencies.append(elapsed)
    connection.close()


def breakdown(body: bytes, repeats: int, torch_threads: int, hash_buckets: int) -> dict[str, float]:
    """Median milliseconds of each part of one request, done here on a model built like serving's."""
    import statistics

    import orjson
    import torch

    from consumers.serving.api import parse_score_request
    from models.features import encode_rows
    from models.learner import ServingModel

    torch.set_num_threads(torch_threads)
    learner = pickup.example_learner(hash_buckets)
    model = ServingModel.from_serving_state(*learner.serving_state())
    parts: dict[str, list[float]] = {"json_loads": [], "validate": [], "encode_rows": [], "forward": [],
                                     "json_response": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        json.loads(body)
        t1 = time.perf_counter()
        events = parse_score_request(body, max_items=10_000)  # includes a second json.loads: subtracted below
        t2 = time.perf_counter()
        batch = encode_rows(events, model.config.features, model.config.tasks)
        t3 = time.perf_counter()
        with torch.inference_mode():
            scores = model.score(batch)
        t4 = time.perf_counter()
        # The response as the daemon builds it (score_impressions) and writes it (orjson, in _send_json).
        orjson.dumps({"model_version": 1, "step": None, "tasks": list(model.config.tasks),
                      "impression_ids": [e["impression_id"] for e in events],
                      "probabilities": {t: p.tolist() for t, p in scores.items()}}, option=orjson.OPT_APPEND_NEWLINE)
        t5 = time.perf_counter()
        parts["json_loads"].append(t1 - t0)
        parts["validate"].append(max(0.0, (t2 - t1) - (t1 - t0)))
        parts["encode_rows"].append(t3 - t2)
        parts["forward"].append(t4 - t3)
        parts["json_response"].append(t5 - t4)
    return {name: round(statistics.median(values) * 1000, 3) for name, values in parts.items()}



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="a running crossdistil serve (default: start broker + serving here)")
    parser.add_argument("--bootstrap", help="use this broker instead of starting one (ignored with --url)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--items", type=int, default=100, help="impressions per request")
    parser.add_argument("--requests", type=int, default=500, help="counted requests per client (upper bound)")
    parser.add_argument("--warmup", type=int, default=20, help="uncounted requests per client first")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds, upper bound of the whole run")
    parser.add_argument("--hash-buckets", type=int, default=2**20)
    parser.add_argument("--torch-threads", type=int, default=1, help="serving.torch_threads of the started daemon")
    parser.add_argument("--breakdown-repeats", type=int, default=50)
    args = parser.parse_args()

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="serving-load-"))
    broker = process = None
    url = args.url
    try:
        if url is None:
            bootstrap, broker = pickup.start_broker(args, workdir)
            topic = pickup.make_topic(bootstrap)
            publisher = pickup.Publisher(bootstrap, topic)
            publisher.send(pickup.checkpoint_messages(pickup.example_learner(args.hash_buckets), 1, 900_000))
            publisher.close()
            process, url = pickup.start_serving(bootstrap, topic, workdir, args.torch_threads)
        deadline = time.monotonic() + 120
        while (pickup.healthz(url) or {}).get("model_version") is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/healthz not ready within 120 s")
            time.sleep(0.1)
        bodies = make_bodies(50, args.items)
        split = urlsplit(url)
        latencies: list[float] = []
        errors: list[str] = []
        progress(f"{args.clients} clients x {args.items} impressions per request against {url}")
        run_deadline = time.monotonic() + args.duration
        threads = [threading.Thread(target=client, args=(split.hostname, split.port, bodies[c::args.clients] or bodies,
                                                         args.requests, args.warmup, run_deadline, latencies, errors))
                   for c in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        if not latencies:
            raise RuntimeError(f"no request succeeded; errors: {errors[:5]}")
        ms = sorted(x * 1000 for x in latencies)

        def p(q: float) -> float:
            return round(pickup.percentile(ms, q), 3)

        report: dict[str, Any] = {
            "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "load_avg": [round(x, 2) for x in os.getloadavg()]},
            "url": url, "clients": args.clients, "items_per_request": args.items,
            "torch_threads": args.torch_threads if args.url is None else None,
            "requests": len(ms), "errors": len(errors), "first_errors": errors[:3],
            "wall_seconds": round(wall, 3),
            # Warm-up requests fall inside the wall time too: throughput is a slight underestimate.
            "throughput": {"requests_per_s": round(len(ms) / wall, 1),
                           "items_per_s": round(len(ms) * args.items / wall, 1)},
            "latency_ms": {"p50": p(50), "p90": p(90), "p99": p(99), "max": round(ms[-1], 3),
                           "mean": round(sum(ms) / len(ms), 3)},
            "target_p99_ms": 20.0,
            "meets_target": p(99) <= 20.0,
        }
        progress("timing the parts of one request in-process")
        report["breakdown_ms"] = breakdown(bodies[0], args.breakdown_repeats, args.torch_threads, args.hash_buckets)
        print(json.dumps(report, indent=2))
        return 0
    finally:
        if process is not None:
            progress(f"serving exited with {pickup.stop_serving(process)}")
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    sys.exit(main())

"""Load on ``POST /score`` of ``crossdistil serve``: throughput and latency percentiles; prints one JSON object.

    python bench/serving_load.py                          # own broker + serving process, example model
    python bench/serving_load.py --url http://127.0.0.1:9401 --clients 4 --items 100
    git worktree add /tmp/old 5b98ff3                     # the http.server server, before issue 20
    python bench/serving_load.py --compare-with /tmp/old --out bench/results/serving_load_compare.json

``--compare-with ROOT`` runs this checkout's server and the one of the checkout at ROOT side by side, in one
run, against one broker and one published model: both daemons run all along (as separate processes), and the
scenarios alternate between them (``--rounds`` times, the order swapped each round), so both see the same
machine. Scenarios: 4 clients, 16 clients, and 4 clients while a fifth client sends one large request
(``--stall-items`` impressions with long ids, a multi-megabyte answer) and never reads its answer. Each
scenario runs ``--duration`` seconds; requests completed in its first ``--warmup-s`` are not counted. The
clients of a scenario are driven by ONE thread of this process (epoll over non-blocking keep-alive sockets,
request bytes prepared in advance, answers framed by their Content-Length: 0.03-0.06 ms of CPU per request,
reported as ``client_cpu_ms_per_request``), the same loop for both servers. The load average at the start of the
run and of each scenario is in the report: other jobs on the machine move every latency figure. The published
model is the example model without its wide part: the old server predates the wide part and cannot load it. No
process is pinned to a core (no taskset).

Unless ``--url`` names a running daemon, the script starts a broker, publishes one checkpoint of the example
model (bench/serving_pickup.py: 3 tasks, MMoE, 2**20 x 16 embeddings) and runs ``crossdistil serve`` as a child
process with ``serving.torch_threads = --torch-threads``. Then ``--clients`` threads, each on its own keep-alive
loopback connection, send requests of ``--items`` impressions back to back (bodies prepared in advance), until
each has sent ``--requests`` or ``--duration`` seconds have passed; ``--warmup`` requests per client are not
counted. Latency is measured on the client, from sending the request to reading the whole response.

``breakdown_ms`` times the parts of one request inside this process, one request at a time (no contention):
JSON parsing, validation (consumers.serving.api.parse_score_request after its json.loads: streamer.events.check_event
in place, validate() when anything fails it), encoding (encode_for_scoring, as ServingModel.score_rows), the model's
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
import resource
import socket
import statistics
import subprocess
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
    from models.features import encode_for_scoring
    from models.learner import ServingModel

    torch.set_num_threads(torch_threads)
    learner = pickup.example_learner(hash_buckets)
    model = ServingModel.from_serving_state(*learner.serving_state())
    parts: dict[str, list[float]] = {"json_loads": [], "validate": [], "encode": [], "forward": [],
                                     "json_response": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        json.loads(body)
        t1 = time.perf_counter()
        events = parse_score_request(body, max_items=10_000)  # includes a second json.loads: subtracted below
        t2 = time.perf_counter()
        batch = encode_for_scoring(events, model.config.features, model.config.tasks)
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
        parts["encode"].append(t3 - t2)
        parts["forward"].append(t4 - t3)
        parts["json_response"].append(t5 - t4)
    return {name: round(statistics.median(values) * 1000, 3) for name, values in parts.items()}



def run_clients(host: str, port: int, bodies: list[list[bytes]], started: float, warmup_s: float, deadline: float,
                latencies: list[float], errors: list[str], completed: list[int]) -> None:
    """``len(bodies)`` keep-alive clients, each sending back to back until ``deadline``, all driven by ONE thread
    over non-blocking sockets (epoll); requests done after the warm-up are counted in ``latencies``.

    One thread and prepared request bytes, not a thread per client with http.client: on 2 shared cores, 16
    client threads parsing headers took CPU from the servers under test and added their own GIL waits to the
    latencies. Here a client costs a send, a recv or two and a search for Content-Length per request. Both
    servers are measured by the same loop.
    """
    import selectors

    prepared = [[(f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n").encode() + body for body in mine] for mine in bodies]
    selector = selectors.DefaultSelector()
    clients = [_Client(n, requests) for n, requests in enumerate(prepared)]

    def connect(c: _Client) -> None:
        c.sock = socket.create_connection((host, port), timeout=30)
        c.sock.setblocking(False)
        selector.register(c.sock, selectors.EVENT_READ, c)

    def send_next(c: _Client) -> None:
        request = c.requests[c.sent % len(c.requests)]
        c.sent += 1
        c.data, c.length, c.head_end = b"", -1, -1
        c.t0 = time.perf_counter()
        c.sock.setblocking(True)  # a request (~13 kB) fits the socket buffer: sendall returns at once
        c.sock.sendall(request)
        c.sock.setblocking(False)

    def fail(c: _Client, what: str) -> None:
        errors.append(what)
        selector.unregister(c.sock)
        c.sock.close()
        connect(c)
        send_next(c)

    for c in clients:
        connect(c)
        send_next(c)
    while clients and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            c = key.data
            try:
                chunk = c.sock.recv(262144)
            except BlockingIOError:
                continue
            except OSError as exc:
                fail(c, repr(exc))
                continue
            if not chunk:
                fail(c, "connection closed")
                continue
            c.data += chunk
            if c.head_end < 0:
                c.head_end = c.data.find(b"\r\n\r\n")
                if c.head_end < 0:
                    continue
                head = c.data[:c.head_end].lower()
                at = head.find(b"content-length:")
                if at < 0:
                    fail(c, f"no Content-Length in {head[:200]!r}")
                    continue
                line_end = head.find(b"\r\n", at)
                c.length = int(head[at + 15:line_end if line_end > 0 else None])
                c.status = int(head[9:12])
            if len(c.data) - c.head_end - 4 < c.length:
                continue
            elapsed = time.perf_counter() - c.t0
            completed.append(1)
            if c.status != 200:
                errors.append(f"status {c.status}")
            elif time.monotonic() - started >= warmup_s:
                latencies.append(elapsed)
            if time.monotonic() < deadline:
                send_next(c)
    for c in clients:
        selector.unregister(c.sock)
        c.sock.close()
    selector.close()


class _Client:
    """One keep-alive connection of :func:`run_clients` and the answer it is reading."""

    def __init__(self, number: int, requests: list[bytes]) -> None:
        self.number = number
        self.requests = requests
        self.sock: socket.socket = None  # type: ignore[assignment]
        self.sent = 0
        self.data = b""
        self.head_end = -1
        self.length = -1
        self.status = 0
        self.t0 = 0.0


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of process ``pid`` now and at its peak (VmRSS, VmHWM), in MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(status[name].split()[0]) / 1024, 1) for key, name in (("rss", "VmRSS"), ("peak", "VmHWM"))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds() -> float:
    """User + system CPU time of the calling thread so far (Linux: RUSAGE_THREAD)."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def stall_body(items: int, id_length: int = 300) -> bytes:
    """One large valid request whose answer is a few megabytes (long impression ids come back in it)."""
    events = [{"impression_id": f"s{i}".ljust(id_length, "x"), "ts_ms": 1_700_000_000_000 + i, "user_id": str(i),
               "item_id": str(i), "features": {"hour": "1", "weekday": "2", "duration_ms": 1000}} for i in range(items)]
    return json.dumps(events).encode()


def never_reading_client(host: str, port: int, body: bytes) -> socket.socket:
    """Sends ``body`` as a POST /score on a socket with a tiny receive buffer and never reads the answer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    head = (f"POST /score HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    sock.sendall(head + body)
    return sock


def run_scenario(url: str, clients: int, bodies: list[bytes], duration_s: float, warmup_s: float,
                 stalled: bytes | None, pid: int | None = None) -> dict[str, Any]:
    """``clients`` keep-alive clients for ``duration_s``, optionally next to a never-reading client; ``pid``:
    the server's process, whose CPU time per request is reported."""
    split = urlsplit(url)
    stalled_socket = never_reading_client(split.hostname, split.port, stalled) if stalled else None
    try:
        if stalled_socket is not None:
            time.sleep(0.5)  # its request is scored and its answer is being written before the others start
        latencies: list[float] = []
        errors: list[str] = []
        started = time.monotonic()
        deadline = started + duration_s
        cpu_at_start = cpu_seconds(pid) if pid else None
        load_at_start = os.getloadavg()[0]
        client_at_start = thread_cpu_seconds()
        completed: list[int] = []
        run_clients(split.hostname, split.port, [bodies[c::clients] or bodies for c in range(clients)], started,
                    warmup_s, deadline, latencies, errors, completed)
        client_cpu = thread_cpu_seconds() - client_at_start
        cpu = cpu_seconds(pid) - cpu_at_start if pid and cpu_at_start is not None else None
    finally:
        if stalled_socket is not None:
            stalled_socket.close()
    ms = sorted(x * 1000 for x in latencies)

    def p(q: float) -> float | None:
        return round(pickup.percentile(ms, q), 3) if ms else None

    return {"clients": clients, "never_reading_client": stalled is not None, "requests": len(ms),
            "errors": len(errors), "first_errors": errors[:3],
            "requests_per_s": round(len(ms) / (duration_s - warmup_s), 1),
            "latency_ms": {"p50": p(50), "p90": p(90), "p99": p(99), "max": round(ms[-1], 3) if ms else None},
            # over the whole scenario (warm-up included): the server's CPU per answered request
            "server_cpu_ms_per_request": round(cpu * 1000 / len(completed), 3) if cpu and completed else None,
            # the load generator's own thread (all clients): what it takes from the 2 cores the servers share
            "client_cpu_ms_per_request": round(client_cpu * 1000 / len(completed), 3) if completed else None,
            "load_avg_1m_at_start": round(load_at_start, 2), "load_avg_1m": round(os.getloadavg()[0], 2)}


# Both servers take the never-reading client's request: its answer (~7 MB) must outgrow the kernel's socket
# buffers (tcp_wmem's 4 MiB here) to stall a writer; the default 4 MiB request limit keeps answers below that.
STALL_LIMITS = {"max_request_bytes": 16 * 1024 * 1024, "max_items": 20_000}

SCENARIOS = (("4 clients", 4, False), ("16 clients", 16, False), ("4 clients + never-reading client", 4, True))


def wait_ready(url: str, timeout_s: float = 120.0) -> None:
    """Wait until the server at ``url`` serves a model (its /healthz names a version)."""
    deadline = time.monotonic() + timeout_s
    while (pickup.healthz(url) or {}).get("model_version") is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz not ready within {timeout_s:.0f} s")
        time.sleep(0.1)


def compare(args: argparse.Namespace, bootstrap: str, topic: str, workdir: Path) -> dict[str, Any]:
    """Old (``--compare-with``) and new server side by side: every scenario on both, alternating, ``--rounds``."""
    roots = {"old": Path(args.compare_with).resolve(), "new": REPO_ROOT}
    # what the servers run, taken at their start
    commits = {name: pickup.git_commit(root) for name, root in roots.items()}
    processes: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    try:
        for name, root in roots.items():
            processes[name], urls[name] = pickup.start_serving(bootstrap, topic, workdir, args.torch_threads,
                                                               root=root, name=name, options=STALL_LIMITS)
        for url in urls.values():
            wait_ready(url)
        bodies = make_bodies(50, args.items)
        stalled = stall_body(args.stall_items)
        runs: dict[str, dict[str, list]] = {name: {label: [] for label, _, _ in SCENARIOS} for name in roots}
        for round_index in range(args.rounds):
            order = ["old", "new"] if round_index % 2 == 0 else ["new", "old"]
            for label, clients, with_stall in SCENARIOS:
                for name in order:
                    progress(f"round {round_index + 1}/{args.rounds}: {name} server, {label}")
                    runs[name][label].append(run_scenario(urls[name], clients, bodies, args.duration, args.warmup_s,
                                                          stalled if with_stall else None, processes[name].pid))
        memory = {name: memory_mb(process.pid) for name, process in processes.items()}
    finally:
        for name, process in processes.items():
            progress(f"{name} serving exited with {pickup.stop_serving(process)}")
    report = summarise(args, roots, commits, runs, len(stalled))
    report["server_memory_mb_at_end"] = memory  # one process each, example model loaded, after all scenarios
    return report


def summarise(args: argparse.Namespace, roots: dict[str, Path], commits: dict[str, str],
              runs: dict[str, dict[str, list]], stall_bytes: int) -> dict[str, Any]:
    """Medians over the rounds of each scenario's p99 and throughput, the ratios and the issue's targets."""
    def median(name: str, label: str, pick: Any) -> float | None:
        values = [pick(run) for run in runs[name][label] if pick(run) is not None]
        return round(statistics.median(values), 3) if values else None

    summary = {name: {label: {"p50_ms": median(name, label, lambda r: r["latency_ms"]["p50"]),
                              "p99_ms": median(name, label, lambda r: r["latency_ms"]["p99"]),
                              "requests_per_s": median(name, label, lambda r: r["requests_per_s"]),
                              "server_cpu_ms_per_request": median(name, label,
                                                                  lambda r: r["server_cpu_ms_per_request"]),
                              "client_cpu_ms_per_request": median(name, label,
                                                                  lambda r: r.get("client_cpu_ms_per_request")),
                              "errors": sum(r["errors"] for r in runs[name][label])}
                      for label, _, _ in SCENARIOS} for name in runs}
    new, old = summary["new"], summary["old"]
    p99_16, rps_ratio = new["16 clients"]["p99_ms"], None
    if old["16 clients"]["requests_per_s"]:
        rps_ratio = round(new["16 clients"]["requests_per_s"] / old["16 clients"]["requests_per_s"], 3)

    def stall_ratio(side: dict) -> float | None:
        with_stall, without = side["4 clients + never-reading client"]["p99_ms"], side["4 clients"]["p99_ms"]
        return round(with_stall / without, 2) if with_stall and without else None

    return {
        "environment": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "load_avg_at_start": args.load_at_start,
                        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "servers": {name: {"root": str(root), "commit": commits[name]} for name, root in roots.items()},
        "settings": {"items_per_request": args.items, "duration_s": args.duration, "warmup_s": args.warmup_s,
                     "rounds": args.rounds, "torch_threads": args.torch_threads, "hash_buckets": args.hash_buckets,
                     "never_reading_request_bytes": stall_bytes, "never_reading_items": args.stall_items,
                     "serving_options_of_both": STALL_LIMITS,
                     "model": "the example model (MMoE, 3 tasks) without its wide part: the old server predates it",
                     "client": "keep-alive raw sockets, all clients in one epoll thread"},
        "summary_medians_over_rounds": summary,
        "targets": {
            "new_p99_ms_at_16_clients": p99_16, "p99_at_16_le_25_ms": p99_16 is not None and p99_16 <= 25,
            "throughput_ratio_new_over_old_at_16": rps_ratio,
            "throughput_ge_1_5x_old": rps_ratio is not None and rps_ratio >= 1.5,  # 3 decimals: 1.496 is not met
            "p99_ratio_with_never_reading_client": {"new": stall_ratio(new), "old": stall_ratio(old)},
            "never_reading_within_2x": (stall_ratio(new) or 99) <= 2.0,
        },
        "runs": runs,
    }


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
    parser.add_argument("--compare-with", metavar="ROOT",
                        help="a checkout of another commit (e.g. a git worktree of 5b98ff3): run both servers side "
                             "by side, 4 and 16 clients and a never-reading client (see the docstring)")
    parser.add_argument("--rounds", type=int, default=2, help="--compare-with: rounds of all scenarios")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="--compare-with: uncounted seconds per scenario")
    parser.add_argument("--stall-items", type=int, default=20_000,
                        help="--compare-with: impressions in the never-reading client's request")
    parser.add_argument("--out", help="also write the JSON report to this file")
    args = parser.parse_args()
    args.load_at_start = [round(x, 2) for x in os.getloadavg()]  # what else ran on the machine (uptime's figures)
    if args.compare_with:
        args.duration = args.duration if args.duration != 60.0 else 6.0

    import torch

    workdir = Path(tempfile.mkdtemp(prefix="serving-load-"))
    broker = process = None
    url = args.url
    try:
        if url is None:
            bootstrap, broker = pickup.start_broker(args, workdir)
            topic = pickup.make_topic(bootstrap)
            publisher = pickup.Publisher(bootstrap, topic)
            if args.compare_with:  # a model both servers load: the old one predates the wide part and the counts
                legacy = pickup.example_learner(args.hash_buckets, wide="none", counts=False)
                messages = pickup.checkpoint_messages(legacy, 1, 900_000, legacy=True)
            else:
                messages = pickup.checkpoint_messages(pickup.example_learner(args.hash_buckets), 1, 900_000)
            publisher.send(messages)
            publisher.close()
            if args.compare_with:
                report = compare(args, bootstrap, topic, workdir)
                write_report(report, args.out)
                return 0
            process, url = pickup.start_serving(bootstrap, topic, workdir, args.torch_threads)
        wait_ready(url)
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
        write_report(report, args.out)
        return 0
    finally:
        if process is not None:
            progress(f"serving exited with {pickup.stop_serving(process)}")
        if broker is not None:
            broker.stop()


def write_report(report: dict[str, Any], out: str | None) -> None:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())

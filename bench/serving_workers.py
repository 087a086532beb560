"""Memory of ``crossdistil serve`` with 1, 2, 4 worker processes (``serving.workers``); prints one JSON object.

A local broker (or ``--bootstrap``), the example model published once (bench/serving_pickup.py's), then for each
worker count a server on a fixed port: once every worker has loaded the model (``/healthz`` ok and the number of
processes under the parent as expected, after ``--settle-s``), the resident (RSS) and proportional (PSS: shared pages
split between the processes that map them) set sizes of the parent and every descendant, from /proc (Linux only).
PSS is the memory the workers really add together; RSS double-counts the shared libraries.

    python bench/serving_workers.py [--workers 1,2,4] [--hash-buckets 1048576]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serving_pickup as pickup  # noqa: E402 - a sibling script


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_mib(pid: int) -> dict[str, float]:
    """Rss and Pss of one process in MiB (/proc/PID/smaps_rollup)."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower() + "_mib"] = int(rest.split()[0]) / 1024
    return values


def measure(bootstrap: str, topic: str, workdir: Path, workers: int, settle_s: float) -> dict:
    options = {"workers": workers} if workers > 1 else {}  # start_serving fixes the port, as workers need
    process, url = pickup.start_serving(bootstrap, topic, workdir, name=f"serving-{workers}", options=options)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the parent answers only through its workers when there are several
            health = pickup.healthz(url)
            if health and health.get("status") == "ok" and len(descendants(process.pid)) >= workers + (workers > 1):
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{workers} worker(s) did not all load the model within 180 s")
        time.sleep(settle_s)  # the other workers load the model too: /healthz answers from one of them
        pids = descendants(process.pid)
        per_process = [{"pid": p, **memory_mib(p)} for p in pids]
        return {"workers": workers, "processes": len(pids),
                "rss_mib_total": round(sum(p["rss_mib"] for p in per_process), 1),
                "pss_mib_total": round(sum(p["pss_mib"] for p in per_process), 1),
                "per_process": [{k: round(v, 1) if isinstance(v, float) else v for k, v in p.items()}
                                for p in per_process]}
    finally:
        pickup.stop_serving(process)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure")
    parser.add_argument("--hash-buckets", type=int, default=2**20)
    parser.add_argument("--settle-s", type=float, default=10.0, help="wait after the first worker is ready")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serving-workers-") as tmp:
        workdir = Path(tmp)
        bootstrap, broker = pickup.start_broker(args, workdir)
        try:
            topic = pickup.make_topic(bootstrap)
            publisher = pickup.Publisher(bootstrap, topic)
            publisher.send(pickup.checkpoint_messages(pickup.example_learner(args.hash_buckets), 1, 900_000))
            publisher.close()
            runs = [measure(bootstrap, topic, workdir, int(n), args.settle_s) for n in args.workers.split(",")]
        finally:
            if broker is not None:
                broker.stop()
    base = runs[0]["pss_mib_total"]
    print(json.dumps({"hash_buckets": args.hash_buckets, "runs": runs,
                      "pss_mib_per_extra_worker": [round((r["pss_mib_total"] - base) / max(r["workers"] - 1, 1), 1)
                                                   for r in runs[1:]]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

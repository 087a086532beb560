"""How long a trainer takes to start, this checkout against another, side by side; prints one JSON object.

    git worktree add /tmp/old <commit>
    python bench/startup.py --against /tmp/old --rounds 3      # starts its own broker (~20 s), ~2 min in all

Each round starts ``crossdistil train`` of ``deploy/trainer.example.toml`` (a fresh checkpoint folder, its own consumer
group and topics, ``--exit-when-idle 1``) in the old checkout and then in this one, for each mode (``--modes``: the
learner in the trainer's process, the default, and in a learner process of its own), and reads two moments off the
trainer's log: ``ready`` (the learner process said it is ready; in-process: the first line of the trainer, written
once its learner is built) and ``assigned`` (the first assignment with partitions: the trainer can consume). Both in
seconds from the ``Popen``; medians over the rounds and the medians of the per-round ratios old / new (> 1: this
checkout starts faster). What a start costs is mostly imports (torch, river, scipy) and torch's first optimizer.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serving_pickup's helpers

from serving_pickup import git_commit, start_broker  # noqa: E402

from streamer.topics import ensure_topics  # noqa: E402

MODES = {"in_process": "false", "learner_process": "true"}
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def progress(text: str) -> None:
    print(f"[startup] {text}", file=sys.stderr, flush=True)


def _moment(log: str, marker: str) -> float | None:
    """The wall-clock time (epoch seconds) of the first log line containing ``marker``."""
    for line in log.splitlines():
        if marker in line and (match := _STAMP.match(line)):
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def start_once(root: Path, bootstrap: str, separate: str, workdir: Path) -> dict[str, float]:
    """One trainer of the checkout at ``root`` from ``Popen`` to its exit; seconds to ``ready`` and ``assigned``."""
    tag = uuid.uuid4().hex[:8]
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    topics = {"impression_topic": f"startup-imp-{tag}", "feedback_topic": f"startup-fb-{tag}",
              "dead_letter_topic": f"startup-dl-{tag}", "model_topic": f"startup-model-{tag}"}
    ensure_topics(bootstrap, 4, **topics)  # as `crossdistil kafka up` makes them (empty: the trainer idles out)
    overrides = {"kafka.bootstrap": bootstrap, "kafka.group_id": f"startup-{tag}",
                 "kafka.impressions_topic": topics["impression_topic"],
                 "kafka.feedback_topic": topics["feedback_topic"], "kafka.model_topic": topics["model_topic"],
                 "kafka.dead_letter_topic": topics["dead_letter_topic"],
                 "checkpoint.dir": str(run_dir / "checkpoints"), "model.separate_process": separate,
                 "metrics.port": "0"}
    command = [sys.executable, "-m", "consumers.cli", "train", "--config", "deploy/trainer.example.toml",
               "--exit-when-idle", "1", "--torch-threads", "1"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    started = time.time()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise SystemExit(f"the trainer of {root} exited {done.returncode}:\n{done.stderr[-3000:]}")
    ready = _moment(done.stderr, "ready on ") if separate == "true" else _moment(done.stderr, "crossdistil.trainer:")
    assigned = _moment(done.stderr, "trainer: assigned ['")
    if ready is None or assigned is None:
        raise SystemExit(f"no 'ready' or 'assigned' line in the log of {root}:\n{done.stderr[-3000:]}")
    return {"ready_s": ready - started, "assigned_s": assigned - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    roots = {"old": args.against.resolve(), "new": REPO_ROOT}
    times: dict[str, dict[str, list[dict[str, float]]]] = {m: {"old": [], "new": []} for m in modes}
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        workdir = Path(tmp)
        bootstrap, broker = start_broker(args, workdir)
        try:
            for round_ in range(args.rounds):
                for mode in modes:
                    for label, root in roots.items():
                        progress(f"round {round_ + 1}/{args.rounds}: {mode}, {label}")
                        times[mode][label].append(start_once(root, bootstrap, MODES[mode], workdir))
        finally:
            if broker is not None:
                broker.stop()
    result: dict = {"rounds": args.rounds, "commits": {}, "modes": {}}
    result["commits"] = {label: git_commit(root) for label, root in roots.items()}
    for mode in modes:
        entry: dict = {}
        for moment in ("ready_s", "assigned_s"):
            old = [t[moment] for t in times[mode]["old"]]
            new = [t[moment] for t in times[mode]["new"]]
            ratio = statistics.median(o / n for o, n in zip(old, new))
            entry[moment] = {"old_median": round(statistics.median(old), 2),
                             "new_median": round(statistics.median(new), 2),
                             "old_to_new_median_of_rounds": round(ratio, 3),
                             "old_rounds": [round(v, 2) for v in old], "new_rounds": [round(v, 2) for v in new]}
        result["modes"][mode] = entry
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a warm start is worth: a task added to a model that has learnt for a while, warm-started or from scratch.

    python bench/warm_start.py                            # KuaiRand, the model of deploy/trainer.example.toml
    python bench/warm_start.py --seeds 0,1,2 --cut 0.5 --out bench/results/warm_start.json

The trainer's own code path, replayed in event time in batches of 256 (``consumers.core.pipeline``, as ``crossdistil
backtest --batching dense`` does):
a model of ``--tasks-before`` learns the first ``--cut`` of the stream; at that cut its learner state and its stream
state are what a checkpoint holds. Then, over the rest of the stream, the same samples train (in the same batches):

* ``warm``: a new model of ``--tasks-after`` started from the old one's weights (``Learner.warm_start``: the
  checkpoint's tensors wherever they still fit) and from its cut of the stream (``retasked_stream``), as
  ``checkpoint.warm_start`` with ``warm_start_stream = "resume"`` does;
* ``cold``: the same new model from scratch (its own initialisation), from the same cut of the stream;
* ``unchanged``: the old model trained on, its tasks only (the reference a warm start should approach).

Prints (and with ``--out`` writes) the prequential AUC of every task over the first N samples after the cut, per
seed and as the mean over the seeds. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

WINDOWS = {"click": 30, "long_view": 700, "like": 700}  # longer than every delay of KuaiRand (tests/integration)
MODEL = {"backbone": "mmoe", "rung": "mtl", "features": {
    "categorical": ["user_id", "item_id", "hour", "weekday"], "numeric": ["duration_ms"], "hash_buckets": 1 << 20}}


def config(tasks: list[str], seed: int):
    from consumers.runtime.config import load_config, toml_value

    return load_config(None, env={}, overrides=[
        f"model.tasks={toml_value(tasks)}", f"model.options={toml_value(MODEL)}", f"model.seed={seed}",
        f"join.attribution_window_s={toml_value(WINDOWS)}", "batching.batch_size=256", "model.device=cpu"])


class Recorder:
    """The labels and predictions of every trained batch (a pipeline's ``on_batch``), per task."""

    def __init__(self, tasks: list[str]) -> None:
        self.tasks, self.labels, self.scores = tasks, [], []

    def __call__(self, _samples, labels, scores, _fired) -> None:  # {task: [n]} each
        self.labels.append(np.stack([labels[task] for task in self.tasks], axis=1))
        self.scores.append(np.stack([scores[task] for task in self.tasks], axis=1))

    def aucs(self, firsts: list[int]) -> dict[str, dict[str, float]]:
        from models.metrics import auc

        labels, scores = np.concatenate(self.labels), np.concatenate(self.scores)
        out = {}
        for n in firsts:
            key = "all" if n == 0 else str(n)
            out[key] = {task: round(float(auc(labels[:n or None, k], scores[:n or None, k])), 4)
                        for k, task in enumerate(self.tasks)}
        return out


def feed(pipeline, events) -> None:
    for topic, event in events:
        pipeline.ingest([dict(event)], (topic, 0))
        pipeline.train_ready()


def run_seed(events: list, cut: int, before: list[str], after: list[str], seed: int, firsts: list[int]) -> dict:
    from consumers.runtime.assembly import build_pipeline
    from consumers.trainer.checkpointing import retasked_stream
    from models.warm_start import describe

    old_cfg, new_cfg = config(before, seed), config(after, seed)
    unchanged = Recorder(before)
    # dense batches of 256 (a backlog's, as the live trainer cuts them): max_batch_delay_s in event time would cut
    # KuaiRand's sparse stream into batches of a sample or two
    old = build_pipeline(old_cfg, clock=None, dense=True,
                         on_batch=lambda *a: unchanged(*a) if recording[0] else None)
    recording = [False]
    feed(old, events[:cut])
    old.collect(wait=True)
    learner_state = old.learner.learner.state_dict()
    stream = {**old.stream_state(), "positions": []}
    state, changed = retasked_stream(stream, new_cfg.model.tasks)
    results = {}
    for variant in ("warm", "cold"):
        recorder = Recorder(after)
        pipeline = build_pipeline(new_cfg, clock=None, dense=True, on_batch=recorder)
        if variant == "warm":
            report = pipeline.learner.learner.warm_start(learner_state)
            print(f"[warm_start] seed {seed}: {describe(report)}", file=sys.stderr, flush=True)
        pipeline.load_stream_state(state)
        started = time.perf_counter()
        feed(pipeline, events[cut:])
        pipeline.flush()
        results[variant] = {"aucs": recorder.aucs(firsts), "seconds": round(time.perf_counter() - started, 1)}
        pipeline.close()
    recording[0] = True
    feed(old, events[cut:])
    old.flush()
    results["unchanged"] = {"aucs": unchanged.aucs(firsts)}
    old.close()
    results["held_at_cut"] = changed["samples"]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "kuairand"))
    parser.add_argument("--tasks-before", default="click,long_view")
    parser.add_argument("--tasks-after", default="click,long_view,like")
    parser.add_argument("--cut", type=float, default=0.5, help="share of the stream's events before the change")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--firsts", default="1000,2000,5000,10000,0",
                        help="AUC over the first N samples after the cut (0 = all of them)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    from streamer.datasets import open_dataset
    from streamer.stream import merge_events

    torch.set_num_threads(1)
    dataset = open_dataset("kuairand", args.source)
    events = [(routed.topic, routed.event) for routed in merge_events(dataset.interactions())]
    cut = int(len(events) * args.cut)
    before, after = args.tasks_before.split(","), args.tasks_after.split(",")
    firsts = [int(n) for n in args.firsts.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {seed: run_seed(events, cut, before, after, seed, firsts) for seed in seeds}
    mean = {variant: {n: {task: round(float(np.mean([per_seed[s][variant]["aucs"][n][task] for s in seeds])), 4)
                          for task in per_seed[seeds[0]][variant]["aucs"][n]}
                      for n in per_seed[seeds[0]][variant]["aucs"]}
            for variant in ("warm", "cold", "unchanged")}
    out = {"dataset": "kuairand", "events": len(events), "cut_event": cut, "tasks_before": before,
           "tasks_after": after, "model": MODEL, "seeds": seeds, "mean": mean,
           "per_seed": {str(s): r for s, r in per_seed.items()}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

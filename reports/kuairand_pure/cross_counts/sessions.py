"""Within-user ranking at one time, not pooled over days: does a model rank a user's impressions of one session in
the right order? (reports/kuairand_pure/README.md §3f)

A prequential GAUC pools each user's impressions over the whole window (the last 20 % of the stream: days), scored
by a model whose online counts move after every labelled row. Inputs that follow a user's own recent labels (their
rates, per tab, per video type) shift all of that user's later scores together, which a pooled GAUC counts as
within-user misranking although no two of those impressions were ever ranked against each other. A recommender
ranks the candidates of one request. This script scores the stream prequentially like ``crossdistil evaluate
--mode prequential`` (same data, features, batches and seeds) for two count settings and reports, on the tail,
the AUC, the GAUC by user (evaluate's) and the GAUC by *session*: a user's impressions with less than ``--gap-s``
seconds between consecutive ones (KuaiRand-Pure logs each impression alone; a session is the closest thing to a
request it has).

    PYTHONPATH=. .venv/bin/python reports/kuairand_pure/cross_counts/sessions.py --seeds 0,1,2 \\
        > reports/kuairand_pure/cross_counts/sessions.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from consumers.tools.evaluate import feature_spec_for, load_encoded, seeded_learner
from models.evaluation import score_stream, tail_start
from models.metrics import auc, gauc
from streamer.datasets import open_dataset

SOURCE = "../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv"
SETTINGS = {"mtl": "user_id,item_id",
            "mtl[crosses]": "user_id,item_id,user_id*tab,user_id*video_type,user_id*music_type"}


def sessions(users: np.ndarray, ts_ms: np.ndarray, gap_s: float) -> np.ndarray:
    """A session id per row: rows of one user with less than ``gap_s`` seconds between consecutive ones."""
    order = np.lexsort((ts_ms, users))
    u, t = users[order], ts_ms[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > gap_s * 1000)
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def mixed_rows(y: np.ndarray, groups: np.ndarray) -> int:
    """Rows in groups holding both a positive and a negative (the only ones a GAUC counts)."""
    _, inverse = np.unique(groups, return_inverse=True)
    positives = np.bincount(inverse, weights=y)
    sizes = np.bincount(inverse)
    mixed = (positives > 0) & (positives < sizes)
    return int(sizes[mixed].sum())


def prequential_scores(tasks: list[str], fields: str, seed: int, backbone: str, data, spec) -> dict[str, np.ndarray]:
    """Every row's score before the learner learns from it (``models.evaluation.score_stream``, as
    ``run_prequential`` scores them)."""
    learner = seeded_learner(tasks, backbone, "mtl", seed, spec, {"count_features": fields}, "cpu")
    return score_stream(learner, data, batch_size=256)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="click,long_view;finish,like")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="shared_bottom")
    parser.add_argument("--gaps-s", default="600,3600,21600",
                        help="session gaps: a session ends after this many seconds idle (one GAUC per gap)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = open_dataset("csv", SOURCE, mapping="mappings/kuairand_pure.toml")
    spec = feature_spec_for(dataset, (), 262144)
    gaps = [float(g) for g in args.gaps_s.split(",")]
    for pair in args.pairs.split(";"):
        tasks = pair.split(",")
        data = load_encoded(dataset, tasks, spec)
        tail = tail_start(len(data), 0.2)
        users = np.asarray(data.users)[tail:]
        groups = {g: sessions(users, np.asarray(data.ts_ms)[tail:], g) for g in gaps}
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, fields in SETTINGS.items():
                scores = prequential_scores(tasks, fields, seed, args.backbone, data, spec)
                for k, task in enumerate(tasks):
                    y, p = data.labels[tail:, k], scores[task][tail:]
                    line = {"tasks": tasks, "seed": seed, "config": name, "task": task, "window": "tail",
                            "auc": auc(y, p), "gauc_user": gauc(y, p, users), "rows_user": mixed_rows(y, users)}
                    for g, ids in groups.items():
                        line[f"gauc_session_{g:g}s"] = gauc(y, p, ids)
                        line[f"rows_session_{g:g}s"] = mixed_rows(y, ids)
                    print(json.dumps(line), flush=True)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Why a prequential GAUC falls with inputs that follow a user's own labels (reports/kuairand_pure/README.md §3h).

On the validation slice (the first 80 % of events; the test split is never read) this scores the tail of the stream
twice per run, as ``crossdistil evaluate --mode prequential --publications 4`` does (``models.evaluation.
score_stream``): prequentially (each batch before the model learns from it) and as served (each of 4 stretches by
the model as it was at the stretch's start). Per count setting and task it prints, as JSON lines, the GAUC of three
groupings and the share of a user's (positive, negative) pairs ranked right, split by whether the negative came
before or after the positive:

* ``gauc_user``: the prequential GAUC ``evaluate`` reports in the ``tail`` window (a user's rows over every state);
* ``gauc_user_stretch``: the same prequential scores grouped per (user, stretch): the pairs of the ``served``
  window, scored by the moving model (separates which pairs are compared from which state scored them);
* ``gauc_served``: the ``served`` window's GAUC (those pairs, one state);
* ``right_neg_before`` / ``right_neg_after``: prequential scores, pairs of one user anywhere in the tail.

    PYTHONPATH=. .venv/bin/python reports/kuairand_pure/cross_counts/served_pairs.py \\
        > reports/kuairand_pure/cross_counts/served_pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from consumers.tools.evaluate import VALIDATION_TEST_FRACTION, feature_spec_for, load_encoded, seeded_learner
from models.evaluation import score_stream, served_stretches, tail_start, user_stretches
from models.metrics import gauc
from streamer.datasets import open_dataset

SOURCE = "../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv"
CROSSES = "user_id,item_id,user_id*tab,user_id*video_type,user_id*music_type"
SETTINGS = {"mtl": {"count_features": "user_id,item_id"},
            "mtl[crosses]": {"count_features": CROSSES},
            "mtl[crosses_c50]": {"count_features": CROSSES, "count_cross_smoothing": 50.0}}


def right_by_order(y: np.ndarray, p: np.ndarray, users: np.ndarray) -> tuple[float, float, int, int]:
    """Share of each user's (positive, negative) pairs with the positive scored higher (ties half), for pairs whose
    negative came before the positive and after it; and the two pair counts."""
    right = {True: [], False: []}
    order = np.argsort(users, kind="stable")
    cuts = np.flatnonzero(users[order][1:] != users[order][:-1]) + 1
    for rows in np.split(order, cuts):
        pos, neg = rows[y[rows] == 1], rows[y[rows] == 0]
        if len(pos) and len(neg):
            i, j = np.meshgrid(pos, neg, indexing="ij")
            ok = (p[i] > p[j]) + 0.5 * (p[i] == p[j])
            after = j > i
            right[True].append(ok[after])
            right[False].append(ok[~after])
    before, after = np.concatenate(right[False]), np.concatenate(right[True])
    return float(before.mean()), float(after.mean()), len(before), len(after)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="click,long_view;finish,like")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--publications", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = open_dataset("csv", SOURCE, mapping="mappings/kuairand_pure.toml")
    spec = feature_spec_for(dataset, (), 262144)
    for pair in args.pairs.split(";"):
        tasks = pair.split(",")
        full = load_encoded(dataset, tasks, spec)
        data = full.head(int(len(full) * 0.8))  # evaluate --validation's slice
        tail = tail_start(len(data), VALIDATION_TEST_FRACTION)
        stretches = served_stretches(tail, len(data), args.publications)
        users = np.asarray(data.users)[tail:]
        groups = user_stretches(users, stretches - tail)
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, options in SETTINGS.items():
                learner = seeded_learner(tasks, "shared_bottom", "mtl", seed, spec, options, "cpu")
                prequential, [served], _ = score_stream(learner, data, batch_size=256, stretches=[stretches])
                for k, task in enumerate(tasks):
                    y, p = data.labels[tail:, k], prequential[task][tail:]
                    before, after, n_before, n_after = right_by_order(y, p, users)
                    print(json.dumps({"tasks": tasks, "seed": seed, "config": name, "task": task,
                                      "gauc_user": gauc(y, p, users), "gauc_user_stretch": gauc(y, p, groups),
                                      "gauc_served": gauc(y, served[task], groups),
                                      "right_neg_before": before, "right_neg_after": after,
                                      "pairs_neg_before": n_before, "pairs_neg_after": n_after}), flush=True)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()

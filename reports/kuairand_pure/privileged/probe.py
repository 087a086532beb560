"""Probe: does a teacher that sees privileged (post-impression) outcomes teach a student that does not?

Validation slice only (``crossdistil evaluate --validation``'s rows: train on the first 72 % of KuaiRand-Pure, test on
the next 8 %; the test split is never read). The teacher is the default ``mtl`` model with extra numeric inputs that
exist only after the impression (``--privileged``: e.g. is_profile_enter, profile_stay_time); the student is the
default ``mtl`` model on impression-time features, trained on the same batches with the soft target
``(1 - lam) * y + lam * p_T`` (p_T: the teacher's prediction of the batch before it learns from it, as a stream
would have it). ``lam = 0`` is plain ``mtl``. Prints one JSON line per run.

    PYTHONPATH=. python reports/kuairand_pure/privileged/probe.py --tasks finish,like --lams 0,0.5 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from consumers.tools.evaluate import evaluation_rows, feature_spec_for, load_encoded, seeded_learner
from models.evaluation import evaluate_predictions, predict_in_chunks, split_boundary
from models.features import Batch
from models.metrics import auc
from streamer.datasets import open_dataset

SOURCE = "../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv"
MAPPING = "mappings/kuairand_pure.toml"


def datasets(privileged: list[str], aux: list[str]):
    """The student's data set (with ``aux`` outcome columns as extra tasks ``aux_<column>``) and the teacher's
    (``privileged`` columns as more numeric inputs; the same extra tasks, learnt only with ``--teacher-aux``)."""
    raw = tomllib.loads(Path(MAPPING).read_text())
    tasks = dict(raw["tasks"], **{f"aux_{c}": {"column": c} for c in aux})
    student_raw = dict(raw, privileged=[p for p in raw.get("privileged", []) if p not in aux], tasks=tasks)
    teacher_raw = dict(raw, numeric=list(raw["numeric"]) + privileged, tasks=tasks,
                       privileged=[p for p in raw.get("privileged", []) if p not in privileged])
    return open_dataset("csv", SOURCE, mapping=student_raw), open_dataset("csv", SOURCE, mapping=teacher_raw)


def run(student_data, teacher_data, spec_s, spec_t, tasks, seed, lams, backbone, batch_size, after, mode,
        split=0.9, aux=(), warmup=0, options=None, teacher_aux=False):
    """One seed: the teacher and the student trained side by side; ``lams`` [K] the weight of each task's teacher
    in its student's target. split: train on the first 90 %, test on the rest; prequential: every batch predicted
    before it trains, AUC of the last 10 %."""
    n = len(student_data)
    n_train = split_boundary(n, split) if mode == "split" else n
    student = seeded_learner(list(tasks) + list(aux), backbone, "mtl", seed, spec_s, options or {}, "cpu")
    teacher_tasks = list(tasks) + list(aux) if teacher_aux else list(tasks)  # as models.privileged: the student's
    teacher_options = {k: v for k, v in (options or {}).items() if k != "bce_weight"}  # the student's own
    teacher = seeded_learner(teacher_tasks, backbone, "mtl", seed, spec_t, teacher_options, "cpu")
    k = len(tasks)
    hard = {}
    update_counts = student._update_counts
    student._update_counts = lambda categorical, labels: update_counts(categorical, hard["labels"])
    lam = torch.tensor(list(lams) + [0.0] * len(aux), dtype=torch.float32)
    seen = {"student": [], "teacher": []}
    for lo in range(0, n_train, batch_size):
        hi = min(n_train, lo + batch_size)
        sb, tb = student_data.rows(lo, hi), teacher_data.rows(lo, hi)
        if not teacher_aux:
            tb = Batch(tb.categorical, tb.numeric, tb.labels[:, :k], tb.user, tasks=tuple(tasks))
        _, p_t = teacher.step(tb)
        seen["teacher"].append(torch.stack([p_t[t] for t in tasks], dim=1))
        if after:
            p_t = teacher.predict(tb)
        target = torch.cat([torch.stack([p_t[t] for t in tasks], dim=1), sb.labels[:, k:]], dim=1)
        hard["labels"] = sb.labels
        ramp = min(1.0, lo / warmup) if warmup else 1.0  # lambda ramps from 0 over the first `warmup` samples
        soft = torch.lerp(sb.labels, target, lam * ramp)  # as models.learner does
        _, p_s = student.step(Batch(sb.categorical, sb.numeric, soft, sb.user, tasks=sb.tasks))
        seen["student"].append(torch.stack([p_s[t] for t in tasks], dim=1))
    out = {}
    if mode == "split":
        labels, users = teacher_data.labels[n_train:, :k], teacher_data.users[n_train:]
        teacher_view = teacher_data if teacher_aux else dataclasses.replace(
            teacher_data, tasks=tuple(tasks), labels=teacher_data.labels[:, :k])  # a teacher of the scored tasks
        for name, learner, data in (("student", student, student_data), ("teacher", teacher, teacher_view)):
            predictions = {t: p for t, p in predict_in_chunks(learner, data, n_train, n).items() if t in tasks}
            metrics = evaluate_predictions(labels, predictions, users, tasks, {})
            out[name] = {t: round(metrics[t]["auc"], 5) for t in tasks}
    else:
        tail = split_boundary(n, split)
        labels, users = teacher_data.labels[tail:, :k], teacher_data.users[tail:]
        for name in ("student", "teacher"):
            p = torch.cat(seen[name])[tail:]
            metrics = evaluate_predictions(labels, {t: p[:, k] for k, t in enumerate(tasks)}, users, tasks, {})
            out[name] = {t: round(metrics[t]["auc"], 5) for t in tasks}
            # the tail's AUC within chunks of 4096 rows, averaged: scores of one time compared with each other only
            bounds = range(0, len(labels), 4096)
            out[name + "_chunked"] = {t: round(float(np.nanmean([
                auc(labels[lo:lo + 4096, k], p[lo:lo + 4096, k].numpy()) for lo in bounds])), 5)
                for k, t in enumerate(tasks)}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="finish,like")
    parser.add_argument("--privileged", default="is_profile_enter,is_follow,is_comment,is_forward,is_hate,"
                        "profile_stay_time,comment_stay_time")
    parser.add_argument("--lams", default="0,0.5", help="teacher weights to try: one number for every task, or "
                        "TASK=W:TASK=W per setting (comma between settings)")
    parser.add_argument("--mode", choices=("split", "prequential"), default="split")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--backbone", default="shared_bottom", help="one or more, comma-separated")
    parser.add_argument("--test", action="store_true", help="evaluate's protocol on all rows (train on the first "
                        "80 %%, test on the rest; the prequential tail is the last 20 %%) instead of the validation "
                        "slice: only for settings chosen on the validation slice")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--after", action="store_true", help="the teacher's prediction after its update")
    parser.add_argument("--aux", default="", help="outcome columns the student also learns to predict (extra "
                        "tasks, never scored), e.g. is_follow,is_comment")
    parser.add_argument("--warmup", type=int, default=0, help="lambda ramps from 0 over this many samples")
    parser.add_argument("--teacher-aux", action="store_true", help="the teacher learns the --aux tasks too (as "
                        "models.privileged's teacher learns every task of its student)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a ModelConfig option of both learners, e.g. count_features=[]")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tasks = args.tasks.split(",")
    privileged = [p for p in args.privileged.split(",") if p]
    aux = [c for c in args.aux.split(",") if c]
    options = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.set)}
    ds_s, ds_t = datasets(privileged, aux)
    spec_s, spec_t = feature_spec_for(ds_s, [], 262144), feature_spec_for(ds_t, [], 262144)
    aux_tasks = [f"aux_{c}" for c in aux]
    data_s, data_t = load_encoded(ds_s, tasks + aux_tasks, spec_s), load_encoded(ds_t, tasks + aux_tasks, spec_t)
    if not args.test:
        limit = evaluation_rows(len(data_s), 0.8, 0.2, True).limit
        data_s, data_t = data_s.head(limit), data_t.head(limit)
    assert np.array_equal(data_s.labels, data_t.labels)
    for backbone, seed, setting in [(b, int(s), x) for b in args.backbone.split(",") for s in args.seeds.split(",")
                                    for x in args.lams.split(",")]:
        if "=" in setting:
            given = {k: float(v) for k, v in (item.split("=") for item in setting.split(":"))}
            lams = [given.get(t, 0.0) for t in tasks]
        else:
            lams = [float(setting)] * len(tasks)
        t0 = time.perf_counter()
        result = run(data_s, data_t, spec_s, spec_t, tasks, seed, lams, backbone, args.batch_size, args.after,
                     args.mode, 0.8 if args.test else 0.9, aux_tasks, args.warmup, options,
                     args.teacher_aux)
        print(json.dumps({"tasks": tasks, "seed": seed, "lam": dict(zip(tasks, lams)), "mode": args.mode,
                          "test": args.test, "backbone": backbone, "privileged": privileged, "after": args.after,
                          "aux": aux, "warmup": args.warmup,
                          "extra": " ".join(args.set + ["teacher_aux"] * args.teacher_aux),
                          **result, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Do CrossDistil's teachers rank a user's items by their number of positive tasks better than the students?

The method's aim is fine-grained ranking across tasks: a teacher of task k learns the quadruplet order
(y_k, y_j) = (1, 1) > (1, 0) > (0, 1) > (0, 0). If that order is worth having, a combined score built from the
teachers' scores should rank by the combined relevance (number of positive tasks) better than the students'
product, even where the students never learn from the teachers. This script asks it on the *validation slice*
(train one pass on the first 72 % of events in time order, score the next 8 %; the test split is never read), and
asks the fair question beside it: does the gain survive against the students' product with a weight chosen on
the same slice (score = log p_1 + w log p_2, w in WEIGHTS, "inf" = the second task alone)?

Per run it writes one JSON line: the students' and teachers' AUC per task, and the per-user NDCG@10 (users with at
least two impressions of different relevance, ``models.metrics.ndcg_at_k``) of: the students' product, the
students' weighted products, the teachers' product of sigmoids and their weighted products. ``--summary`` prints
the README's table (mean ± s.e. over seeds, paired by seed). Run from the repository root:

    PYTHONPATH=. python reports/kuairand_pure/teacher_rank.py --out reports/kuairand_pure/teacher_rank.jsonl
    python reports/kuairand_pure/teacher_rank.py --summary reports/kuairand_pure/teacher_rank.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from summarize import cell  # this folder's: the same "mean ± s.e., * beyond 2 s.e." cells as the grid's tables

SOURCE = "../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv"
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def weighted(log_p: np.ndarray, rel: np.ndarray, users: np.ndarray) -> dict[str, float]:
    from models.metrics import ndcg_at_k  # lazy, like every import of the project here: --summary needs none

    out = {str(w): ndcg_at_k(rel, log_p[:, 0] + w * log_p[:, 1], users, k=10) for w in WEIGHTS}
    out["inf"] = ndcg_at_k(rel, log_p[:, 1], users, k=10)
    return out


def run(data, spec, tasks, backbone, config, seed) -> dict:
    import torch  # lazy: --summary reads the JSON lines without torch or the models

    from consumers.tools.evaluate import seeded_learner
    from models.evaluation import predict_in_chunks
    from models.metrics import auc

    learner = seeded_learner(tasks, backbone, config, seed, spec, {}, "cpu")
    n = int(len(data) * 0.8)  # the validation slice: the test split is never read
    n_fit = int(n * 0.9)
    for lo in range(0, n_fit, 256):
        learner.step(data.rows(lo, min(n_fit, lo + 256)))
    y = data.labels[n_fit:n]
    users = data.users[n_fit:n]
    rel = (y > 0).sum(axis=1)
    held = predict_in_chunks(learner, data, n_fit, n)
    p = np.stack([held[t] for t in tasks], axis=1).astype(np.float64)
    record = {"tasks": list(tasks), "backbone": backbone, "config": config, "seed": seed,
              "student_auc": [auc(y[:, k], p[:, k]) for k in range(len(tasks))],
              "student_ndcg": weighted(np.log(p.clip(1e-7)), rel, users)}
    if learner.model.has_teachers:
        with torch.no_grad():
            learner.model.eval()
            r = torch.cat([learner.model(data.rows(lo, min(n, lo + 4096))).teacher_scores.double()
                           for lo in range(n_fit, n, 4096)]).numpy()
        record["teacher_auc"] = [auc(y[:, k], r[:, k]) for k in range(len(tasks))]
        record["teacher_ndcg"] = weighted(-np.logaddexp(0.0, -r), rel, users)  # log sigmoid(r)
    return record


def summary(path: Path) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if "teacher_ndcg" in r:
            groups.setdefault((tuple(r["tasks"]), r["backbone"], r["config"]), []).append(r)
    print("| pair | backbone | students' AUC | teachers' AUC | students' product NDCG@10 | teachers' product − "
          "students' | best weight, students (mean NDCG@10) | teachers' best − students' best |")
    print("|---|---|---|---|---|---|---|---|")
    pairs = list(dict.fromkeys(key[0] for key in groups))
    configs = list(dict.fromkeys(key[2] for key in groups))
    order = ("shared_bottom", "mmoe", "ple", "cross_stitch")
    for (tasks, backbone, config), rs in sorted(groups.items(), key=lambda item: (
            pairs.index(item[0][0]), order.index(item[0][1]) if item[0][1] in order else len(order),
            configs.index(item[0][2]))):
        keys = list(rs[0]["student_ndcg"])
        best_s = max(keys, key=lambda w: np.mean([r["student_ndcg"][w] for r in rs]))
        best_t = max(keys, key=lambda w: np.mean([r["teacher_ndcg"][w] for r in rs]))
        s_auc = " / ".join(f"{np.mean([r['student_auc'][k] for r in rs]):.4f}" for k in range(2))
        t_auc = " / ".join(f"{np.mean([r['teacher_auc'][k] for r in rs]):.4f}" for k in range(2))
        print(f"| {', '.join(tasks)} | {backbone} (`{config}`, {len(rs)} seeds) | {s_auc} | {t_auc} | "
              f"{np.mean([r['student_ndcg']['1.0'] for r in rs]):.4f} | "
              f"{cell([r['teacher_ndcg']['1.0'] - r['student_ndcg']['1.0'] for r in rs])} | "
              f"w = {best_s}: {np.mean([r['student_ndcg'][best_s] for r in rs]):.4f} "
              f"({cell([r['student_ndcg'][best_s] - r['student_ndcg']['1.0'] for r in rs])} vs w = 1) | "
              f"{cell([r['teacher_ndcg'][best_t] - r['student_ndcg'][best_s] for r in rs])} "
              f"(teachers' w = {best_t}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pairs", default="click+long_view,finish+like")
    parser.add_argument("--backbones", default="shared_bottom,mmoe,ple,cross_stitch")
    parser.add_argument("--configs", default="crossdistil@trust,aux@paper")
    parser.add_argument("--out", default="reports/kuairand_pure/teacher_rank.jsonl")
    parser.add_argument("--summary", help="print the table of an existing JSON-lines file and exit")
    args = parser.parse_args()
    if args.summary:
        summary(Path(args.summary))
        return
    import torch  # lazy: --summary reads the JSON lines without torch or the models

    from consumers.tools.evaluate import feature_spec_for, load_encoded
    from models.config import split_config_name
    from streamer.datasets import open_dataset

    torch.set_num_threads(1)
    dataset = open_dataset("csv", SOURCE, mapping="mappings/kuairand_pure.toml")
    spec = feature_spec_for(dataset, [], 2**18)
    for config in args.configs.split(","):
        split_config_name(config)  # fail on a bad name before hours of work
    with open(args.out, "w") as handle:
        for pair in args.pairs.split(","):
            tasks = pair.split("+")
            data = load_encoded(dataset, tasks, spec)
            for backbone in args.backbones.split(","):
                for seed in range(args.seeds):
                    for config in args.configs.split(","):
                        record = run(data, spec, tasks, backbone, config, seed)
                        print(pair, backbone, config, seed, record["student_ndcg"]["1.0"],
                              record.get("teacher_ndcg", {}).get("1.0"), flush=True)
                        handle.write(json.dumps(record) + "\n")
                        handle.flush()


if __name__ == "__main__":
    main()

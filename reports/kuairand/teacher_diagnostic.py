"""Diagnostic for the KuaiRand report: how good are CrossDistil's teachers compared with the students?

Trains one learner per (task pair, rung, seed) with the report's split protocol and measures, on the test part
(last 20 % by time), the AUC and Multi-AUC of the student probability p_k, of the raw teacher score r_k and of
the calibrated, error-corrected-free teacher q_k = sigmoid(z_k), plus the calibration of q_k. If the teacher
ranks worse than the student, distilling it into the student cannot help.

``--calibrator-lr X`` gives the Platt calibrators (a_k, b_k) their own Adam learning rate X (the learner uses one
learning rate for every dense parameter): a test of whether slow calibration is what makes distillation hurt
log loss. It rebuilds the learner's dense optimizer, so it is a diagnostic, not a product option.

Run from the repository root:  PYTHONPATH=. python reports/kuairand/teacher_diagnostic.py [--seeds 3] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json

import torch

from consumers.tools.evaluate import feature_spec_for, load_encoded, make_learner
from models.evaluation import default_partners, run_time_split
from models.losses import platt_calibrate
from models.metrics import auc, calibration_ratio, label_categories, multi_auc
from streamer.datasets import open_dataset


def teacher_report(learner, data, start: int) -> dict[str, dict[str, float]]:
    """Student and teacher metrics per task on rows [start, N)."""
    model = learner.model
    model.eval()
    with torch.no_grad():
        out = model(data.rows(start, len(data)).to(learner.device))
        s = torch.sigmoid(out.student_logits.float()).cpu().numpy()
        r = out.teacher_scores.float()
        z = (platt_calibrate(r, model.calibrator_alpha, model.calibrator_bias) if hasattr(model, "calibrator_alpha")
             else r)
        q = torch.sigmoid(z).cpu().numpy()
        r = r.cpu().numpy()
    y = data.labels[start:]
    partners = default_partners(data.tasks)
    result = {}
    for k, task in enumerate(data.tasks):
        j = data.tasks.index(partners[task])
        cats = label_categories(y[:, k], y[:, j])
        result[task] = {
            "student_auc": auc(y[:, k], s[:, k]), "teacher_auc": auc(y[:, k], r[:, k]),
            "student_multi_auc": multi_auc(s[:, k], cats), "teacher_multi_auc": multi_auc(r[:, k], cats),
            "student_calibration": calibration_ratio(y[:, k], s[:, k]),
            "teacher_q_calibration": calibration_ratio(y[:, k], q[:, k]),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rungs", default="aux,crossdistil")
    parser.add_argument("--pairs", default="click+long_view,long_view+like")
    parser.add_argument("--calibrator-lr", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = open_dataset("kuairand", "../shared/data/kuairand")
    spec = feature_spec_for(dataset, [], 2**18)
    rows = []
    for tasks in [pair.split("+") for pair in args.pairs.split(",")]:
        data = load_encoded(dataset, tasks, spec)
        start = int(len(data) * 0.8)
        for rung in args.rungs.split(","):
            for seed in range(args.seeds):
                learner = make_learner(tasks, "shared_bottom", rung, seed, spec, {}, "cpu")
                if args.calibrator_lr and hasattr(learner.model, "calibrator_alpha"):
                    calibrators = [learner.model.calibrator_alpha, learner.model.calibrator_bias]
                    others = [p for group in learner.dense_optimizer.param_groups for p in group["params"]
                              if all(p is not c for c in calibrators)]
                    learner.dense_optimizer = torch.optim.Adam(
                        [{"params": others}, {"params": calibrators, "lr": args.calibrator_lr}],
                        lr=learner.config.lr)
                result = run_time_split(learner, data, default_partners(tasks), epochs=args.epochs, batch_size=256,
                                        curve_points=0)
                rows.append({"tasks": tasks, "rung": rung, "seed": seed, "epochs": args.epochs,
                             "calibrator_lr": args.calibrator_lr, "student_test": result.metrics["test"],
                             "metrics": teacher_report(learner, data, start)})
                print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

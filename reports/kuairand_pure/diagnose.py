"""Diagnosis of CrossDistil on KuaiRand-Pure, per task, over training (issue: "diagnose on the larger data first").

One pass over the *validation slice* (the first 80 % of events in time order; the test split is never read),
per (task pair, backbone, configuration, seed), measuring at every step the scores the model gave *before*
learning from the batch, and every ``--probe-every`` steps the gradients of single loss terms:

* ``teacher_auc`` / ``student_auc`` per tenth of the stream: prequential AUC of the raw teacher score r_k and of
  the student probability p_k on the same samples (a teacher that ranks worse cannot teach);
* ``kd_share``: ||grad of alpha_k L_kd,k|| / ||grad of BCE_k|| on the student tower of k (how hard KD pulls);
* ``cos_aux`` / ``cos_kd``: cosine between the gradient of BCE_k and of L_aux,k (resp. alpha_k L_kd,k) on the
  shared backbone's parameters (do the auxiliary and the KD terms pull the shared parameters the task's way?);
* at the end, ``moved``: mean |p_k - p_k of mtl| on the slice's last 10 % (same seed), and both AUCs there.

Writes one JSON line per run to ``--out`` (default reports/kuairand_pure/diagnosis.jsonl) and, with ``--plot``,
diagnosis.png. Run from the repository root:

    PYTHONPATH=. python reports/kuairand_pure/diagnose.py --seeds 3 --plot
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from consumers.tools.evaluate import feature_spec_for, load_encoded, seeded_learner
from models.config import split_config_name
from models.crossdistil import crossdistil_loss
from models.evaluation import predict_in_chunks
from models.metrics import auc
from streamer.datasets import open_dataset

SOURCE = "../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv"
HERE = Path(__file__).parent


def flat_grad(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else math.nan


def probe(learner, batch) -> dict[str, list[float]]:
    """Gradient cosines and KD pull of one batch, without updating anything."""
    model, cfg = learner.model, learner.config
    batch = batch.to(learner.device)
    outputs = model(batch)
    _, terms = crossdistil_loss(model, outputs, batch, torch.Generator().manual_seed(0), learner.kd_scale())
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    alpha = cfg.task_weights("kd_weight")
    scale = learner.kd_scale()
    out: dict[str, list[float]] = {"cos_aux": [], "cos_kd": [], "kd_share": []}
    for k in range(len(cfg.tasks)):
        tower = list(model.student_towers[k].parameters())
        g_bce = flat_grad(terms["bce"][k], backbone)
        out["cos_aux"].append(cosine(g_bce, flat_grad(terms["aux"][k], backbone)) if "aux" in terms else math.nan)
        if "kd" in terms:
            a = alpha[k] * (float(scale[k]) if scale is not None else 1.0)
            out["cos_kd"].append(cosine(g_bce, flat_grad(a * terms["kd"][k], backbone)) if a > 0 else math.nan)
            kd_norm = float(flat_grad(a * terms["kd"][k], tower).norm()) if a > 0 else 0.0
            out["kd_share"].append(kd_norm / max(float(flat_grad(terms["bce"][k], tower).norm()), 1e-12))
        else:
            out["cos_kd"].append(math.nan)
            out["kd_share"].append(0.0)
    model.zero_grad(set_to_none=True)
    return out


def run(data, spec, tasks, backbone, config, seed, batch_size, probe_every, mtl_predictions):
    learner = seeded_learner(tasks, backbone, config, seed, spec, {}, "cpu")
    n = int(len(data) * 0.8)  # the validation slice: the test split is never read
    n_fit = int(n * 0.9)
    student, teacher, probes, gates = [], [], [], []
    for step, lo in enumerate(range(0, n_fit, batch_size)):
        batch = data.rows(lo, min(n_fit, lo + batch_size))
        if learner.model.has_teachers:
            with torch.no_grad():
                learner.model.eval()
                teacher.append(learner.model(batch).teacher_scores.float().numpy())
        if probe_every and step % probe_every == 0:
            probes.append(probe(learner, batch))
        losses, predictions = learner.step(batch)
        gates.append([losses.get(f"gate/{task}", math.nan) for task in tasks])
        student.append(np.stack([predictions[t].numpy() for t in tasks], axis=1))
    y = data.labels[:n_fit]
    s = np.concatenate(student)
    t = np.concatenate(teacher) if teacher else None
    tenths = np.linspace(0, n_fit, 11).astype(int)
    curve = {task: {"student_auc": [auc(y[a:b, k], s[a:b, k]) for a, b in zip(tenths[:-1], tenths[1:])],
                    "teacher_auc": ([auc(y[a:b, k], t[a:b, k]) for a, b in zip(tenths[:-1], tenths[1:])]
                                    if t is not None else None)}
             for k, task in enumerate(tasks)}
    held = predict_in_chunks(learner, data, n_fit, n)
    y_held = data.labels[n_fit:n]
    end = {}
    for k, task in enumerate(tasks):
        end[task] = {"student_auc": auc(y_held[:, k], held[task])}
        if learner.model.has_teachers:
            with torch.no_grad():
                learner.model.eval()
                r = learner.model(data.rows(n_fit, n)).teacher_scores[:, k].float().numpy()
            end[task]["teacher_auc"] = auc(y_held[:, k], r)
        if mtl_predictions is not None:
            end[task]["moved"] = float(np.mean(np.abs(held[task] - mtl_predictions[task])))
    def mean(key: str, k: int) -> float:
        values = [p[key][k] for p in probes if math.isfinite(p[key][k])]
        return float(np.mean(values)) if values else math.nan

    stats = {task: {"cos_aux": mean("cos_aux", k), "cos_kd": mean("cos_kd", k), "kd_share": mean("kd_share", k)}
             for k, task in enumerate(tasks)}
    return {"tasks": list(tasks), "backbone": backbone, "config": config, "seed": seed, "curve": curve,
            "held_out": end, "gradients": stats,
            "gate_open_share": {task: (float(np.mean([g[k] for g in gates])) if learner.trust_gate is not None
                                       else None)
                                for k, task in enumerate(tasks)}}, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pairs", default="click+long_view,finish+like")
    parser.add_argument("--backbones", default="shared_bottom,mmoe")
    parser.add_argument("--configs", default="crossdistil@paper,crossdistil@trust")
    parser.add_argument("--probe-every", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=str(HERE / "diagnosis.jsonl"))
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset = open_dataset("csv", SOURCE, mapping="mappings/kuairand_pure.toml")
    spec = feature_spec_for(dataset, [], 2**18)
    Path(args.out).write_text("")
    for pair in args.pairs.split(","):
        tasks = pair.split("+")
        data = load_encoded(dataset, tasks, spec)
        for backbone in args.backbones.split(","):
            for seed in range(args.seeds):
                _, mtl_held = run(data, spec, tasks, backbone, "mtl", seed, args.batch_size, 0, None)
                for config in args.configs.split(","):
                    split_config_name(config)
                    record, _ = run(data, spec, tasks, backbone, config, seed, args.batch_size, args.probe_every,
                                    mtl_held)
                    print(json.dumps(record["held_out"]), pair, backbone, config, seed, flush=True)
                    with open(args.out, "a") as handle:
                        handle.write(json.dumps(record) + "\n")
    if args.plot:
        plot(Path(args.out), Path(args.out).with_suffix(".png"))


def plot(path: Path, target: Path) -> None:
    """Teacher vs student prequential AUC per tenth of the stream, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    panels = sorted({(tuple(r["tasks"]), r["backbone"], task) for r in records for task in r["tasks"]})
    configs = sorted({r["config"] for r in records})
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (tasks, backbone, task) in zip(axes.flat, panels):
        for i, config in enumerate(configs):
            cell = [r for r in records if tuple(r["tasks"]) == tasks and r["backbone"] == backbone
                    and r["config"] == config]
            if not cell:
                continue
            x = np.arange(1, 11) / 10
            for role, style in (("student_auc", "-"), ("teacher_auc", "--")):
                ys = np.nanmean([r["curve"][task][role] for r in cell], axis=0)
                ax.plot(x, ys, style, color=f"C{i}", label=f"{config} {role.split('_')[0]}")
        ax.set_title(f"{task} ({'/'.join(tasks)}), {backbone}", fontsize=8)
        ax.set_xlabel("share of the validation stream", fontsize=7)
        ax.set_ylabel("prequential AUC per tenth", fontsize=7)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

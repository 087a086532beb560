"""Parts of a CPU training step, this checkout's code against the code before, in one process; one JSON object.

    python bench/step_parts.py --against 759774a     # ~1 minute

The parts: the trust gate's windowed AUCs (``models.trust_gate.column_aucs`` over its default window of 20,000
samples and two tasks' teacher and student columns, what ``TrustGate.decide`` sorts every 2,048 samples); the gate's
whole work per batch of 4,096 (``TrustGate.update`` with its decision, over a full window); finding
the touched rows of a sparse gradient (``models.rowwise._touched_rows``: the embedding table's at batch 4,096 of 4
fields, 16 floats a row, and the wide part's, 7 rows a sample of 2 floats); a whole step of the per-row AdaGrad of
either (``models.rowwise.RowAdagrad``: those rows, their sums of squares, their update; the rows of a batch of
bench/train_step.py's impressions); the dense Adam's update of the default crossdistil model (torch's foreach
kernels, the learner's before, against the learner's own: fused on a CPU). The other commit's modules are read with
``git show`` and imported under other names; both versions run interleaved for ``--rounds`` rounds (median ms a
call; the machine is shared), and their results are checked first: the same AUCs to the last bit, the same rows
and, within float rounding, the same sums, the same AdaGrad update to the last bit (tests/unit/models/
test_learner.py holds the two Adams to the same values).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing
sys.path.insert(0, str(REPO_ROOT / "bench"))  # train_step's model and features

import numpy as np  # noqa: E402
import torch  # noqa: E402
import train_step  # noqa: E402

from models import rowwise, trust_gate  # noqa: E402
from models.features import encode_rows  # noqa: E402
from models.learner import Learner  # noqa: E402


def old_module(commit: str, path: str, folder: Path):
    source = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{commit}:{path}"], capture_output=True,
                            text=True, check=True).stdout
    file = folder / path.replace("/", "_")
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(f"old_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def per_call_ms(function, calls: int) -> float:
    function()
    started = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - started) / calls * 1e3


def compare(old, new, rounds: int, calls: int) -> dict:
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(rounds):
        times["old"].append(per_call_ms(old, calls))
        times["new"].append(per_call_ms(new, calls))
    old_ms, new_ms = (statistics.median(times[k]) for k in ("old", "new"))
    return {"old_ms": round(old_ms, 3), "new_ms": round(new_ms, 3), "speedup": round(old_ms / new_ms, 2),
            "rounds_old_ms": [round(t, 3) for t in times["old"]], "rounds_new_ms": [round(t, 3) for t in times["new"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the other commit")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    out: dict = {"against": args.against, "rounds": args.rounds, "torch_threads": 1, "parts": {}}
    with tempfile.TemporaryDirectory() as folder:
        old_gate = old_module(args.against, "models/trust_gate.py", Path(folder))
        old_rows = old_module(args.against, "models/rowwise.py", Path(folder))
    n = 20000
    labels = (torch.rand(n, 4, generator=generator) < 0.3).float()
    scores = torch.randn(n, 4, generator=generator)
    assert torch.equal(old_gate.column_aucs(labels, scores), trust_gate.column_aucs(labels, scores))
    out["parts"]["column_aucs_20000x4"] = compare(lambda: old_gate.column_aucs(labels, scores),
                                                  lambda: trust_gate.column_aucs(labels, scores),
                                                  args.rounds, args.calls)
    # The gate's whole work per batch of 4,096 (update: the ring's rows, then the decision every 2,048 samples: every
    # batch), over a full window: the keys kept per ring row (this checkout) against made for the window each time.
    batches = [((torch.rand(4096, 2, generator=generator) < 0.5).float(), torch.randn(4096, 2, generator=generator),
                torch.randn(4096, 2, generator=generator)) for _ in range(8)]
    gates = {"old": old_gate.TrustGate(2), "new": trust_gate.TrustGate(2)}
    for gate in gates.values():
        for batch in batches:
            gate.update(*batch)
    assert torch.equal(gates["old"].teacher_auc, gates["new"].teacher_auc)
    assert torch.equal(gates["old"].student_auc, gates["new"].student_auc)
    cycle = {k: iter(range(10**9)) for k in gates}
    out["parts"]["gate_update_4096x2_window_20000"] = compare(
        lambda: gates["old"].update(*batches[next(cycle["old"]) % 8]),
        lambda: gates["new"].update(*batches[next(cycle["new"]) % 8]), args.rounds, args.calls)
    for name, (rows, width, table) in {"touched_rows_embedding_4096x4x16": (4096 * 4, 16, 2**20),
                                       "touched_rows_wide_4096x7x2": (4096 * 7, 2, 2**21)}.items():
        index = torch.from_numpy(np.minimum(rng.zipf(1.3, rows), table - 1)).long()  # popular rows repeat
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            grad = torch.sparse_coo_tensor(index[None], torch.randn(rows, width, generator=generator), (table, width))
        (old_r, old_v), (new_r, new_v) = old_rows._touched_rows(grad), rowwise._touched_rows(grad)
        # the same rows; the same sums up to the order of their additions (models.rowwise._touched_rows_numpy)
        assert torch.equal(old_r.index, new_r.index)
        torch.testing.assert_close(old_v, new_v, rtol=1e-4, atol=1e-4)
        out["parts"][name] = compare(lambda g=grad: old_rows._touched_rows(g), lambda g=grad: rowwise._touched_rows(g),
                                     args.rounds, args.calls)
    # A whole step of the table's per-row AdaGrad (the learner's embedding and wide optimizer): the touched rows,
    # their sums of squares and the rows' update, on a table of its own for each version (the same values after it)
    # (the rows of a batch of bench/train_step.py's synthetic KuaiRand-like impressions, as the learner looks them up)
    model = Learner(train_step.config(2**20, True, False, "mtl")).model
    spec = model.config.features
    categorical = encode_rows(train_step.synthetic_rows(4096, 0), spec, train_step.TASKS).categorical
    for name, (index, width, table) in {
            "row_adagrad_embedding_4096x4x16": (categorical.reshape(-1), 16, spec.hash_buckets),
            "row_adagrad_wide_4096x6x2": (model.wide.rows(categorical).reshape(-1), 2,
                                          model.wide.weight.num_embeddings),
    }.items():
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            grad = torch.sparse_coo_tensor(index[None], torch.randn(len(index), width, generator=generator),
                                           (table, width))
        start = torch.randn(table, width, generator=generator) * 0.05
        steps = {}
        for version, module in (("old", old_rows), ("new", rowwise)):
            weight = torch.nn.Parameter(start.clone())
            optimizer = module.RowAdagrad([weight], lr=0.05)

            def step(w=weight, o=optimizer, g=grad) -> None:
                w.grad = g
                o.step()
            step()
            steps[version] = (step, weight)
        assert torch.equal(steps["old"][1], steps["new"][1]), "the two versions' updates differ"
        out["parts"][name] = compare(steps["old"][0], steps["new"][0], args.rounds, args.calls)
    # The dense Adam of the default crossdistil model (bench/train_step.py's features): foreach, as before, against
    # the learner's own (fused where the device allows)
    learner = Learner(train_step.config(2**16, True, False, "crossdistil"))
    fused = learner.dense_optimizer
    params = [p for group in fused.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    foreach = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in fused.param_groups], foreach=True)
    kernels = "fused" if fused.param_groups[0]["fused"] else "foreach"
    out["parts"]["dense_adam_crossdistil"] = {"tensors": len(params), "elements": sum(p.numel() for p in params),
                                              "tasks": len(train_step.TASKS), "new_kernels": kernels,
                                              **compare(foreach.step, fused.step, args.rounds, args.calls)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

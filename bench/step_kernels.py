"""Operations a training step issues on a device's paths, counted on a CPU; prints JSON.

    python bench/step_kernels.py                         # this checkout
    python bench/step_kernels.py --root /tmp/old         # another checkout (e.g. a worktree of an older commit)

A GPU step is bound by its kernel launches (bench/results/gpu_checks_h200.json: 9-13 ms a step at batch 256 to
4,096 for microseconds of arithmetic), so the number of operations is a measure of it that a machine without a GPU
can take. The step (``Learner._train`` of the bench's model, batch 4,096) runs a device's paths on the CPU
(``models.host.DEVICE_PATHS_ON_CPU``, or ``models.rowwise._FIXED_SHAPES_ON_CPU`` in checkouts from before it) under
torch's profiler; counted are the operations with no operation inside them (what a device would run as kernels,
roughly), less those that only make views or read metadata and the CPU's conversions of Python numbers to tensors
(on a GPU those travel as kernel arguments).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
from pathlib import Path

# Operations that launch nothing: views, metadata, allocation, and a CPU's wrapping of Python scalars.
_NOT_KERNELS = {
    "aten::empty", "aten::empty_strided", "aten::view", "aten::as_strided", "aten::t", "aten::transpose",
    "aten::select", "aten::slice", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::reshape",
    "aten::_reshape_alias", "aten::detach", "aten::alias", "aten::permute", "aten::split", "aten::unbind",
    "aten::narrow", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view",
    "aten::flatten", "aten::chunk", "aten::result_type", "aten::to", "aten::resize_", "aten::_indices",
    "aten::_values", "aten::scalar_tensor", "aten::set_", "aten::_nnz", "aten::is_coalesced", "aten::_coalesced_",
    "aten::sparse_coo_tensor", "aten::_sparse_coo_tensor_with_dims_and_tensors", "aten::_sparse_coo_tensor_unsafe",
}


def count(root: Path, names: list[str], size: int, steps: int, listed: int = 12) -> dict[str, dict]:
    sys.path.insert(0, str(root / "bench"))
    train_step = importlib.import_module("train_step")  # puts ``root`` first on sys.path: its models/
    import torch
    from torch.profiler import ProfilerActivity, profile

    from models import rowwise
    from models.features import encode_rows
    from models.learner import Learner

    if hasattr(rowwise, "_FIXED_SHAPES_ON_CPU"):  # before models.host: only the row updates had a switch
        rowwise._FIXED_SHAPES_ON_CPU = True
    else:
        from models import host

        host.DEVICE_PATHS_ON_CPU = True
    torch.set_num_threads(1)
    rows = train_step.synthetic_rows(3 * size, seed=0)
    out = {}
    for name in names:
        config = train_step.config(2**20, True, False, name)
        batches = [encode_rows(rows[i * size:(i + 1) * size], config.features, train_step.TASKS) for i in range(3)]
        learner = Learner(config, device=torch.device("cpu"))
        for batch in batches:
            learner.step(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps):
                learner._train(batches[i % 3])
        events = prof.events()
        parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
        kernels = collections.Counter(e.name for e in events if e.name.startswith("aten::") and id(e) not in parents
                                      and e.name not in _NOT_KERNELS)
        out[name] = {"per_step": sum(kernels.values()) / steps,
                     "most": {k: v / steps for k, v in kernels.most_common(listed)}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the checkout whose step is counted (default: this one)")
    parser.add_argument("--compare", default="mtl,crossdistil", help="configurations (RUNG or RUNG@PRESET)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--listed", type=int, default=12, help="the most frequent operations listed per config")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    result = {"root": str(root), "batch": args.batch_size,
              "configs": count(root, args.compare.split(","), args.batch_size, args.steps, args.listed)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

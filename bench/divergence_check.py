"""What the divergence check costs a checkpoint, by embedding table size (prints JSON).

Every checkpoint of the trainer checks that the learner's weights and optimizer state are finite before it writes
anything (``consumers.state.learner_state.check_finite``): a model that diverged is neither checkpointed nor published.
This measures, side by side in one run at tables of 2^16, 2^19 and 2^22 rows (``--table-log2``), for the default model
after a few steps at batch 4,096:

* ``check_s``: the check alone on the flattened state (median of ``--rounds``);
* ``count_s``: counting every tensor's non-finite values with a mask (what the check did before, and still does for
  a tensor whose sum is not finite), side by side; ``count_over_check`` is its ratio to ``check_s``;
* ``flatten_s``: ``flatten_state`` of the learner's state dict, which the checkpoint does anyway;
* ``write_s``: ``write_learner_checkpoint`` into a temporary directory (flatten, check, encode, fsync'd write);
* ``step_s``: one training step, for scale;
* ``check_share_of_write``: ``check_s / write_s``.

    python bench/divergence_check.py                    # 16,19,22
    python bench/divergence_check.py --table-log2 16,18 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consumers.state.checkpoints import CheckpointStore  # noqa: E402
from consumers.state.learner_state import check_finite, write_learner_checkpoint  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.features import FeatureSpec, encode_rows  # noqa: E402
from models.learner import Learner, flatten_state  # noqa: E402

TASKS = ("click", "long_view")
SPEC_FIELDS = dict(categorical=("user_id", "item_id", "author_id", "hour"), numeric=("duration_ms",))


def rows(n: int, seed: int) -> list[dict]:
    """Rows whose ids spread over the whole table, so that the optimizer state of many rows is filled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10**9, (n, 3), generator=g).tolist()
    labels = torch.rand((n, 2), generator=g).tolist()
    return [{"user_id": str(u), "item_id": str(i), "author_id": str(a), "hour": str(k % 24),
             "duration_ms": 1000.0 + k, "click": int(c < 0.3), "long_view": int(v < 0.2)}
            for k, ((u, i, a), (c, v)) in enumerate(zip(ids, labels))]


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(log2: int, batch: int, steps: int, rounds: int) -> dict:
    config = ModelConfig(tasks=TASKS, features=FeatureSpec(**SPEC_FIELDS, hash_buckets=2**log2))
    learner = Learner(config)
    batches = [encode_rows(rows(batch, seed), config.features, TASKS) for seed in range(steps)]
    for encoded in batches:
        learner.step(encoded)
    step_s = median_seconds(lambda: learner.step(batches[0]), rounds)
    tensors, _ = flatten_state(learner.state_dict())
    values = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    check_s = median_seconds(lambda: check_finite(tensors, learner.steps), rounds)
    floats = [t for t in tensors.values() if t.is_floating_point()]
    count_s = median_seconds(lambda: sum(int(t.numel() - torch.isfinite(t).sum()) for t in floats), rounds)
    flatten_s = median_seconds(lambda: flatten_state(learner.state_dict()), rounds)
    with tempfile.TemporaryDirectory() as folder:
        store = CheckpointStore(folder, keep_last=1)
        write_s = median_seconds(lambda: write_learner_checkpoint(learner, store, {}, None), rounds)
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
    return {"table_log2": log2, "float_values": values, "checkpoint_bytes": size, "step_s": step_s,
            "flatten_s": flatten_s, "check_s": check_s, "count_s": count_s, "count_over_check": count_s / check_s,
            "write_s": write_s, "check_share_of_write": check_s / write_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-log2", default="16,19,22", help="embedding table sizes as powers of two")
    parser.add_argument("--batch", type=int, default=4096, help="samples per training step")
    parser.add_argument("--steps", type=int, default=4, help="training steps before measuring")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per quantity (median reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "batch": args.batch,
              "sizes": [measure(int(k), args.batch, args.steps, args.rounds) for k in args.table_log2.split(",")]}
    result["wall_s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

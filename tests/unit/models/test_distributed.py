"""models.distributed: two gloo ranks in processes of their own (loopback, a file rendezvous), no broker.

Synchronous data parallel must be the step one learner takes on the union of the ranks' batches, with a rank
that has nothing contributing zero weight; model averaging must leave identical replicas.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import ModelConfig
from models.distributed import Collective
from models.features import encode_rows
from models.learner import Learner

CONFIG = dict(tasks=("click", "long_view"), rung="mtl", embedding_dim=4, hidden_dims=(8,), tower_dims=(4,),
              seed=3)


def rows(seed: int, n: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        u, it = int(torch.randint(0, 20, (1,), generator=g)), int(torch.randint(0, 50, (1,), generator=g))
        out.append({"user_id": f"u{u}", "item_id": f"i{it}",
                    "features": {"duration_ms": float(torch.rand(1, generator=g)) * 1e4},
                    "labels": {"click": int(torch.rand(1, generator=g) < 0.4),
                               "long_view": int(torch.rand(1, generator=g) < 0.2)}})
    return out


# Per step, the rows of rank 0 and rank 1 (rank 1 has nothing at step 1).
PLAN = [(rows(1, 12), rows(2, 20)), (rows(3, 16), []), (rows(4, 8), rows(5, 24))]


def _worker(rank: int, world: int, init: str, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        learner = Learner(ModelConfig(**CONFIG))
        learner.collective = Collective(mode)
        for step in PLAN:
            mine = step[rank]
            if mine:
                learner.step(encode_rows(mine, learner.config.features, learner.config.tasks))
            elif mode == "sync":
                learner.step_empty()  # averaging ranks simply do not step
        if mode == "average":
            learner.collective.average(learner.model)
        torch.save({"state": learner.model.state_dict(), "samples": learner.samples, "steps": learner.steps},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path: Path, mode: str) -> list[dict]:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), mode), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.slow  # two processes of their own
def test_sync_ranks_take_the_step_of_one_learner_on_the_union(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "sync")
    single = Learner(ModelConfig(**CONFIG))
    for a, b in PLAN:
        single.step(encode_rows(a + b, single.config.features, single.config.tasks))
    expected = single.model.state_dict()
    for rank in ranks:
        assert rank["samples"] == sum(len(a) + len(b) for a, b in PLAN)
        assert rank["steps"] == len(PLAN)
        for name, value in expected.items():
            torch.testing.assert_close(rank["state"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name in expected:  # the replicas are bit-identical
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name


@pytest.mark.slow
def test_averaged_ranks_hold_one_model(tmp_path: Path) -> None:
    ranks = _run(tmp_path, "average")
    untrained = Learner(ModelConfig(**CONFIG)).model.state_dict()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert not torch.equal(ranks[0]["state"]["embedding.weight"], untrained["embedding.weight"])
    # the online counts are a sum over the ranks, not a mean: those of one learner that saw every row
    single = Learner(ModelConfig(**CONFIG))
    for a, b in PLAN:
        union = encode_rows(a + b, single.config.features, single.config.tasks)
        single.model.counts.add(union.categorical, union.labels)
    for name in ("counts.table", "counts.totals", "counts.clock"):
        torch.testing.assert_close(ranks[0]["state"][name], single.model.counts.state_dict()[name.split(".")[1]])


def test_step_empty_needs_synchronous_ranks() -> None:
    with pytest.raises(RuntimeError, match="synchronous"):
        Learner(ModelConfig(**CONFIG)).step_empty()

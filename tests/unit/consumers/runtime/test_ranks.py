"""consumers.runtime.ranks: rank discovery, and the collectives and learner port of two gloo ranks (processes of
their own over loopback, a file rendezvous; no broker)."""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from consumers.runtime.config import load_config
from consumers.runtime.learner_process import build_learner
from consumers.runtime.ranks import RankedLearner, RankInfo, Ranks, attempt_store, rank_from_env

pytestmark = pytest.mark.unit

MODEL = "{rung = 'mtl', embedding_dim = 4, hidden_dims = [8], tower_dims = [4]}"


def test_torchruns_variables_name_the_rank_and_bad_ones_are_refused() -> None:
    assert rank_from_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"}) == RankInfo(2, 4, 0)
    with pytest.raises(ValueError, match="integers"):
        rank_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="outside WORLD_SIZE"):
        rank_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert attempt_store(datetime.timedelta(seconds=1), env={}) is None  # outside torchrun: env:// rendezvous


class Sample:
    def __init__(self, i: int) -> None:
        self.impression = {"user_id": f"u{i % 7}", "item_id": f"i{i % 11}", "features": {}}
        self.labels = {"click": i % 2, "long_view": int(i % 3 == 0)}


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, env={}, overrides=[f"model.options={MODEL}", "model.device='cpu'"])
        ranks = Ranks(RankInfo(rank, 2), cfg.distributed)
        result = {"agree": ranks.agree([rank, 5 - rank]),
                  "broadcast": ranks.broadcast_bytes(b"from rank 0" if rank == 0 else None).decode(),
                  "gathered": ranks.gather_plain({"rank": rank, "positions": [["imp", rank, 10 * rank]]})}
        port = RankedLearner(build_learner(cfg), cfg.model.tasks, ranks, "sync")
        port.broadcast_model()
        topped_up = []
        for b in range(2 if rank == 0 else 0):  # rank 0 has two full batches, rank 1 a partial one
            port.submit([Sample(8 * b + i) for i in range(8)], ("batch", b))
        steps = port.step_together(lambda: (topped_up.append(1), port.submit([Sample(99)], ("partial", 0))))
        answered = [context for context, _ in port.answers()]
        result.update(steps=steps, answered=answered, topped_up=len(topped_up), learner_steps=port.steps)
        torch.save(port.learner.model.state_dict(), Path(out) / f"model-{rank}.pt")
        (Path(out) / f"rank-{rank}.json").write_text(json.dumps(result))
        ranks.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # two processes of their own
def test_two_ranks_agree_exchange_bytes_and_step_together_into_one_model(tmp_path: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["agree"] == [1, 5]  # elementwise maximum
        assert r["broadcast"] == "from rank 0"
        assert r["gathered"] == [{"rank": 0, "positions": [["imp", 0, 0]]}, {"rank": 1, "positions": [["imp", 1, 10]]}]
        assert r["steps"] == 2 and r["learner_steps"] == 2  # as many steps as the rank with the most batches
    assert results[0]["answered"] == [["batch", 0], ["batch", 1]] and results[0]["topped_up"] == 0
    assert results[1]["answered"] == [["partial", 0]] and results[1]["topped_up"] == 1  # then one empty step
    models = [torch.load(tmp_path / f"model-{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])


def _leaving(rank: int, init: str, out: str, partner_leaves: str) -> None:
    """Rank 1 leaves late (``"late"``: 1.5 s after rank 0, together) or alone at once (``"alone"``: an error path);
    rank 0 leaves together and records how long its ``close`` took."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=4))
    cfg = load_config(None, env={}, overrides=[f"model.options={MODEL}", "model.device='cpu'"])
    ranks = Ranks(RankInfo(rank, 2), cfg.distributed)
    ranks.agree([rank])  # the group works
    if rank == 1:
        if partner_leaves == "late":
            time.sleep(1.5)
        ranks.close(together=partner_leaves == "late")
        return
    started = time.monotonic()
    ranks.close(together=True)
    (Path(out) / "closed.json").write_text(json.dumps({"seconds": time.monotonic() - started,
                                                      "initialized": dist.is_initialized()}))


@pytest.mark.slow  # two processes of their own
@pytest.mark.parametrize("partner_leaves", ["late", "alone"])
def test_a_rank_leaving_together_waits_for_the_others_but_not_for_one_that_left_alone(tmp_path: Path,
                                                                                      partner_leaves: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_leaving, args=(str(tmp_path / "init"), str(tmp_path), partner_leaves), nprocs=2, join=True)
    closed = json.loads((tmp_path / "closed.json").read_text())
    assert not closed["initialized"]
    if partner_leaves == "late":  # the barrier held rank 0 until rank 1 came
        assert 1.0 < closed["seconds"] < 4.0, closed
    else:  # the partner is gone: the barrier fails (closed connection or the group's 4 s timeout), rank 0 leaves
        assert closed["seconds"] < 8.0, closed


def _threads() -> list[str]:
    """The names of this process's threads, C++ ones included (gloo's: gloo_tcp_loop, pt_gloo_runloop)."""
    return [Path(f"/proc/self/task/{tid}/comm").read_text().strip() for tid in os.listdir("/proc/self/task")]


def _closing(rank: int, init: str, out: str) -> None:
    """A rank as the trainer and rank_replay run one: the group, then the learner (its optimizer makes torch import
    torch._dynamo, and with it torch.distributed.nn.functional), collectives, and ``close``."""
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    cfg = load_config(None, env={}, overrides=[f"model.options={MODEL}", "model.device='cpu'"])
    ranks = Ranks(RankInfo(rank, 2), cfg.distributed)
    port = RankedLearner(build_learner(cfg), cfg.model.tasks, ranks, "sync")
    port.broadcast_model()
    ranks.agree([rank])
    during = _threads()
    ranks.close(together=True)
    deadline = time.monotonic() + 5.0  # a thread is listed until the kernel has reaped it
    while any(name.startswith(("gloo", "pt_gloo")) for name in _threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    (Path(out) / f"threads-{rank}.json").write_text(json.dumps({"during": during, "after": _threads()}))


@pytest.mark.slow  # two processes of their own
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through Linux's /proc")
def test_closing_the_ranks_stops_gloos_threads_before_the_process_exits(tmp_path: Path) -> None:
    """A group that outlives close keeps gloo's threads into the interpreter's exit, where one of them can abort the
    rank (SIGABRT, "terminate called without an active exception")."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_closing, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        threads = json.loads((tmp_path / f"threads-{rank}.json").read_text())
        assert "pt_gloo_runloop" in threads["during"], threads  # the group had its threads
        assert not [name for name in threads["after"] if name.startswith(("gloo", "pt_gloo"))], threads

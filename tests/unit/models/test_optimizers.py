"""The per-row optimizers: AdaGrad on the embedding table, and the wide part's forgetting AdaGrad and FTRL."""

from __future__ import annotations

import io

import pytest
import torch

from models import host
from models.config import LEGACY_VALUES
from models.learner import Learner
from models.optimizers import WideOptimizer
from tests.unit.models.test_wide import batch, config  # the wide part's small model and its linear stream

pytestmark = pytest.mark.unit

def sparse_step(optimizer: torch.optim.Optimizer, table: torch.nn.Embedding, rows: torch.Tensor) -> None:
    optimizer.zero_grad()
    (table(rows) * torch.linspace(-1, 1, table.embedding_dim)).sum().backward()
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        optimizer.step()


def test_wide_optimizer_without_decay_is_torch_adagrad_on_sparse_rows() -> None:
    tables = [torch.nn.Embedding(50, 3, sparse=True) for _ in range(2)]
    tables[1].load_state_dict(tables[0].state_dict())
    ours = WideOptimizer(tables[0].parameters(), lr=0.1)
    torchs = torch.optim.Adagrad(tables[1].parameters(), lr=0.1, foreach=False)
    for step in range(5):
        rows = torch.tensor([step, 7, 7, 20 + step])
        sparse_step(ours, tables[0], rows)
        sparse_step(torchs, tables[1], rows)
    torch.testing.assert_close(tables[0].weight, tables[1].weight)


@pytest.mark.parametrize("options", [dict(decay=0.9), dict(method="ftrl", decay=0.95, l1=0.01, l2=0.1)],
                         ids=["forgetting-adagrad", "ftrl"])
def test_a_devices_fixed_shapes_give_the_hosts_update(options: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's path (``_touched_slots``' fixed shapes, run here on the CPU): the same weights, sums and z as the
    host's coalesced rows within float rounding, and no row moves that no batch touched; row 0 is touched by some
    batches, so the unused slots (which point at it) must add nothing to a used row 0."""
    tables = []
    for fixed in (False, True):
        monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", fixed)
        torch.manual_seed(0)
        table = torch.nn.Embedding(50, 2, sparse=True)
        optimizer = WideOptimizer(table.parameters(), lr=0.1, **options)
        generator = torch.Generator().manual_seed(1)
        for step in range(20):
            optimizer.zero_grad()
            rows = torch.randint(0 if step % 2 else 1, 30, (16,), generator=generator)
            (table(rows) * torch.randn(16, 2, generator=generator)).sum().backward()
            optimizer.step()
        tables.append((table.weight.detach(), optimizer.state[table.weight]))
    (host_weight, host_state), (fixed_weight, fixed_state) = tables
    torch.testing.assert_close(fixed_weight, host_weight, rtol=1e-6, atol=1e-7)
    for key in host_state:
        torch.testing.assert_close(fixed_state[key], host_state[key], rtol=1e-6, atol=1e-7)
    assert torch.equal(fixed_weight[30:], host_weight[30:])  # never touched: never moved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")
@pytest.mark.parametrize("options", [dict(decay=0.9), dict(method="ftrl", decay=0.95, l1=0.01)],
                         ids=["adagrad", "ftrl"])
def test_the_wide_optimizer_never_waits_for_the_host_on_a_gpu(options: dict) -> None:
    table = torch.nn.Embedding(1 << 16, 2, sparse=True).cuda()
    optimizer = WideOptimizer(table.parameters(), lr=0.1, **options)
    batches = [torch.randint(0, 5000, (4096,), device="cuda") for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in batches:
            optimizer.zero_grad()
            table(rows).pow(2).sum().backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(optimizer.state[table.weight]["step"]) == 3


def test_a_forgetting_accumulator_keeps_the_steps_of_a_frequent_row_larger() -> None:
    def last_move(decay: float) -> float:
        table = torch.nn.Embedding(4, 1, sparse=True)
        optimizer = WideOptimizer(table.parameters(), lr=0.1, decay=decay)
        for _ in range(50):
            before = table.weight[1].item()
            sparse_step(optimizer, table, torch.tensor([1]))
        return abs(table.weight[1].item() - before)

    assert last_move(0.9) > 2 * last_move(1.0)


@pytest.mark.parametrize("options", [dict(embedding_optimizer="adagrad"), dict(wide="ftrl"), dict(wide_decay=0.99)],
                         ids=["adagrad-embeddings", "ftrl", "wide-decay"])
def test_optimizer_state_survives_a_checkpoint_and_training_continues_identically(options: dict) -> None:
    uninterrupted, interrupted = Learner(config(**options)), Learner(config(**options))
    for i in range(3):
        uninterrupted.step(batch(64 * i))
        interrupted.step(batch(64 * i))
    buffer = io.BytesIO()
    torch.save(interrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = Learner.from_state_dict(torch.load(buffer, weights_only=True))
    for i in range(3, 6):
        assert uninterrupted.step(batch(64 * i))[0] == resumed.step(batch(64 * i))[0]
    assert torch.equal(uninterrupted.model.embedding.weight, resumed.model.embedding.weight)
    assert torch.equal(uninterrupted.model.wide.weight.weight, resumed.model.wide.weight.weight)


def test_ftrl_wide_part_learns_the_start_of_the_stream_like_adagrad() -> None:
    def mean_early_loss(**options: str) -> float:
        learner = Learner(config(**options))
        return sum(learner.step(batch(64 * i))[0]["total"] for i in range(15)) / 15

    assert mean_early_loss(wide="ftrl") < mean_early_loss(wide="none") - 0.1


def test_a_checkpoint_written_before_the_option_reads_as_sparse_adam_embeddings() -> None:
    learner = Learner(config(embedding_optimizer="adam"))
    state = learner.state_dict()
    state["config"] = {k: v for k, v in state["config"].items() if k not in ("embedding_optimizer", "wide_decay")}
    restored = Learner.from_state_dict(state)
    assert LEGACY_VALUES["embedding_optimizer"] == "adam"
    assert isinstance(restored.embedding_optimizer, torch.optim.SparseAdam)  # RowAdam is one
    with pytest.raises(ValueError, match="embedding_optimizer"):
        config(embedding_optimizer="sgd")

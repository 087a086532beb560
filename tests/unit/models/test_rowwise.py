"""RowAdam / RowAdagrad give torch's SparseAdam / sparse Adagrad values to the last bit, and share their state."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from models import host, rowwise
from models.rowwise import RowAdagrad, RowAdam

pytestmark = pytest.mark.unit


def _tables(seed: int, width: int = 8) -> tuple[torch.nn.Embedding, torch.nn.Embedding]:
    torch.manual_seed(seed)
    table = torch.nn.Embedding(500, width, sparse=True)
    return table, copy.deepcopy(table)


def _steps(table: torch.nn.Embedding, optimizer: torch.optim.Optimizer, steps: int, seed: int,
           extra: torch.nn.Parameter | None = None, batch: int = 64) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        rows = torch.randint(0, 60, (batch, 3), generator=generator)  # repeated rows within a batch, and across
        loss = (table(rows) ** 2).sum() * torch.rand((), generator=generator)
        if extra is not None:
            loss = loss + (extra * torch.randn(extra.shape, generator=generator)).sum()
        loss.backward()
        optimizer.step()


# Batches of 64 x 3 rows find their unique rows with torch's coalesce, of 1,024 x 3 with numpy's (CPU, >= 2,048
# rows: models.rowwise._NUMPY_UNIQUE_FROM). Numpy's path adds a row's gradients in the order they come, torch's
# coalesce in its sort's order: the same sums, equal to the last bit with few repeats of a row, within float
# rounding with many (test_the_numpy_path_sums_each_rows_gradients_in_the_order_they_come holds it to that order).
BATCHES = pytest.mark.parametrize("batch", [64, 1024], ids=["coalesce", "numpy-unique"])


@pytest.fixture(params=["cpu-path", "fixed-shapes"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test on the CPU's path and on a GPU's (``_touched_slots``' fixed shapes, run here on the CPU)."""
    monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", request.param == "fixed-shapes")
    return request.param


def assert_same(mine: torch.Tensor, theirs: torch.Tensor, batch: int) -> None:
    if batch < 1024:
        assert torch.equal(mine, theirs)
    else:
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)


@BATCHES
@pytest.mark.parametrize("width", [8, 2])  # wide rows and narrow ones (gathered as single elements)
def test_row_adam_equals_sparse_adam_bit_for_bit(width: int, batch: int, path: str) -> None:
    mine, theirs = _tables(0, width)
    row, sparse = RowAdam(mine.parameters(), lr=0.01), torch.optim.SparseAdam(theirs.parameters(), lr=0.01)
    _steps(mine, row, 25, seed=1, batch=batch)
    _steps(theirs, sparse, 25, seed=1, batch=batch)
    assert_same(mine.weight, theirs.weight, batch)
    for key in ("exp_avg", "exp_avg_sq"):
        assert_same(row.state[mine.weight][key], sparse.state[theirs.weight][key], batch)
    assert row.state[mine.weight]["step"] == sparse.state[theirs.weight]["step"] == 25


@BATCHES
@pytest.mark.parametrize("width", [8, 2])
def test_row_adagrad_equals_adagrad_bit_for_bit_on_sparse_and_dense_gradients(width: int, batch: int,
                                                                              path: str) -> None:
    mine, theirs = _tables(2, width)
    bias_mine = torch.nn.Parameter(torch.zeros(3))
    bias_theirs = torch.nn.Parameter(torch.zeros(3))
    row = RowAdagrad([mine.weight, bias_mine], lr=0.05)
    torch_adagrad = torch.optim.Adagrad([theirs.weight, bias_theirs], lr=0.05, foreach=False)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        _steps(mine, row, 25, seed=3, extra=bias_mine, batch=batch)
        _steps(theirs, torch_adagrad, 25, seed=3, extra=bias_theirs, batch=batch)
    assert_same(mine.weight, theirs.weight, batch)
    assert torch.equal(bias_mine, bias_theirs)
    assert_same(row.state[mine.weight]["sum"], torch_adagrad.state[theirs.weight]["sum"], batch)


def test_states_load_both_ways() -> None:
    """A checkpoint written with torch's optimizer continues in the row-wise one exactly (and back)."""
    a, b = _tables(4)
    torch_adam = torch.optim.SparseAdam(a.parameters(), lr=0.01)
    _steps(a, torch_adam, 5, seed=5)
    b.load_state_dict(a.state_dict())
    row = RowAdam(b.parameters(), lr=0.01)
    row.load_state_dict(copy.deepcopy(torch_adam.state_dict()))  # load shares tensors
    _steps(a, torch_adam, 5, seed=6)
    _steps(b, row, 5, seed=6)
    assert torch.equal(a.weight, b.weight)
    back = torch.optim.SparseAdam(b.parameters(), lr=0.01)
    back.load_state_dict(row.state_dict())
    assert back.state_dict()["state"][0]["step"] == 10


def test_adams_step_count_crosses_between_a_devices_path_and_the_hosts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device counts RowAdam's steps in a float64 tensor there (the step size without the host), a CPU in an int:
    a checkpoint of either continues in the other as torch's SparseAdam continues, to the last bit."""
    a, b = _tables(11)
    torch_adam = torch.optim.SparseAdam(a.parameters(), lr=0.01)
    row = RowAdam(b.parameters(), lr=0.01)
    _steps(a, torch_adam, 10, seed=12)
    for fixed, seed in ((True, 12), (False, 13), (True, 14)):
        monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", fixed)
        if seed != 12:
            saved = io.BytesIO()
            torch.save(row.state_dict(), saved)
            saved.seek(0)
            row = RowAdam(b.parameters(), lr=0.01)
            row.load_state_dict(torch.load(saved, weights_only=True))
            _steps(a, torch_adam, 5, seed=seed)
        _steps(b, row, 10 if seed == 12 else 5, seed=seed)
        step = row.state[b.weight]["step"]
        assert (torch.is_tensor(step) and step.dtype == torch.float64) if fixed else type(step) is int
    assert torch.equal(a.weight, b.weight) and int(row.state[b.weight]["step"]) == 20


@pytest.mark.parametrize("kind", [RowAdam, RowAdagrad])
def test_a_step_touches_only_the_rows_of_the_batch(kind: type, path: str) -> None:
    table, _ = _tables(7)
    optimizer = kind(table.parameters(), lr=0.1)
    for rows in ([5, 9, 5], [9, 9, 9, 9, 3]):  # the fixed shapes' unused slots point at row 0: it must not move
        before = table.weight.detach().clone()
        states = {key: value.clone() for key, value in optimizer.state[table.weight].items()
                  if isinstance(value, torch.Tensor) and value.dim()}
        optimizer.zero_grad()
        table(torch.tensor(rows)).sum().backward()
        optimizer.step()
        changed = (table.weight != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == sorted(set(rows))
        for key, value in states.items():  # nor its state (Adam's moments, AdaGrad's sums)
            assert torch.equal(optimizer.state[table.weight][key][0], value[0])


@pytest.mark.parametrize("kind", [RowAdam, RowAdagrad])
def test_the_fixed_shapes_equal_the_numpy_path_to_the_last_bit(kind: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU's path (run on the CPU) sums a row's gradients in the order they come, as the numpy path does."""
    tables = _tables(9, 8)
    weights = []
    for fixed, table in zip((False, True), tables):
        monkeypatch.setattr(host, "DEVICE_PATHS_ON_CPU", fixed)
        optimizer = kind(table.parameters(), lr=0.05)
        with torch.sparse.check_sparse_tensor_invariants(enable=False):
            _steps(table, optimizer, 10, seed=10, batch=1024)
        weights.append((table.weight.detach(), [v for v in optimizer.state[table.weight].values()
                                                if isinstance(v, torch.Tensor) and v.dim()]))
    (cpu_weight, cpu_states), (fixed_weight, fixed_states) = weights
    assert torch.equal(cpu_weight, fixed_weight)
    assert all(torch.equal(a, b) for a, b in zip(cpu_states, fixed_states))


def test_touched_slots_of_no_rows_and_of_one_row(path: str) -> None:
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        one = torch.sparse_coo_tensor(torch.tensor([[4, 4]]), torch.tensor([[1.0], [2.0]]), (9, 1))
    rows, summed, used = rowwise._touched_slots(one)
    assert rows.tolist() == [4, 0] and summed.flatten().tolist() == [3.0, 0.0] and used.flatten().tolist() == [1, 0]
    for kind in (RowAdam, RowAdagrad):
        table = torch.nn.Embedding(9, 2, sparse=True)
        optimizer = kind(table.parameters())
        table(torch.zeros(0, dtype=torch.long)).sum().backward()  # a batch of no rows: nothing moves
        before = table.weight.detach().clone()
        optimizer.step()
        assert torch.equal(table.weight, before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on GPU machines only)")
@pytest.mark.parametrize("kind", [RowAdam, RowAdagrad])
def test_row_updates_never_wait_for_the_host_on_a_gpu(kind: type) -> None:
    table = torch.nn.Embedding(1 << 16, 16, sparse=True).cuda()
    reference = torch.nn.Embedding(1 << 16, 16, sparse=True)
    reference.load_state_dict(table.state_dict())
    optimizer, cpu_optimizer = kind(table.parameters(), lr=0.05), kind(reference.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(11)
    batches = [torch.randint(0, 5000, (4096, 4), generator=generator) for _ in range(3)]
    gpu_batches = [b.cuda() for b in batches]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for rows in gpu_batches:
            optimizer.zero_grad()
            table(rows).pow(2).sum().backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for rows in batches:
        cpu_optimizer.zero_grad()
        reference(rows).pow(2).sum().backward()
        cpu_optimizer.step()
    # the GPU adds a row's repeats with atomics, in no fixed order: the same values within float rounding
    torch.testing.assert_close(table.weight.cpu(), reference.weight.detach(), rtol=1e-5, atol=1e-6)


def test_unsupported_options_are_refused() -> None:
    table, _ = _tables(8)
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer = RowAdam([torch.nn.Parameter(torch.zeros(3))])
        optimizer.param_groups[0]["params"][0].grad = torch.ones(3)
        optimizer.step()
    optimizer = RowAdagrad(table.parameters())
    optimizer.param_groups[0]["lr_decay"] = 0.1
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="lr_decay"):
        optimizer.step()


def test_the_numpy_path_sums_each_rows_gradients_in_the_order_they_come() -> None:
    from models.rowwise import _NUMPY_UNIQUE_FROM, _touched_rows

    generator = torch.Generator().manual_seed(7)
    rows = torch.cat([torch.zeros(3000, dtype=torch.long), torch.randint(1, 400, (_NUMPY_UNIQUE_FROM,),
                                                                          generator=generator)])
    rows = rows[torch.randperm(len(rows), generator=generator)]  # row 0 ~3,000 times, the others a few
    values = torch.randn(len(rows), 8, generator=generator)  # rows wider than _FLAT_UP_TO: index = the rows
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        grad = torch.sparse_coo_tensor(rows[None], values, (1000, 8))
    touched, summed = _touched_rows(grad)
    unique = torch.unique(rows)
    assert torch.equal(touched.index, unique)
    expected = torch.zeros(len(unique), 8)
    position = {int(r): i for i, r in enumerate(unique)}
    for r, v in zip(rows.tolist(), values):  # float32, one addition after another
        expected[position[r]] += v
    assert torch.equal(summed, expected)
    # torch's sums up to their order: float32 rounding over ~3,000 additions
    torch.testing.assert_close(summed, grad.coalesce().values(), rtol=1e-4, atol=1e-5)


def test_the_numpy_path_with_the_tables_marks_sums_as_without() -> None:
    from models.rowwise import _NUMPY_UNIQUE_FROM, RowMarks, _touched_rows

    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 5000, (_NUMPY_UNIQUE_FROM * 2,), generator=generator)
    values = torch.randn(len(rows), 8, generator=generator)
    with torch.sparse.check_sparse_tensor_invariants(enable=False):
        grad = torch.sparse_coo_tensor(rows[None], values, (5000, 8))
    marks = RowMarks(5000)
    assert marks.pays(len(rows))
    touched, summed = _touched_rows(grad, marks)
    sorted_touched, sorted_summed = _touched_rows(grad)
    assert torch.equal(touched.index, sorted_touched.index) and torch.equal(summed, sorted_summed)  # to the last bit
    assert not marks.seen.any()  # every flag cleared for the next step


def test_row_marks_find_numpy_unique_and_clear_their_flags_after_a_bad_index() -> None:
    import numpy as np

    from models.rowwise import RowMarks

    marks = RowMarks(1000)
    for n, high in ((1, 1000), (7, 3), (5000, 1000), (300, 1000)):  # repeats, every row, a few rows
        index = np.random.default_rng(n).integers(0, high, n)
        rows, inverse = marks.unique(index)
        expected_rows, expected_inverse = np.unique(index, return_inverse=True)
        assert rows.tolist() == expected_rows.tolist() and inverse.tolist() == expected_inverse.tolist()
        assert inverse.dtype == np.int64 and not marks.seen.any()
    with pytest.raises(IndexError):
        marks.unique(np.array([3, 1000]))
    assert not marks.seen.any()
    assert not RowMarks(1 << 20).pays(2048) and RowMarks(1 << 20).pays(16384)  # the scan only where it is cheaper


def test_row_optimizers_on_marks_and_on_the_sort_train_alike() -> None:
    from models.rowwise import RowAdagrad, RowAdam, RowMarks

    for make in (RowAdagrad, RowAdam):
        tables = [torch.nn.Embedding(4000, 4, sparse=True) for _ in range(2)]
        tables[1].load_state_dict(tables[0].state_dict())
        optimizers = [make(t.parameters(), lr=0.05) for t in tables]
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            index = torch.randint(0, 4000, (6000,), generator=generator)
            for on_marks, table, optimizer in zip((True, False), tables, optimizers):
                optimizer.zero_grad()
                table(index).pow(2).sum().backward()
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(RowMarks, "FLAGS_PER_KEY", RowMarks.FLAGS_PER_KEY if on_marks else 0)
                    assert RowMarks(4000).pays(len(index)) is on_marks
                    optimizer.step()
        assert torch.equal(tables[0].weight, tables[1].weight)  # to the last bit
        for a, b in zip(optimizers[0].state[tables[0].weight].values(), optimizers[1].state[tables[1].weight].values()):
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


@pytest.mark.parametrize("n", [1, 2, 3, 100, 4097])
@pytest.mark.parametrize("high", [2, 1 << 20, 1 << 50])  # 1 << 50: too large to share an int64 with positions
def test_unique_rows_is_numpy_unique_with_the_inverse(n: int, high: int) -> None:
    import numpy as np

    from models.rowwise import _unique_rows

    index = np.random.default_rng(n).integers(0, high, n)
    rows, inverse = _unique_rows(index)
    expected_rows, expected_inverse = np.unique(index, return_inverse=True)
    assert rows.tolist() == expected_rows.tolist()
    assert inverse.tolist() == expected_inverse.reshape(-1).tolist()
    assert inverse.dtype == np.int64

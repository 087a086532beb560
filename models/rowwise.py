"""Optimizers for embedding tables that update only the rows a step touched, with gathers and scatters.

``RowAdam`` is ``torch.optim.SparseAdam`` and ``RowAdagrad`` is ``torch.optim.Adagrad`` on a sparse gradient, the same
update written with ``index_select`` / ``index_add_`` on the touched rows instead of torch's COO arithmetic
(``sparse_mask`` and a sparse ``add_`` into the dense state, per state tensor): 1.24x the samples/s of a whole step
of the default model at batch 4,096 on a CPU (``bench/train_step.py``'s ``embedding_update``, docs/performance.md).
Their state (``step``, ``exp_avg``, ``exp_avg_sq``; ``step``, ``sum``) and hyper-parameters are torch's (on a device
each step count is a tensor there, so a step never reads the host: RowAdam's a float64 one, turned back into an int on
a CPU), so a checkpoint of either loads into the other, and the values they produce are torch's to the last bit
(``tests/unit/models/test_rowwise.py``), except for the order in which a large gradient's repeats of a row are added
(``_touched_rows_numpy``): the same sums, within float rounding.

A step costs O(rows touched), never O(table): the property that keeps the step time flat in the table size.
Dense gradients (the wide part's numeric weights and bias) take torch's dense Adagrad step.

>>> table = torch.nn.Embedding(1000, 4, sparse=True)
>>> optimizer = RowAdam(table.parameters(), lr=0.01)
>>> table(torch.tensor([3, 3, 7])).sum().backward(); optimizer.step()
>>> int(optimizer.state[table.weight]["step"])
1
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.host import on_host

# Narrow rows (the wide part's one weight per task) gather and scatter faster as single elements of the flat table:
# torch's CPU index_add_ / index_select go row by row on a 2-D tensor and element by element on a 1-D one.
_FLAT_UP_TO = 4


class _Rows:
    """The touched rows of a table, and gather / scatter-add of their values [R, D] (unique rows)."""

    def __init__(self, rows: torch.Tensor, width: int) -> None:
        self.width = width
        self.flat = width <= _FLAT_UP_TO
        self.index = ((rows[:, None] * width + torch.arange(width, device=rows.device)).reshape(-1)
                      if self.flat else rows)

    def gather(self, table: torch.Tensor) -> torch.Tensor:
        if self.flat:
            return table.view(-1).index_select(0, self.index).view(-1, self.width)
        return table.index_select(0, self.index)

    def put(self, table: torch.Tensor, values: torch.Tensor) -> None:
        if self.flat:
            table.view(-1).index_copy_(0, self.index, values.reshape(-1))
        else:
            table.index_copy_(0, self.index, values)

    def add(self, table: torch.Tensor, values: torch.Tensor, alpha: float = 1.0) -> None:
        # Gather, add, write back. The rows are unique, so this is index_add_ (the same sums, to the last bit),
        # whose CPU kernel goes row by row on a 2-D table: 2.3x the time for 4,500 rows of 16 floats of a 2^20-row
        # table. (A GPU's sparse updates take _touched_slots' fixed shapes instead.)
        if self.flat:
            flat = table.view(-1)
            flat.index_copy_(0, self.index, flat.index_select(0, self.index).add_(values.reshape(-1), alpha=alpha))
        else:
            table.index_copy_(0, self.index, table.index_select(0, self.index).add_(values, alpha=alpha))


def _touched_slots(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [n], summed gradients [n, D], used [n, 1]) of a sparse gradient of n looked-up rows, in shapes fixed
    by n: slot i holds the i-th unique row (in row order) and the sum of its gradients, added in the order they
    come; the slots after the last unique row hold row 0, a zero gradient and ``used = 0``. Nothing depends on the
    data's number of unique rows, so nothing is read back to the host (``coalesce`` must, to size its output): a
    GPU step never waits here. The updates then add into the tables with ``index_add_``, where an unused slot,
    its update multiplied by 0, adds nothing.

    >>> grad = torch.sparse_coo_tensor(torch.tensor([[7, 3, 7]]), torch.tensor([[1.0], [2.0], [4.0]]), (9, 1),
    ...                                check_invariants=True)
    >>> rows, summed, used = _touched_slots(grad)
    >>> rows.tolist(), summed.flatten().tolist(), used.flatten().tolist()
    ([3, 7, 0], [2.0, 5.0, 0.0], [1.0, 1.0, 0.0])
    """
    index, values = grad._indices()[0], grad._values()
    n = index.numel()
    ordered, order = torch.sort(index, stable=True)  # stable: a row's gradients summed in the order they come
    first = torch.ones(n, dtype=torch.bool, device=index.device)
    torch.ne(ordered[1:], ordered[:-1], out=first[1:])
    slot = torch.cumsum(first, 0) - 1
    summed = torch.zeros_like(values).index_add_(0, slot, values.index_select(0, order))
    rows = torch.zeros_like(index).scatter_(0, slot, ordered)  # a slot's writers all write its row
    used = (torch.arange(n, device=index.device) <= slot[-1:]).to(values.dtype).unsqueeze(1)
    return rows, summed, used


def _fixed_shapes(grad: torch.Tensor) -> bool:
    """Whether a sparse update takes ``_touched_slots``' fixed shapes: on every device but a CPU (where the unique
    rows alone are less work, and finding them costs no wait; ``models.host``)."""
    return not on_host(grad.device)


def _touched_rows(grad: torch.Tensor, marks: RowMarks | None = None) -> tuple[_Rows, torch.Tensor]:
    """(rows, summed gradient rows [R, D]) of a sparse gradient; unique rows (the update is not linear). ``marks``:
    the table's scratch (``RowMarks``), which finds a large gradient's rows without a sort."""
    if grad.device.type == "cpu" and not grad.is_coalesced() and grad._nnz() >= _NUMPY_UNIQUE_FROM:
        return _touched_rows_numpy(grad, marks)
    grad = grad.coalesce()  # a no-op for a gradient marked coalesced (synchronous ranks build it so)
    values = grad._values()
    return _Rows(grad._indices()[0], values.shape[1]), values


# From this many looked-up rows on, a CPU finds the unique rows faster with numpy's sort than with torch's coalesce
# (1.6x at 16,384 rows of 16 floats, 2.4x at 28,672 of 2: a batch of 4,096 in the table and the wide part); below
# it, torch's is as fast or faster.
_NUMPY_UNIQUE_FROM = 2048


def _touched_rows_numpy(grad: torch.Tensor, marks: RowMarks | None = None) -> tuple[_Rows, torch.Tensor]:
    """``coalesce`` on a CPU with numpy's unique: the same rows and the same sums, each row's values added in the
    order they come (torch's coalesce adds them in the order of its sort, which does not keep that order: with many
    repeats of a row the two differ in the last bits; ``tests/unit/models/test_rowwise.py``)."""
    index = grad._indices()[0].numpy()
    rows, inverse = marks.unique(index) if marks is not None and marks.pays(len(index)) else _unique_rows(index)
    values = grad._values()
    summed = torch.zeros((len(rows), values.shape[1]), dtype=values.dtype).index_add_(
        0, torch.from_numpy(inverse), values)
    return _Rows(torch.from_numpy(rows), values.shape[1]), summed


def _unique_rows(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(index, return_inverse=True)`` of non-negative row numbers, from one ``np.sort`` of int64 keys
    (row, position) instead of an argsort: 2-2.7x faster at 9k-150k rows (numpy's sort of int64 is vectorised;
    its argsort much less so). Rows too large to share an int64 with their position go to ``np.unique``.

    >>> [a.tolist() for a in _unique_rows(np.array([7, 3, 7, 0]))]
    [[0, 3, 7], [2, 1, 2, 0]]
    """
    n = len(index)
    bits = max(1, (n - 1).bit_length())
    if not n or int(index.max()) >> (62 - bits) or int(index.min()) < 0:
        rows, inverse = np.unique(index, return_inverse=True)
        return rows, inverse.reshape(-1)
    keys = np.sort((index << bits) | np.arange(n))
    ordered = keys >> bits
    first = np.empty(n, dtype=bool)  # the first of each row's run in sorted order
    first[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[keys & ((1 << bits) - 1)] = np.cumsum(first) - 1
    return ordered[first], inverse


class RowMarks:
    """A table's scratch for ``np.unique(index, return_inverse=True)`` without a sort (a CPU's path): one flag per
    table row marks the rows an index holds, a scan of the flags lists them in row order, and a slot per row gives
    each its place in that list. The same rows and inverse as ``_unique_rows``, so the same sums in the same order;
    where the flags are few against the index (``pays``): 0.53 -> 0.20 ms for the 16,384 rows a batch of 4,096 looks
    up in a table of 2^20 (4,498 unique), 0.85 -> 0.40 ms for the wide part's 24,576 in 2^21 (one-off timing loop),
    for 5 bytes per table row. The flags are all clear between calls.

    >>> [a.tolist() for a in RowMarks(10).unique(np.array([7, 3, 7, 0]))]
    [[0, 3, 7], [2, 1, 2, 0]]
    """

    # Scanning the flags costs about what sorting 1/600 as many keys does here: the scan only where it is well ahead
    FLAGS_PER_KEY = 256

    def __init__(self, rows: int) -> None:
        self.seen = np.zeros(rows, dtype=bool)
        self.slot = np.empty(rows, dtype=np.int32 if rows < 2**31 else np.int64)

    def pays(self, keys: int) -> bool:
        """Whether the scan beats ``_unique_rows``' sort for an index of ``keys`` rows."""
        return len(self.seen) <= self.FLAGS_PER_KEY * keys

    def unique(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sorted unique rows, inverse) of ``index`` (rows of the table)."""
        try:
            self.seen[index] = True
        except IndexError:  # a row past the table: clear what was marked before saying so
            self.seen[:] = False
            raise
        rows = np.flatnonzero(self.seen)
        self.seen[rows] = False
        self.slot[rows] = np.arange(len(rows), dtype=self.slot.dtype)
        return rows, self.slot[index].astype(np.int64)


def _row_marks(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> RowMarks | None:
    """``param``'s ``RowMarks``, made at its first CPU step (kept by the optimizer, not part of its state)."""
    if param.device.type != "cpu":
        return None
    kept = optimizer.__dict__.setdefault("_row_marks", {})
    marks = kept.get(id(param))
    if marks is None or len(marks.seen) != param.shape[0]:  # (a table of another size: never index past its flags)
        marks = kept[id(param)] = RowMarks(param.shape[0])
    return marks


class RowAdam(torch.optim.SparseAdam):
    """``torch.optim.SparseAdam``'s update ("lazy Adam": moments of the touched rows only) on gathered rows."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise RuntimeError("RowAdam takes sparse gradients (an nn.Embedding with sparse=True)")
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                if _fixed_shapes(param.grad):
                    # a device's step count is a tensor there (float64: exact to 2^53 steps), so the step size is
                    # computed without the host and a replayed step (models.graphs) counts too
                    if not torch.is_tensor(state["step"]) or state["step"].device != param.device:
                        # a fill on the device, not a copy from the host (which would wait for it)
                        state["step"] = torch.full((), float(state["step"]), dtype=torch.float64, device=param.device)
                    state["step"].add_(1)
                    self._slots_step(param, state, group)
                    continue
                if torch.is_tensor(state["step"]):  # counted on a device before: a host's count is a number
                    state["step"] = int(state["step"])
                state["step"] += 1
                rows, grad = _touched_rows(param.grad, _row_marks(self, param))
                if group["maximize"]:
                    grad = -grad
                if grad.numel() == 0:
                    continue
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                # old <- b * old + (1 - b) * new, written as old += (1 - b) * (new - old), as torch does: torch adds
                # the update into the state (old + update) and takes the same sum again for the step, so the rows'
                # new moments are written back once and serve as the step's numerator and denominator
                old_avg = rows.gather(exp_avg)
                numer = grad.sub(old_avg).mul_(1 - beta1).add_(old_avg)
                rows.put(exp_avg, numer)
                old_sq = rows.gather(exp_avg_sq)
                new_sq = grad.pow(2).sub_(old_sq).mul_(1 - beta2).add_(old_sq)
                rows.put(exp_avg_sq, new_sq)
                denom = new_sq.sqrt_().add_(group["eps"])
                step = state["step"]
                step_size = group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
                rows.add(param, -step_size * numer.div_(denom))
        return loss

    @staticmethod
    def _slots_step(param: torch.Tensor, state: dict, group: dict) -> None:
        """The same update on ``_touched_slots``' fixed shapes (a GPU's path: no wait for the host)."""
        beta1, beta2 = group["betas"]
        rows, grad, used = _touched_slots(param.grad)
        if group["maximize"]:
            grad = -grad
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        old_avg = exp_avg.index_select(0, rows)
        avg_update = grad.sub(old_avg).mul_(1 - beta1).mul_(used)
        exp_avg.index_add_(0, rows, avg_update)
        old_sq = exp_avg_sq.index_select(0, rows)
        sq_update = grad.pow(2).sub_(old_sq).mul_(1 - beta2).mul_(used)
        exp_avg_sq.index_add_(0, rows, sq_update)
        numer = avg_update.add_(old_avg)
        denom = sq_update.add_(old_sq).sqrt_().add_(group["eps"])
        step = state["step"]  # a float64 tensor on the device: the host's formula, computed there
        step_size = (1 - torch.pow(beta2, step)).sqrt_().div_(1 - torch.pow(beta1, step)).mul_(-group["lr"])
        param.index_add_(0, rows, numer.div_(denom).mul_(step_size.to(numer.dtype)).mul_(used))


class RowAdagrad(torch.optim.Adagrad):
    """``torch.optim.Adagrad`` with its sparse branch on gathered rows; dense gradients as torch does them."""

    def __init__(self, params, lr: float = 1e-2, eps: float = 1e-10) -> None:  # noqa: ANN001
        super().__init__(params, lr=lr, eps=eps, foreach=False)
        self._steps_with_their_parameters()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._steps_with_their_parameters()

    def _steps_with_their_parameters(self) -> None:
        """Each parameter's step count on the parameter's device (torch keeps a non-fused AdaGrad's on the CPU): a
        GPU step counts without the host, and a replayed step (models.graphs) counts too."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            if group["weight_decay"] or group["maximize"] or group["lr_decay"]:
                raise RuntimeError("RowAdagrad supports neither weight_decay, maximize nor lr_decay")
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                state["step"] += 1
                state_sum, lr, eps = state["sum"], group["lr"], group["eps"]
                if param.grad.is_sparse and _fixed_shapes(param.grad):  # a GPU's path: no wait for the host
                    rows, grad, _ = _touched_slots(param.grad)  # unused slots: a zero gradient, which adds 0
                    state_sum.index_add_(0, rows, grad.pow(2))
                    param.index_add_(0, rows, grad / state_sum.index_select(0, rows).sqrt_().add_(eps), alpha=-lr)
                elif param.grad.is_sparse:
                    rows, grad = _touched_rows(param.grad, _row_marks(self, param))
                    summed = rows.gather(state_sum).add_(grad.pow(2))  # = torch's state_sum[rows] += g^2
                    rows.put(state_sum, summed)
                    rows.add(param, grad / summed.sqrt_().add_(eps), alpha=-lr)
                else:
                    state_sum.addcmul_(param.grad, param.grad, value=1)
                    param.addcdiv_(param.grad, state_sum.sqrt().add_(eps), value=-lr)
        return loss

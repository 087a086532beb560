"""Several processes, one model: the learner's side of training over ``torch.distributed``.

Two ways to keep the replicas of N ranks one model (``docs/scaling.md`` measures both):

* ``"sync"``, synchronous data parallel: every rank steps together. After ``backward`` each rank's gradients,
  weighted by its number of rows, are summed over the ranks and divided by the rows of all ranks, so the step
  is the step one learner would take on the union of the ranks' batches (exactly so for the losses that are
  means over rows). A rank with nothing contributes zero weight (:meth:`models.learner.Learner.step_empty`).
  Dense gradients travel whole; a sparse embedding's gradient only on the rows some rank touched (a mask of
  touched rows is max-reduced first, then the union's rows are summed). The optimizers then take identical
  steps on identical states, so the replicas stay bit-identical; the numeric normaliser merges the statistics of
  all ranks' batches, and the online counts (``models.counts``) count every rank's rows.
* ``"average"``, periodic model averaging: every rank steps alone on its own batches; every K steps or T seconds
  (decided by the caller, all ranks at once) the dense parameters and buffers are averaged over the ranks, and a
  sparse embedding only on the rows some rank touched since the last average. Optimizer states stay per rank. The
  online counts (``models.counts``) are not averaged but summed: each average adds every rank's rows since the
  last one, so all ranks then hold the counts of all rows.

Nothing here knows about Kafka or the trainer: :class:`Collective` is attached to a ``Learner``
(``learner.collective = Collective("sync")``) inside an initialised process group (``torch.distributed``:
gloo on CPU, NCCL on GPUs), and ``Learner.step`` calls :meth:`Collective.after_backward`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.distributed.nn.functional  # noqa: F401  (before any process group: see below)
from torch import nn

# torch.distributed.nn.functional's functions take ``group=group.WORLD`` as a default, evaluated when the module is
# first imported. torch imports it lazily (a learner's first optimizer imports torch._dynamo, which imports it), so in
# a rank it used to come after init_process_group: ten defaults then held the live group, destroy_process_group could
# not free it, and gloo's threads lived on into the interpreter's exit, where a worker thread releasing a tensor is
# killed by the finalising interpreter and the rank aborts ("terminate called without an active exception").
# Imported here, with this module (every rank imports it before it joins a group), the defaults are None.

MODES = ("sync", "average")


def sparse_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights of the embeddings with sparse gradients (their gradients are reduced on touched rows only)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a sparse embedding's weight, in ``model.parameters()`` order."""
    sparse = {id(p) for p in sparse_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in sparse]


class Collective:
    """The learner's collectives for one rank of an initialised process group (see the module docstring).

    ``seconds`` / ``calls``: time spent in collectives and how many were made (the cost per step in
    ``bench/scaling.py``).
    """

    def __init__(self, mode: str = "sync", group: dist.ProcessGroup | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"distributed mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
        self.mode = mode
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.seconds = 0.0
        self.calls = 0
        self._touched: dict[int, torch.Tensor] = {}  # average mode: rows touched since the last average
        self._count_base: nn.Module | None = None  # average mode: the online counts as of the last average

    # ------------------------------------------------------------------------------------------ plumbing

    def _all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        started = time.perf_counter()
        dist.all_reduce(tensor, op=op, group=self.group)
        self.seconds += time.perf_counter() - started
        self.calls += 1

    def _all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on each), concatenated in rank order along the first dimension."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        started = time.perf_counter()
        dist.all_gather(parts, tensor, group=self.group)
        self.seconds += time.perf_counter() - started
        self.calls += 1
        return torch.cat(parts)

    def _union_rows(self, weights: list[nn.Parameter], masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per sparse embedding, the sorted rows any rank marked in its mask (one max-reduce over all masks)."""
        if not masks:
            return []
        flat = torch.cat(masks)
        self._all_reduce(flat, dist.ReduceOp.MAX)
        return [m.nonzero().squeeze(1) for m in flat.split([w.shape[0] for w in weights])]

    # -------------------------------------------------------------------------------------- after backward

    def after_backward(self, model: nn.Module, rows: int) -> int:
        """Called by ``Learner.step`` between ``backward`` and the optimizer steps; returns the rows of the step.

        sync: the gradients become the row-weighted mean over the ranks (and the rows of all ranks are
        returned); average: the rows this step touched are remembered for the next average (``rows`` back).
        """
        if self.mode == "average":
            counts = getattr(model, "counts", None)
            if counts is not None and self._count_base is None:  # before the first count: as every rank has them
                self._count_base = copy.deepcopy(counts)
            for weight in sparse_parameters(model):
                if weight.grad is not None:
                    touched = self._touched.setdefault(id(weight), torch.zeros(weight.shape[0], dtype=torch.uint8,
                                                                                 device=weight.device))
                    touched[weight.grad.coalesce().indices()[0]] = 1
            return rows
        return self._reduce_gradients(model, rows)

    def _reduce_gradients(self, model: nn.Module, rows: int) -> int:
        dense = dense_parameters(model)
        sparse = sparse_parameters(model)
        # 1. which rows of each sparse embedding any rank touched (one max-reduce over all masks)
        local: list[tuple[torch.Tensor, torch.Tensor]] = []
        masks = []
        for weight in sparse:
            if weight.grad is not None:
                grad = weight.grad.coalesce()
                indices, values = grad.indices()[0], grad.values()
            else:
                indices = torch.zeros(0, dtype=torch.long, device=weight.device)
                values = torch.zeros(0, weight.shape[1], dtype=weight.dtype, device=weight.device)
            local.append((indices, values))
            mask = torch.zeros(weight.shape[0], dtype=torch.uint8, device=weight.device)
            mask[indices] = 1
            masks.append(mask)
        unions = self._union_rows(sparse, masks)
        # 2. one sum over: row-weighted dense gradients, "has a gradient" flags, the union rows, the row count
        device = dense[0].device if dense else sparse[0].device
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * rows for p in dense]
        parts.append(torch.tensor([float(p.grad is not None) for p in dense], device=device))
        for weight, union, (indices, values) in zip(sparse, unions, local):
            rows_sum = torch.zeros(len(union), weight.shape[1], dtype=weight.dtype, device=weight.device)
            rows_sum.index_add_(0, torch.searchsorted(union, indices), values * rows)
            parts.append(rows_sum.reshape(-1))
        parts.append(torch.tensor([float(rows)], device=device))
        flat = torch.cat([part.float() for part in parts])
        self._all_reduce(flat)
        total = int(round(float(flat[-1])))
        # 3. the mean gradients back into .grad (None where no rank had one)
        sizes = [p.numel() for p in dense] + [len(dense)] + [len(u) * w.shape[1] for w, u in zip(sparse, unions)] + [1]
        pieces = list(flat.split(sizes))
        present = pieces[len(dense)]
        scale = 1.0 / max(total, 1)
        for p, piece, has in zip(dense, pieces, present):
            p.grad = (piece.reshape(p.shape) * scale).to(p.dtype) if has > 0 else None
        for weight, union, piece in zip(sparse, unions, pieces[len(dense) + 1:]):
            values = (piece.reshape(len(union), weight.shape[1]) * scale).to(weight.dtype)
            # union: sorted, unique rows (nonzero of a mask), so the gradient is coalesced by construction
            weight.grad = torch.sparse_coo_tensor(union.unsqueeze(0), values, weight.shape, check_invariants=False,
                                                  is_coalesced=True)
        return total

    # ------------------------------------------------------------------------------------------ normaliser

    def merged_batch_statistics(self, x: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
        """sync: (rows, mean, M2) of the union of the ranks' numeric batches ``x`` [rows, d] (float64)."""
        x = x.double()
        stats = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                           x.sum(dim=0), (x * x).sum(dim=0)])
        self._all_reduce(stats)
        n = float(stats[0])
        d = x.shape[1]
        if n == 0:
            return 0.0, torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        mean = stats[1:1 + d] / n
        m2 = (stats[1 + d:] - n * mean * mean).clamp(min=0.0)
        return n, mean, m2

    def gathered_rows(self, categorical: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sync: every rank's rows ``categorical`` [B, C] and ``labels`` [B, K], in rank order, padded to the longest
        batch, with weights [N * max B] (1 for a row, 0 for padding): the online counts' input (models/counts.py)."""
        size = torch.tensor([categorical.shape[0]], device=categorical.device)
        self._all_reduce(size, dist.ReduceOp.MAX)
        longest = int(size)
        pad = longest - categorical.shape[0]
        weights = torch.cat([torch.ones(categorical.shape[0], device=labels.device),
                             torch.zeros(pad, device=labels.device)])
        local = (torch.cat([categorical, categorical.new_zeros(pad, categorical.shape[1])]),
                 torch.cat([labels.float(), labels.new_zeros(pad, labels.shape[1], dtype=torch.float)]), weights)
        if longest == 0:  # no rank has a row (every rank agrees: the size was max-reduced)
            return local
        rows, gathered_labels, gathered_weights = (self._all_gather(tensor) for tensor in local)
        return rows, gathered_labels, gathered_weights

    # ------------------------------------------------------------------------------------------- average

    @torch.no_grad()
    def average(self, model: nn.Module) -> None:
        """average mode: the mean over the ranks of the dense parameters and floating buffers, and of the sparse
        embeddings' rows touched by any rank since the last average. Every rank calls it at the same point."""
        sparse = sparse_parameters(model)
        masks = [self._touched.get(id(w), torch.zeros(w.shape[0], dtype=torch.uint8, device=w.device)) for w in sparse]
        unions = self._union_rows(sparse, masks)
        # Not the online counts (models/counts.py): a mean of counts would count nothing right; _sum_counts adds them.
        tensors = [p for p in dense_parameters(model)] + [b for name, b in model.named_buffers()
                                                          if b.is_floating_point() and not name.startswith("counts.")]
        parts = [t.reshape(-1).double() for t in tensors]
        parts += [w[u].reshape(-1).double() for w, u in zip(sparse, unions)]
        if not parts:
            return
        flat = torch.cat(parts)
        self._all_reduce(flat)
        flat /= self.world_size
        sizes = [t.numel() for t in tensors] + [len(u) * w.shape[1] for w, u in zip(sparse, unions)]
        pieces = iter(flat.split(sizes))
        for t in tensors:
            t.copy_(next(pieces).reshape(t.shape).to(t.dtype))
        for w, u in zip(sparse, unions):
            w[u] = next(pieces).reshape(len(u), w.shape[1]).to(w.dtype)
        self._touched.clear()
        self._sum_counts(getattr(model, "counts", None))

    def _sum_counts(self, counts: nn.Module | None) -> None:
        """average mode: the online counts (models/counts.py) become the last average's plus every rank's rows since
        (a sum, not a mean); the clocks add up likewise. Exact without forgetting; with a half-life every rank's
        rows are aged to the summed clock, as if each rank's rows had come last."""
        base = self._count_base
        if counts is None or base is None:
            return
        since = (counts.clock - base.clock).reshape(1).double()
        self._all_reduce(since)
        clock = base.clock + since.round().long().reshape(())
        counts.settle(clock)
        base.settle(clock)
        flat = torch.cat([(counts.table - base.table).reshape(-1).double(), counts.totals - base.totals])
        self._all_reduce(flat)
        table, totals = flat.split([counts.table.numel(), counts.totals.numel()])
        counts.table.copy_(base.table + table.reshape(counts.table.shape).to(counts.table.dtype))
        counts.totals.copy_(base.totals + totals)
        self._count_base = copy.deepcopy(counts)

    @torch.no_grad()
    def broadcast(self, model: nn.Module, src: int = 0) -> None:
        """Every parameter and buffer of ``model`` from rank ``src`` (replicas start identical)."""
        for tensor in _state_tensors(model):
            started = time.perf_counter()
            dist.broadcast(tensor, src=src, group=self.group)
            self.seconds += time.perf_counter() - started
            self.calls += 1


def _state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()

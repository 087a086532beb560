"""Trust-gated distillation [ours, beyond the paper]: per task, distil only while the teacher ranks better.

A teacher that ranks worse than its student cannot teach it (reports/kuairand: teacher AUC 0.66 against a
student's 0.73). Error correction (docs/method.md) fixes single wrong predictions; the gate handles a teacher
that is behind as a whole. Both scores of every sample are taken *before* the model learns from it (the
prequential scores of ``Learner.step``), so the comparison is on data neither tower was trained on.

Per task k, over the last ``window`` samples: ``open_k = AUC(r_k) > AUC(s_k) + margin``; the decision is
re-taken every ``every`` samples (a few sorts of ``window`` scores, amortised), and starts closed. The AUC of
r_k is the AUC of the calibrated teacher too: Platt scaling is monotone.

>>> import torch
>>> gate = TrustGate(tasks=1, window=8, margin=0.0, every=4)
>>> y = torch.tensor([[0.], [1.], [0.], [1.]])
>>> gate.update(y, student=torch.tensor([[0.9], [0.1], [0.2], [0.8]]), teacher=torch.tensor([[0.], [1.], [0.], [1.]]))
>>> gate.open.tolist(), gate.teacher_auc.tolist(), gate.student_auc.tolist()
([1.0], [1.0], [0.25])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from models.host import on_host


def column_aucs(labels: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """AUC of every column of ``scores`` [n, C] against ``labels`` [n, C] (0/1), ties counting 1/2; nan for a
    column with one class. ``models.metrics.auc`` (Mann-Whitney U from average ranks) with torch ops on the
    tensors' device: one sort for all columns, shapes fixed by n, nothing read back to the host (on a CPU, numpy's
    sort of the scores as int64 keys: ``_column_aucs_numpy``, the same numbers).

    >>> column_aucs(torch.tensor([[0.], [0.], [1.], [1.]]), torch.tensor([[0.1], [0.4], [0.35], [0.8]])).tolist()
    [0.75]
    """
    columns = scores.float().t().contiguous()  # [C, n]
    if on_host(columns.device):
        return _column_aucs_numpy(np.ascontiguousarray(labels.t().numpy() > 0), columns.numpy())
    return _column_aucs_torch(labels, columns)


def _column_aucs_torch(labels: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``column_aucs`` of ``columns`` [C, n] with torch ops (any device): average ranks from one sort. ``valid`` [n]
    (bool) leaves the other rows out without changing any shape: they sort after every valid row (score +inf, no
    label), so the valid rows' ranks, tied runs and counts are those of the valid rows alone."""
    n = columns.shape[1]
    positive_rows = labels.t() > 0
    if valid is not None:
        columns = torch.where(valid, columns, torch.inf)
        positive_rows = positive_rows & valid
    ordered, order = torch.sort(columns, dim=1)
    index = torch.arange(n, device=columns.device).expand_as(order)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    # Each row's tied run is [first, last]; its average 1-based rank is (first + last) / 2 + 1.
    first = torch.cummax(torch.where(starts, index, 0), dim=1).values
    last = torch.cummin(torch.where(ends, index, n).flip(1), dim=1).values.flip(1)
    positive = positive_rows.gather(1, order).double()
    positives = positive.sum(dim=1)
    negatives = (n if valid is None else valid.sum().double()) - positives
    u = ((first + last).double() * positive).sum(dim=1) / 2.0 + positives - positives * (positives + 1) / 2.0
    return torch.where((positives > 0) & (negatives > 0), u / (positives * negatives).clamp(min=1.0),
                       torch.full_like(u, math.nan))


def _score_keys(positive: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """``_column_aucs_numpy``'s int64 keys of scores [C, n] (float32) and their labels [C, n] (bool): each sorts like
    its score, the label in the lowest bit."""
    bits = (columns + np.float32(0.0)).view(np.int32)
    keys = np.left_shift(bits ^ ((bits >> 31) & 0x7FFFFFFF), 1, dtype=np.int64)
    keys |= positive
    return keys


def _column_aucs_numpy(positive: np.ndarray, columns: np.ndarray) -> torch.Tensor:
    """``column_aucs`` on a CPU from [C, n] arrays, without an argsort (numpy's sort of int64 values is several times
    its argsort here): each score becomes an int64 key that sorts like the float (its IEEE bits, negatives
    flipped; -0.0 as 0.0) with the label in the lowest bit, so one sort of the keys gives every score's rank and
    label, the negatives of a run of tied scores before its positives. The j-th positive (from 0) at position p has
    p - j negatives before it; twice the Mann-Whitney U (ties count 1/2) is twice their sum less (positives x
    negatives) of each run of tied scores: the same integer as from the average ranks, so the same AUC to the last
    bit; nan for a column with one class. All columns at once, only the tied runs looked at run by run."""
    keys = _score_keys(positive, columns)
    keys.sort(axis=1)
    return _aucs_of_sorted_keys(keys)


def _aucs_of_sorted_keys(keys: np.ndarray) -> torch.Tensor:
    """``_column_aucs_numpy`` from its keys [C, n], each row sorted."""
    count, n = keys.shape
    labels = keys & 1
    n_positive = labels.sum(axis=1)
    twice_u = 2 * (labels @ np.arange(n, dtype=np.int64)) - n_positive * (n_positive - 1)
    score = keys >> 1
    tied = np.zeros(keys.shape, dtype=bool)  # equal to the score before it in its column
    np.equal(score[:, 1:], score[:, :-1], out=tied[:, 1:])
    if tied.any():  # (positives x negatives) of each run of tied scores, from its members alone
        in_run = tied.copy()
        in_run[:, :-1] |= tied[:, 1:]
        members = np.flatnonzero(in_run)
        starts = ~tied.reshape(-1)[members]
        run = np.cumsum(starts) - 1
        positives_in = np.bincount(run, weights=labels.reshape(-1)[members])
        pairs = positives_in * (np.bincount(run) - positives_in)
        twice_u -= np.bincount(members[starts] // n, weights=pairs, minlength=count).astype(np.int64)
    out = np.full(count, math.nan)
    n_negative = n - n_positive
    both = (n_positive > 0) & (n_negative > 0)
    out[both] = twice_u[both] / 2.0 / (n_positive[both].astype(np.float64) * n_negative[both])
    return torch.from_numpy(out)


class TrustGate:
    """Windowed prequential AUC of teacher and student per task, and the gate it decides (1 open, 0 closed)."""

    def __init__(self, tasks: int, window: int = 20000, margin: float = 0.0, every: int = 2048,
                 device: str | torch.device = "cpu") -> None:
        self.window, self.margin, self.every = int(window), float(margin), int(every)
        # On the learner's device: the scores never travel to the host, the gate never waits for them.
        self.labels = torch.zeros(self.window, tasks, device=device)
        self.student = torch.zeros(self.window, tasks, device=device)
        self.teacher = torch.zeros(self.window, tasks, device=device)
        self.filled = 0  # samples in the ring buffer (<= window)
        self.position = 0  # next row to write
        self.since_decision = 0
        self.open = torch.zeros(tasks, device=device)
        self.teacher_auc = torch.full((tasks,), math.nan, device=device)
        self.student_auc = torch.full((tasks,), math.nan, device=device)
        # On a CPU: each ring row's sort keys (teachers' columns, then students'), made as the row is written, so a
        # decision sorts them without first making them for the whole window. Derived: not checkpointed; None until
        # made from the buffers (at a decision after a load).
        self._keys: np.ndarray | None = None
        # On a device: the three counters above as tensors there, advanced by the step's own operations. Every update
        # then issues the same operations with the same arguments (a step a CUDA graph can capture and replay): the
        # rows are written at the cursor's rows, the AUCs are taken over the whole window with its unfilled rows
        # left out, and a decision applies where it is due (models.graphs). Derived from the ints (load_state_dict).
        self._cursor = torch.zeros((), dtype=torch.long, device=device)
        self._filled = torch.zeros((), dtype=torch.long, device=device)
        self._since = torch.zeros((), dtype=torch.long, device=device)
        self._rows = torch.arange(self.window, device=device)

    def update(self, labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Add a batch of labels [B, K] with the student's and the teacher's scores [B, K] (any monotone scale)."""
        rows = labels.shape[0]
        if rows >= self.window:  # only the newest window of a huge batch matters
            labels, student, teacher = labels[-self.window:], student[-self.window:], teacher[-self.window:]
            rows = self.window
        values = [v.detach().float().to(self.labels.device) for v in (labels, student, teacher)]
        if on_host(self.labels.device):
            self._write_slices(rows, *values)
            due = self.advance(rows)
            if due:
                self.decide()
        else:
            self._write_at_cursor(rows, *values)
            self._decide_on_device(rows)
            self.advance(rows)

    def advance(self, rows: int) -> bool:
        """The host's counters after an update of ``rows`` (<= window) rows; whether it decided. A replayed step
        (models.graphs) runs its device work without Python, then this."""
        self.position = int((self.position + rows) % self.window)
        self.filled = min(self.window, self.filled + rows)
        self.since_decision += rows
        due = self.since_decision >= self.every
        if due:
            self.since_decision = 0
        return due

    def _write_slices(self, rows: int, labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """A CPU's write: rows up to the end of the ring, then the rest from 0, and their sort keys."""
        first = min(rows, self.window - self.position)
        for buffer, values in ((self.labels, labels), (self.student, student), (self.teacher, teacher)):
            buffer[self.position:self.position + first] = values[:first]
            buffer[:rows - first] = values[first:]
        if self._keys is not None:  # the keys of the rows just written, from the buffers (as stored: float32)
            for lo, hi in ((self.position, self.position + first), (0, rows - first)):
                self._keys[:, lo:hi] = self._window_keys(self.labels[lo:hi], self.teacher[lo:hi], self.student[lo:hi])

    def _write_at_cursor(self, rows: int, labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """A device's write: the same rows as ``_write_slices``, found from the cursor tensor."""
        index = (self._rows[:rows] + self._cursor) % self.window
        for buffer, values in ((self.labels, labels), (self.student, student), (self.teacher, teacher)):
            buffer.index_copy_(0, index, values)
        self._cursor.copy_((self._cursor + rows) % self.window)
        self._filled.copy_((self._filled + rows).clamp(max=self.window))

    def _decide_on_device(self, rows: int) -> None:
        """Every update on a device: the AUCs over the window, kept (and the gate set) where a decision is due."""
        self._since += rows
        due = self._since >= self.every
        self._since.masked_fill_(due, 0)
        self._set(*self._window_aucs_on_device(), due)

    def decide(self) -> None:
        """Recompute both AUCs over the window and open the gate of each task whose teacher leads by the margin."""
        self.since_decision = 0
        tasks = self.labels.shape[1]
        if not on_host(self.labels.device):
            self._since.zero_()
            self._set(*self._window_aucs_on_device())
            return
        if self._keys is None:
            self._keys = np.zeros((2 * tasks, self.window), dtype=np.int64)
            self._keys[:, : self.filled] = self._window_keys(self.labels[: self.filled], self.teacher[: self.filled],
                                                             self.student[: self.filled])
        aucs = _aucs_of_sorted_keys(np.sort(self._keys[:, : self.filled], axis=1))
        self._set(aucs[:tasks], aucs[tasks:])

    def _window_aucs_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Teachers' and students' AUCs over the whole window, its unfilled rows left out (fixed shapes)."""
        tasks = self.labels.shape[1]
        columns = torch.cat([self.teacher, self.student], dim=1).t()
        aucs = _column_aucs_torch(torch.cat([self.labels, self.labels], dim=1), columns,
                                  valid=self._rows < self._filled)
        return aucs[:tasks], aucs[tasks:]

    def _set(self, teacher_auc: torch.Tensor, student_auc: torch.Tensor, due: torch.Tensor | None = None) -> None:
        """Keep a decision's AUCs (float64) and open the gate of each task whose teacher leads (where ``due``)."""
        # compared in float64; nan > x is False: a window without both classes keeps the gate closed
        opened = (teacher_auc > student_auc + self.margin).float()
        if due is not None:
            teacher_auc = torch.where(due, teacher_auc, self.teacher_auc.double())
            student_auc = torch.where(due, student_auc, self.student_auc.double())
            opened = torch.where(due, opened, self.open)
        self.teacher_auc.copy_(teacher_auc)
        self.student_auc.copy_(student_auc)
        self.open.copy_(opened)

    @staticmethod
    def _window_keys(labels: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor) -> np.ndarray:
        """The sort keys [2K, n] of rows of the ring's labels and scores [n, K]: the teachers' columns, then the
        students'."""
        positive = labels.t().numpy() > 0
        columns = torch.cat([teacher, student], dim=1).t().contiguous().numpy()
        return _score_keys(np.concatenate([positive, positive]), columns)

    def decided(self, task: int) -> bool:
        """Whether task ``task`` has both AUCs (a decision over a window holding both classes)."""
        return bool(torch.isfinite(self.teacher_auc[task]) and torch.isfinite(self.student_auc[task]))

    def state_dict(self) -> dict[str, Any]:
        """Tensors and ints only (checkpointed with the learner)."""
        return {
            "labels": self.labels, "student": self.student, "teacher": self.teacher, "filled": self.filled,
            "position": self.position, "since_decision": self.since_decision, "open": self.open,
            "teacher_auc": self.teacher_auc, "student_auc": self.student_auc,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if tuple(state["labels"].shape) != tuple(self.labels.shape):
            raise ValueError(f"trust gate window/tasks differ: saved {tuple(state['labels'].shape)}, "
                             f"configured {tuple(self.labels.shape)}")
        for name in ("labels", "student", "teacher", "open", "teacher_auc", "student_auc"):
            getattr(self, name).copy_(state[name])
        self.filled, self.position = int(state["filled"]), int(state["position"])
        self.since_decision = int(state["since_decision"])
        self._keys = None  # made again from the loaded buffers at the next decision
        for counter, value in ((self._cursor, self.position), (self._filled, self.filled),
                               (self._since, self.since_decision)):
            counter.fill_(value)

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

from models.metrics import auc


class TrustGate:
    """Windowed prequential AUC of teacher and student per task, and the gate it decides (1 open, 0 closed)."""

    def __init__(self, tasks: int, window: int = 20000, margin: float = 0.0, every: int = 2048) -> None:
        self.window, self.margin, self.every = int(window), float(margin), int(every)
        self.labels = torch.zeros(self.window, tasks)
        self.student = torch.zeros(self.window, tasks)
        self.teacher = torch.zeros(self.window, tasks)
        self.filled = 0  # samples in the ring buffer (<= window)
        self.position = 0  # next row to write
        self.since_decision = 0
        self.open = torch.zeros(tasks)
        self.teacher_auc = torch.full((tasks,), math.nan)
        self.student_auc = torch.full((tasks,), math.nan)

    def update(self, labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """Add a batch of labels [B, K] with the student's and the teacher's scores [B, K] (any monotone scale)."""
        rows = labels.shape[0]
        if rows >= self.window:  # only the newest window of a huge batch matters
            labels, student, teacher = labels[-self.window:], student[-self.window:], teacher[-self.window:]
            rows = self.window
        first = min(rows, self.window - self.position)  # rows up to the end of the ring, then the rest from 0
        for buffer, values in ((self.labels, labels), (self.student, student), (self.teacher, teacher)):
            values = values.detach().float().cpu()
            buffer[self.position:self.position + first] = values[:first]
            buffer[:rows - first] = values[first:]
        self.position = int((self.position + rows) % self.window)
        self.filled = min(self.window, self.filled + rows)
        self.since_decision += rows
        if self.since_decision >= self.every:
            self.decide()

    def decide(self) -> None:
        """Recompute both AUCs over the window and open the gate of each task whose teacher leads by the margin."""
        self.since_decision = 0
        y = self.labels[: self.filled].numpy()
        s = self.student[: self.filled].numpy()
        t = self.teacher[: self.filled].numpy()
        for k in range(y.shape[1]):
            teacher_auc, student_auc = auc(y[:, k], t[:, k]), auc(y[:, k], s[:, k])
            self.teacher_auc[k], self.student_auc[k] = teacher_auc, student_auc
            leads = np.isfinite(teacher_auc) and np.isfinite(student_auc) and teacher_auc > student_auc + self.margin
            self.open[k] = 1.0 if leads else 0.0

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
